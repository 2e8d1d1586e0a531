"""Every method on every backbone family (OpenAI's CLIP, PE-Core, EVA02-CLIP, SigLIP; tiny records), registry-driven.

- identity: under the options each method declares (``Expected.identity``: zero prompt tokens, zero-initialised
  adapters ...) its frame and text embeddings are the frozen backbone's bit for bit, on every family;
- the prompt rules of the build spec (backbones.md, section 4): video prompts after [CLS] with the identity
  rotation, the RoPE table indexed by patch (identity rows wherever tokens are inserted; VoP^F's joint layers:
  identity x (F + n) + the per-frame table tiled F times), the attention pool never seeing a prompt, VoP^F read
  out per frame on the frame's own tokens, VoP^C's frame summary, PE-Core's caption budget of 32 - n;
- a method that reads [CLS] by construction refuses PE-Core's attention-pool read-out and SigLIP's class-less
  tower, ``proj`` refuses SigLIP's image tower without a projection (a ConfigError naming why), as ``vop params``
  lists them;
- SigLIP's prompt rules: video prompts at index 0 (no [CLS]), the pool over the frozen patches only, VoP^C's
  summary the patch mean, VoP^F's joint layers without a class token; the text keeps its 64 positions (the slot on
  top, read at the last position), ``max_text_tokens`` 64 whatever n_text;
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
FAMILIES = ["tiny", "pe-core-tiny", "eva02-tiny", "siglip-tiny"]
F_ = 3
#: why each refusing method refuses, per family (what the ConfigError says)
REFUSALS = {"reads_cls": "it reads the image tower at its \\[CLS\\]", "proj": "this image tower has none",
            "rope": "rotates each patch by its position"}


@pytest.fixture(scope="module")
def clips(siglip_tokenizer):
    return {a: build_clip(a, seed=0, tokenizer=siglip_tokenizer if a.startswith("siglip") else None).eval()
            for a in FAMILIES}


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
        # TempMe's token merging on a RoPE tower; a read-out at [CLS] on an attention pool; SigLIP has no projection
        kind = "rope" if method == "tempme" and clip.cfg.vision.rope else "reads_cls" if cls.reads_cls else method
        with pytest.raises(ConfigError, match=f"cannot run on this backbone: .*{REFUSALS[kind]}"):
            create_model(method, clip, frames=F_)
        assert (arch, kind) in {("pe-core-tiny", "reads_cls"), ("siglip-tiny", "reads_cls"), ("siglip-tiny", "proj"),
                                ("pe-core-tiny", "rope"), ("eva02-tiny", "rope")}
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


@pytest.mark.parametrize("arch", ["pe-core-tiny", "eva02-tiny", "siglip-tiny"])
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
# SigLIP: class-less MAP image tower, bidirectional text read at its last position
# ------------------------------------------------------------------------------------------------
def test_siglip_video_prompts_sit_at_index_0_and_never_reach_the_pool(clips):
    clip = clips["siglip-tiny"]
    v = clip.cfg.vision
    model = create_model("vop", clip, frames=F_, n_video=5).eval()
    calls, pooled, hooks = _record_calls(model.clip)
    seen = []
    hooks.append(model.clip.blocks("visual")[0].register_forward_pre_hook(lambda m, a: seen.append(a[0])))
    with torch.no_grad():
        model.encode_frames(_video(clip))
    for h in hooks:
        h.remove()
    assert [(t, r) for t, r in calls] == [(5 + v.num_patches, None)] * v.layers  # no [CLS], no RoPE
    shared = model.video_prompts.source.shared[0]
    assert torch.equal(seen[0][:, :5], shared.expand(2 * F_, -1, -1))  # the slot at index 0
    assert pooled == [(2 * F_, v.num_patches, v.width)]  # the pool reads the frozen patches only


def test_siglip_vop_f_joint_layers_and_per_frame_read_out(clips):
    clip = clips["siglip-tiny"]
    v = clip.cfg.vision
    model = create_model("vop-f", clip, frames=F_, n_video=4, ks=1).eval()
    calls, pooled, hooks = _record_calls(model.clip)
    with torch.no_grad():
        frames = model.encode_frames(_video(clip))
    for h in hooks:
        h.remove()
    assert calls[0][0] == 4 + v.num_patches  # layer 0 per frame: [4 prompts, patches]
    assert all(t == 4 + F_ * v.num_patches for t, _ in calls[1:])  # joint: [4 video prompts, F x M patches], no CLS
    assert pooled == [(2 * F_, v.num_patches, v.width)] and frames.shape == (2, F_, clip.cfg.embed_dim)


def test_siglip_vop_c_summarises_each_frame_by_its_patch_mean(clips):
    model = create_model("vop-c", clips["siglip-tiny"], frames=F_)
    src = model.video_prompts.source
    assert (model.video_prompts.prefix, src.prefix, src.patches) == (0, 0, 16)
    got = []
    orig = src.context.forward
    src.context.forward = lambda cls: got.append(cls) or orig(cls)
    x = []
    hook = model.clip.blocks("visual")[0].register_forward_pre_hook(lambda m, a: x.append(a[0]))
    with torch.no_grad():
        model.encode_frames(_video(model.clip))
    hook.remove()
    first = x[0][:, -16:].mean(1).view(2, F_, -1)  # layer 0's input: the summary is the mean of its 16 patches
    n = src.shared.shape[1] + model.opts.n_context
    assert x[0].shape[1] == n + 16 and torch.allclose(got[0], first)


@pytest.mark.parametrize("n_text", [0, 8, 20])
def test_siglip_text_keeps_its_64_positions_and_is_read_at_the_last(n_text, clips):
    clip = clips["siglip-tiny"]
    model = create_model("vop", clip, frames=F_, n_text=n_text, n_video=0).eval()
    assert model.max_text_tokens == 64  # whatever n_text: the slot comes on top of the context
    tokens = _tokens(model)
    assert tokens.shape == (2, 64) and (tokens[:, -1] == 0).all()  # padded with the file's pad id (0) to 64
    short = model.tokenizer(max_words=6)(["a red circle moving left and right again"])
    assert short.shape == (1, 64) and (short[0, 6:] == 0).all() and short[0, 5].item() == 1  # capped, EOS kept
    lengths = []
    hooks = [blk.register_forward_pre_hook(lambda m, a, k: lengths.append((a[0].shape[1], k.get("causal"))),
                                           with_kwargs=True) for blk in model.clip.blocks("text")]
    read = []
    hooks.append(model.clip.ln_final.register_forward_hook(lambda m, a, out: read.append(out.shape[1])))
    with torch.no_grad():
        emb = model.encode_text(tokens)
    for h in hooks:
        h.remove()
    assert lengths == [(64 + n_text, False)] * 2 and read == [64]  # bidirectional; the slot gone before ln_final
    if n_text == 0:
        assert torch.equal(emb, clip.encode_text(tokens))
    # the slot sits before the last position (index 1): the read-out is the caption's last token, not a prompt
    text = model.text_prompts
    if n_text:
        seen = []
        hook = model.clip.blocks("text")[1].register_forward_pre_hook(lambda m, a, k: seen.append(a[0]), with_kwargs=True)
        with torch.no_grad():
            model.encode_text(tokens)
        hook.remove()
        assert torch.equal(seen[0][:, 1:1 + n_text], text.tokens[1].expand(2, -1, -1))


def test_siglip_scores_use_the_logit_bias_and_training_does_not(clips):
    """Sigmoid match probabilities use exp(scale) * cos + bias; the contrastive loss (symmetric InfoNCE) is shift-
    invariant: the bias does not enter training."""
    import math

    clip = clips["siglip-tiny"]
    cos = torch.tensor([[0.3, -0.1], [0.05, 0.2]])
    want = torch.sigmoid(math.exp(clip.logit_scale.item()) * cos + clip.logit_bias.item())
    assert torch.allclose(clip.match_probability(cos), want)
    with pytest.raises(ValueError, match="no logit bias"):
        clips["tiny"].match_probability(cos)
    logits = clip.logits(cos)
    loss = lambda z: (torch.nn.functional.cross_entropy(z, torch.arange(2)) + torch.nn.functional.cross_entropy(z.t(), torch.arange(2))) / 2  # noqa: E731
    assert torch.allclose(loss(logits), loss(logits - clip.logit_bias))


def test_siglip_without_its_tokenizer_file_says_which_file_and_how(clips, tmp_path):
    clip = build_clip("siglip-tiny", seed=0)
    model = create_model("zeroshot", clip, frames=F_)
    with pytest.raises(ConfigError, match="tokenizer.json.*load_clip\\(path, tokenizer=.*model.tokenizer.*--tokenizer"):
        model.tokenizer()
    with pytest.raises(ConfigError, match="CLIP's BPE"):
        build_clip("tiny", tokenizer=tmp_path)


def test_siglip_prompt_checkpoint_records_its_tokenizer_file(clips, tmp_path, siglip_tokenizer):
    """A prompt checkpoint on SigLIP records the tokenizer file it was trained with; ``load_checkpoint`` reads it
    back from there (``tokenizer=`` wins), so the captions are tokenized as in training."""
    from vop.methods.checkpoint import load_checkpoint, save_checkpoint

    model = create_model("vop", clips["siglip-tiny"], frames=F_, n_text=2, n_video=2)
    save_checkpoint(model, tmp_path / "p.safetensors")
    back = load_checkpoint(tmp_path / "p.safetensors", "siglip-tiny")
    assert back.clip.tokenizer_file.resolve() == siglip_tokenizer.resolve()
    assert torch.equal(back.tokenizer()(["a red circle"]), model.tokenizer()(["a red circle"]))
    with pytest.raises(ConfigError, match="no such file"):
        load_checkpoint(tmp_path / "p.safetensors", "siglip-tiny", tokenizer=tmp_path / "gone.json")


# ------------------------------------------------------------------------------------------------
# the console script: counts, one real training step per family
# ------------------------------------------------------------------------------------------------
def _vop(*args, env=None, timeout=600):
    exe = os.path.join(os.path.dirname(sys.executable), "vop")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("backbone, vop_count, total", [("PE-Core-B-16", 270_336, 447_660_545),
                                                        ("EVA02-B-16", 122_880, 149_691_137),
                                                        ("ViT-B-16-SigLIP2", 147_456, 375_187_970)])
def test_vop_params_on_the_b_models(backbone, vop_count, total):
    proc = _vop("params", "--backbone", backbone, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in json.loads(proc.stdout)}
    assert rows["vop"]["paper_count"] == vop_count and rows["vop"]["backbone"] == total
    assert rows["vop-f"]["uncounted"] == 9_216
    refused = {m for m, r in rows.items() if r["unsupported"]}
    reads_cls = {m for m in rows if get_method(m).reads_cls}
    want = {"PE-Core-B-16": reads_cls, "EVA02-B-16": {"tempme"}, "ViT-B-16-SigLIP2": reads_cls | {"proj"}}[backbone]
    assert refused == want and {"dgl", "mv-adapter", "tempme"} <= reads_cls
    # LoRA everywhere, r(3d + d) per block: PE-Core-B-16's text tower is 1024 wide and 24 deep
    assert rows["lora"]["paper_count"] == {"PE-Core-B-16": 1_081_344, "EVA02-B-16": 491_520,
                                           "ViT-B-16-SigLIP2": 589_824}[backbone] and not rows["lora"]["unsupported"]


@pytest.mark.parametrize("arch", ["pe-core-tiny", "eva02-tiny", "siglip-tiny"])
def test_one_training_step_per_family(arch, world, tmp_path, siglip_tokenizer):
    """``vop train`` on the smoke world, stopped after its first optimiser step (the trainer's test hook); SigLIP
    with its tokenizer file (model.tokenizer), and refused cleanly without it."""
    from vop.engine.trainer import TEST_STOP_ENV

    out = tmp_path / "run"
    tok = [f"model.tokenizer={siglip_tokenizer}"] if arch.startswith("siglip") else []
    proc = _vop("train", "-q", f"data.root={world}", "data.dataset=collection", f"model.backbone={arch}", *tok,
                "model.method=vop", "model.frames=3", "optim.batch_size=8", "data.num_workers=0", "eval.batch_size=8",
                "optim.epochs=1", "checkpoint_every=1", f"out_dir={out}",
                env={**os.environ, TEST_STOP_ENV: "1"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 1
    if arch.startswith("siglip"):  # no tokenizer file: one line naming the file needed and how to give it
        bad = _vop("train", "-q", f"data.root={world}", "data.dataset=collection", f"model.backbone={arch}",
                   f"out_dir={tmp_path / 'bad'}")
        assert bad.returncode == 2 and "Traceback" not in bad.stdout + bad.stderr
        assert "model.tokenizer" in bad.stderr and "tokenizer.json" in bad.stderr and "--tokenizer" in bad.stderr
        return
    size_err = _vop("train", "-q", f"data.root={world}", "data.dataset=collection", f"model.backbone={arch}",
                    "model.image_size=64", f"out_dir={tmp_path / 'bad'}")
    assert size_err.returncode == 2 and "native 32 px only" in size_err.stderr and "Traceback" not in size_err.stderr


def test_the_console_script_reads_siglips_tokenizer_file_or_names_it(world, tmp_path, siglip_tokenizer):
    """``vop eval --method zeroshot`` on SigLIP weights alone in their folder: exit 2, one line naming the file needed
    (tokenizer.json) and how to give it (--tokenizer), no traceback; with ``--tokenizer`` it evaluates; a missing
    tokenizer file is named; a CLIP backbone refuses ``--tokenizer``."""
    import json as _json

    from vop.backbone import save_clip

    weights = tmp_path / "alone" / "siglip.safetensors"
    weights.parent.mkdir()
    save_clip(build_clip("siglip-tiny", seed=0), weights)
    common = ["eval", "-q", "--method", "zeroshot", "--dataset", "collection", "--root", str(world), "--frames", "2",
              "--num-workers", "0", "--batch-size", "8"]
    bad = _vop(*common, "--backbone", str(weights))
    assert bad.returncode == 2 and "Traceback" not in bad.stdout + bad.stderr, bad.stderr
    assert "tokenizer.json" in bad.stderr and "--tokenizer" in bad.stderr and bad.stderr.startswith("error:")
    missing = _vop(*common, "--backbone", str(weights), "--tokenizer", str(tmp_path / "nothere.json"))
    assert missing.returncode == 2 and "nothere.json: no such file" in missing.stderr
    assert "Traceback" not in missing.stdout + missing.stderr
    out = tmp_path / "m.json"
    ok = _vop(*common, "--backbone", str(weights), "--tokenizer", str(siglip_tokenizer), "--json", str(out))
    assert ok.returncode == 0, ok.stderr
    assert 0 <= _json.loads(out.read_text())["t2v"]["R1"] <= 100
    save_clip(build_clip("tiny", seed=0), tmp_path / "clip.safetensors")
    clip_tok = _vop(*common, "--backbone", str(tmp_path / "clip.safetensors"), "--tokenizer", str(siglip_tokenizer))
    assert clip_tok.returncode == 2 and "CLIP's BPE" in clip_tok.stderr and "Traceback" not in clip_tok.stderr


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
