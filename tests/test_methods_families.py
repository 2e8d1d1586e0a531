"""Every method on every backbone family (OpenAI's CLIP, PE-Core, EVA02-CLIP; tiny records), registry-driven.

- identity: under the options each method declares (``Expected.identity``: zero prompt tokens, zero-initialised
  adapters ...) its frame and text embeddings are the frozen backbone's bit for bit, on every family;
- the prompt rules of the build spec (backbones.md, section 4): video prompts after [CLS] with the identity
  rotation, the RoPE table indexed by patch (identity rows wherever tokens are inserted; VoP^F's joint layers:
  identity x (F + n) + the per-frame table tiled F times), the attention pool never seeing a prompt, VoP^F read
  out per frame on the frame's own tokens, VoP^C's frame summary, PE-Core's caption budget of 32 - n;
- a method that reads [CLS] by construction refuses PE-Core's attention-pool read-out (a ConfigError naming
  why), as ``vop params`` lists it;
- one real training step per family through ``vop train`` (the engine's step, the backbone's preprocessing).
"""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import vop
from vop.backbone import build_clip
from vop.backbone.config import get_arch
from vop.errors import ConfigError
from vop.methods import create_model, get_method, list_methods, plugin_of

METHODS = [m for m in list_methods() if plugin_of(m) is None]
FAMILIES = ["tiny", "pe-core-tiny", "eva02-tiny"]
F_ = 3


@pytest.fixture(scope="module")
def clips():
    return {a: build_clip(a, seed=0).eval() for a in FAMILIES}


def _video(clip, n=2):
    s = clip.cfg.vision.image_size
    return torch.randn(n, F_, 3, s, s, generator=torch.Generator().manual_seed(0))


def _tokens(model):
    return model.tokenizer()(["a red circle moving left", "the square turns blue, then the circle moves up"])


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_identity_options_give_the_frozen_backbone_bit_for_bit(method, arch, clips):
    clip = clips[arch]
    cls = get_method(method)
    why = cls.unsupported_backbone(clip.cfg)
    if why is not None:
        with pytest.raises(ConfigError, match="cannot run on this backbone: " + re.escape(why[:40])):
            create_model(method, clip, frames=F_)
        # the two reasons: a read-out at [CLS] on PE-Core's attention pool; TempMe's merging on RoPE towers
        assert (arch == "pe-core-tiny" and cls.reads_cls) or (method == "tempme" and clip.cfg.vision.rope)
        return
    options = cls.expected.identity_options(clip.cfg)
    assert options is not None, f"{method} declares no identity configuration (Expected.identity)"
    model = create_model(method, clip, frames=F_, **options).eval()
    zs = create_model("zeroshot", clip, frames=F_).eval()
    video = _video(clip)
    tokens = _tokens(zs)[:, : model.max_text_tokens]
    with torch.no_grad():
        assert torch.equal(model.encode_frames(video), zs.encode_frames(video))
        assert torch.equal(model.encode_text(tokens), zs.encode_text(tokens))
        if cls.expected.mean_pooled:
            assert torch.equal(model.encode_video(video), zs.encode_video(video))
        # and zero-shot is the plain backbone: frames one by one through encode_image
        frames = clip.encode_image(video.flatten(0, 1)).view(2, F_, -1)
        assert torch.allclose(zs.encode_frames(video), frames, atol=1e-6)


@pytest.mark.parametrize("arch", ["pe-core-tiny", "eva02-tiny"])
@pytest.mark.parametrize("method", ["vop", "vop-p", "vop-c", "vop-f", "vop-fp", "vop-fc", "adapter-attn", "cma", "lora"])
def test_prompts_and_adapters_act_on_every_family(method, arch, clips):
    """With their default options (non-zero prompts; cma's random up-projections) both embeddings move."""
    clip = clips[arch]
    opts = {"init_std": 0.5} if method == "cma" else {}
    model = create_model(method, clip, frames=F_, **opts).eval()
    if method in ("adapter-attn", "lora"):  # zero-initialised: give the up-projections (LoRA's B) values
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.2)
    zs = create_model("zeroshot", clip, frames=F_).eval()
    video, tokens = _video(clip), _tokens(model)
    with torch.no_grad():
        assert not torch.allclose(model.encode_frames(video), zs.encode_frames(video), atol=1e-4)
        assert not torch.allclose(model.encode_text(tokens), zs.encode_text(tokens[:, : zs.max_text_tokens]), atol=1e-4)


# ------------------------------------------------------------------------------------------------
# the prompt rules
# ------------------------------------------------------------------------------------------------
def _record_calls(clip):
    """Every visual block call's (token count, rope table) and every attention-pool input shape."""
    calls, pooled = [], []
    hooks = [blk.register_forward_pre_hook(lambda m, a, k: calls.append((a[0].shape[1], k.get("rope"))), with_kwargs=True)
             for blk in clip.blocks("visual")]
    if clip.visual.attn_pool is not None:
        hooks.append(clip.visual.attn_pool.register_forward_pre_hook(lambda m, a: pooled.append(tuple(a[0].shape))))
    return calls, pooled, hooks


@pytest.mark.parametrize("arch", ["pe-core-tiny", "eva02-tiny"])
def test_video_prompts_get_the_identity_rotation_and_never_reach_the_pool(arch, clips):
    model = create_model("vop", clips[arch], frames=F_, n_video=5).eval()
    v = model.clip.cfg.vision
    calls, pooled, hooks = _record_calls(model.clip)
    with torch.no_grad():
        model.encode_frames(_video(model.clip))
    for h in hooks:
        h.remove()
    rope = model.clip.visual.rope
    assert len(calls) == v.layers
    for tokens, (cos, sin) in calls:  # [CLS], 5 prompts, the patches
        assert tokens == 1 + 5 + v.num_patches
        assert torch.equal(cos[:6], torch.ones_like(cos[:6])) and torch.equal(sin[:6], torch.zeros_like(sin[:6]))
        assert torch.equal(cos[6:], rope.cos) and torch.equal(sin[6:], rope.sin)
    if arch == "pe-core-tiny":  # the attention pool reads [CLS] + patches, the frozen token set
        assert pooled == [(2 * F_, 1 + v.num_patches, v.width)]


@pytest.mark.parametrize("arch", ["pe-core-tiny", "eva02-tiny"])
def test_vop_f_joint_layers_tile_the_table_and_read_out_each_frame_on_its_own_tokens(arch, clips):
    clip = clips[arch]
    v = clip.cfg.vision
    model = create_model("vop-f", clip, frames=F_, n_video=4, ks=1).eval()
    calls, pooled, hooks = _record_calls(model.clip)
    video = _video(clip)
    with torch.no_grad():
        frames = model.encode_frames(video)
    for h in hooks:
        h.remove()
    rope = model.clip.visual.rope
    tokens, (cos, sin) = calls[0]  # layer 0: per frame, [CLS, 4 prompts, patches]
    assert tokens == 1 + 4 + v.num_patches and torch.equal(cos[5:], rope.cos)
    for tokens, (cos, sin) in calls[1:]:  # joint layers: [F CLS, 4 video prompts, F x M patches]
        assert tokens == F_ + 4 + F_ * v.num_patches
        assert torch.equal(cos[:F_ + 4], torch.ones_like(cos[:F_ + 4])) and torch.equal(sin[:F_ + 4], torch.zeros_like(sin[:F_ + 4]))
        assert torch.equal(cos[F_ + 4:], rope.cos.repeat(F_, 1)) and torch.equal(sin[F_ + 4:], rope.sin.repeat(F_, 1))
    if arch == "pe-core-tiny":  # one pool call over every frame's own [CLS_j, patches_j]
        assert pooled == [(2 * F_, 1 + v.num_patches, v.width)]
    assert frames.shape == (2, F_, clip.cfg.embed_dim)
    # each frame's embedding depends on the frame order (the frame position embedding), not only on its pixels
    with torch.no_grad():
        flipped = model.encode_frames(video.flip(1)).flip(1)
    assert not torch.allclose(frames, flipped, atol=1e-5)


def test_vop_c_reads_one_summary_token_per_frame(clips):
    """[CLS] on a tower that has one; the mean of the patches (prompts excluded) on a class-less tower."""
    from vop.backbone.clip import CLIP, frame_summary

    x = torch.randn(4, 1 + 3 + 16, 8)
    assert torch.equal(frame_summary(x, 1, 16), x[:, 0])
    assert torch.equal(frame_summary(x, 0, 16), x[:, 4:].mean(1))
    model = create_model("vop-c", clips["pe-core-tiny"], frames=F_)
    src = model.video_prompts.source
    assert (src.prefix, src.patches) == (1, 16)
    # a class-less attention-pool tower (SigLIP's layout; no shipped record yet): slot at 0, patch means
    cfg = get_arch("pe-core-tiny")
    classless = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, class_token=False))
    torch.manual_seed(0)
    clip = CLIP(classless).eval()
    m = create_model("vop-c", clip, frames=F_)
    assert (m.video_prompts.prefix, m.video_prompts.source.prefix) == (0, 0)
    zs, zero = create_model("zeroshot", clip, frames=F_), create_model("vop", clip, frames=F_, n_video=0, n_text=0)
    video = _video(clip)
    with torch.no_grad():
        assert m.encode_frames(video).shape == (2, F_, cfg.embed_dim)
        assert torch.equal(zero.encode_frames(video), zs.encode_frames(video))


def test_pe_core_caption_budget_is_its_context_minus_the_prompts(clips):
    model = create_model("vop", clips["pe-core-tiny"], frames=F_)
    assert model.max_text_tokens == 32 - 8 == 24
    tokens = model.tokenizer()(["word " * 60])
    assert tokens.shape == (1, 24) and tokens[0, -1].item() == 49407  # truncated, [EOT] kept last
    assert create_model("zeroshot", clips["pe-core-tiny"]).tokenizer().context_length == 32
    with pytest.raises(ConfigError, match="32-token text context"):
        create_model("vop", clips["pe-core-tiny"], n_text=30)


def test_modelscope_semantics_is_clip_only(clips):
    with pytest.raises(ConfigError, match="OpenAI's CLIP"):
        create_model("vop", clips["eva02-tiny"], semantics="modelscope")


def test_proj_and_bias_train_the_projection_biases(clips):
    proj = create_model("proj", clips["pe-core-tiny"])
    names = {n for n, _ in proj.named_trainable_parameters()}
    assert names == {"clip.visual.proj", "clip.visual.proj_bias", "clip.text_projection"}
    bias = {n for n, _ in create_model("bias", clips["eva02-tiny"]).named_trainable_parameters()}
    assert "clip.visual.proj_bias" in bias and "clip.visual.conv1.bias" not in bias
    assert not any(n.endswith(("q_bias", "v_bias")) for n in bias)
    qkv = {n for n, _ in create_model("bias", clips["eva02-tiny"], attention_qkv=True).named_trainable_parameters()}
    assert {n for n in qkv - bias} == {f"clip.visual.transformer.resblocks.{i}.attn.{b}_bias" for i in range(2)
                                       for b in "qv"} | {f"clip.transformer.resblocks.{i}.attn.in_proj_bias" for i in range(2)}


# ------------------------------------------------------------------------------------------------
# the console script: counts, one real training step per family
# ------------------------------------------------------------------------------------------------
def _vop(*args, env=None, timeout=600):
    exe = os.path.join(os.path.dirname(sys.executable), "vop")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("backbone, vop_count, total", [("PE-Core-B-16", 270_336, 447_660_545),
                                                        ("EVA02-B-16", 122_880, 149_691_137)])
def test_vop_params_on_the_b_models(backbone, vop_count, total):
    proc = _vop("params", "--backbone", backbone, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in json.loads(proc.stdout)}
    assert rows["vop"]["paper_count"] == vop_count and rows["vop"]["backbone"] == total
    assert rows["vop-f"]["uncounted"] == 9_216
    refused = {m for m, r in rows.items() if r["unsupported"]}
    assert refused == ({"dgl", "dgl-l", "mv-adapter", "tempme"} if backbone.startswith("PE") else {"tempme"})
    # PE-Core-B-16's text tower is 1024 wide and 24 deep: 12 x 4rd (d 768) + 24 x 4rd (d 1024)
    assert rows["lora"]["paper_count"] == (1_081_344 if backbone.startswith("PE") else 491_520) and not rows["lora"]["unsupported"]


@pytest.mark.parametrize("arch", ["pe-core-tiny", "eva02-tiny"])
def test_one_training_step_per_family(arch, world, tmp_path):
    """``vop train`` on the smoke world, stopped after its first optimiser step (the trainer's test hook)."""
    from vop.engine.trainer import TEST_STOP_ENV

    out = tmp_path / "run"
    proc = _vop("train", "-q", f"data.root={world}", "data.dataset=collection", f"model.backbone={arch}",
                "model.method=vop", "model.frames=3", "optim.batch_size=8", "data.num_workers=0", "eval.batch_size=8",
                "optim.epochs=1", "checkpoint_every=1", f"out_dir={out}",
                env={**os.environ, TEST_STOP_ENV: "1"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 1
    size_err = _vop("train", "-q", f"data.root={world}", "data.dataset=collection", f"model.backbone={arch}",
                    "model.image_size=64", f"out_dir={tmp_path / 'bad'}")
    assert size_err.returncode == 2 and "native 32 px only" in size_err.stderr and "Traceback" not in size_err.stderr


def test_backbone_configs_load_and_are_current():
    """configs/msrvtt-9k/<backbone>/*.yaml: every method that runs on the backbone, generated (current), valid."""
    import importlib.util
    from pathlib import Path

    from vop.engine.config import RunConfig, load_config
    from vop.engine.trainer import check_config

    root = Path(__file__).parent.parent / "configs"
    spec = importlib.util.spec_from_file_location("make_configs", root / "make_configs.py")
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    for name in mc.BACKBONE_DATASETS:
        for folder, (arch, _) in mc.BACKBONES.items():
            methods = mc.backbone_methods(folder)
            assert {p.name for p in (root / name / folder).glob("*.yaml")} == {f"{m}.yaml" for m in methods}
            assert ("dgl" in methods) == (arch == "EVA02-B-16") and "vop" in methods and "vop-f" in methods
            for method in methods:
                path = root / name / folder / f"{method}.yaml"
                assert path.read_text() == mc.render_backbone(name, method, folder), f"{path} is stale: run configs/make_configs.py"
                cfg = load_config(RunConfig, path, ["data.root=/data"])
                check_config(cfg)
                assert cfg.model.backbone_arch == arch and cfg.model.image_size == get_arch(arch).vision.image_size
