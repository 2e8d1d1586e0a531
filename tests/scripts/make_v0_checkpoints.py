"""Write the fixture of checkpoints saved by vop before the method-descriptor refactor (issue 14).

Run once, at commit 0d5c82e (the last commit before the refactor):
    python tests/scripts/make_v0_checkpoints.py tests/fixtures/v0-checkpoints
Every registered method (plus option variants) on a micro CLIP (random, seed 0; 32-wide, 2 layers,
a 64-word vocabulary, so even ``full`` is a small file), its trainable tensors set to random values
(so zero-initialised adapters are not trivially CLIP), saved with ``save_checkpoint``; and the
embeddings of a fixed batch under that version, which tests/test_methods_descriptors.py compares.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vop.backbone.checkpoint import build_clip
from vop.backbone.config import CLIPConfig, TextConfig, VisionConfig
from vop.methods import create_model
from vop.methods.checkpoint import save_checkpoint

MICRO = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, patch_size=16, width=32, layers=3, heads=2),
                   text=TextConfig(context_length=16, vocab_size=64, width=32, heads=2, layers=3))
CASES = {
    "zeroshot": ("zeroshot", {}), "full": ("full", {}), "bias": ("bias", {}), "bias-qkv": ("bias", {"attention_qkv": True}),
    "proj": ("proj", {}), "partial": ("partial", {"vision_blocks": 1, "text_blocks": 1}),
    "adapter-attn": ("adapter-attn", {"hidden": 4}), "adapter-ffn": ("adapter-ffn", {"hidden": 4}),
    "vop": ("vop", {"n_text": 2, "n_video": 3}), "vop-depth1": ("vop", {"n_text": 2, "n_video": 2, "depth": 1}),
    "vop-textonly": ("vop", {"n_text": 2, "n_video": 0}),
    "vop-modelscope": ("vop", {"n_text": 3, "n_video": 2, "semantics": "modelscope", "n_text_suffix": 1}),
    "vop-p": ("vop-p", {"n_text": 2, "n_video": 3, "n_position": 2}),
    "vop-c": ("vop-c", {"n_text": 2, "n_video": 3, "n_context": 2, "context_hidden": 8}),
    "vop-f": ("vop-f", {"n_text": 2, "n_video": 2, "ks": 2}),
    "vop-f-ks0": ("vop-f", {"n_text": 2, "n_video": 2, "ks": 0}),
    "vop-fp": ("vop-fp", {"n_text": 2, "n_video": 3, "n_position": 1, "ks": 1}),
    "vop-fc": ("vop-fc", {"n_text": 2, "n_video": 3, "n_context": 1, "context_hidden": 8, "ks": 2}),
}
FRAMES = 3


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    video = torch.randn(2, FRAMES, 3, 32, 32, generator=g)
    tokens = torch.zeros(2, 10, dtype=torch.long)
    tokens[:, 0] = 62
    tokens[0, 1:5] = torch.tensor([5, 9, 11, 3])
    tokens[0, 5] = 63
    tokens[1, 1:8] = torch.tensor([7, 8, 20, 21, 22, 40, 41])
    tokens[1, 8] = 63
    return video, tokens


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    video, tokens = inputs()
    save_file({"video": video, "tokens": tokens}, str(out / "inputs.safetensors"))
    save_file({k: v.contiguous() for k, v in build_clip(MICRO, seed=0).state_dict().items()}, str(out / "backbone.safetensors"))
    expected = {}
    for case, (method, opts) in CASES.items():
        model = create_model(method, build_clip(MICRO, seed=0), frames=FRAMES, **opts).eval()
        g = torch.Generator().manual_seed(sum(map(ord, case)))
        with torch.no_grad():
            for _, p in model.named_trainable_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            expected[f"{case}.text"] = model.encode_text(tokens).contiguous()
            expected[f"{case}.video"] = model.encode_video(video).contiguous()
        save_checkpoint(model, out / f"{case}.safetensors")
    save_file(expected, str(out / "expected.safetensors"))
    (out / "cases.json").write_text(json.dumps({k: {"method": m, "options": o} for k, (m, o) in CASES.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
