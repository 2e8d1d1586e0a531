"""PE-Core and EVA02-CLIP against open_clip 3.3.0 / timm 1.0.31, code nobody here wrote (tests/reference_models.py).

- parity: open_clip's own model of a shipped config (tiny sizes, random weights, every tensor drawn), saved as
  open_clip saves it (.pt, .safetensors), loaded by ``vop.load_clip`` (plain and with ``arch=``): image and text
  embeddings equal within 1e-5 (fp32, L2-normalised), logit scale equal; one real-size config (EVA02-B-16);
- every shipped config at real size on the meta device: open_clip's tensors, converted, are exactly vop's
  tensors for the record (names and shapes), parameter counts as the spec's table;
- RoPE tables equal to timm's and to the spec's formula, max |diff| 0.0;
- what no tensor shows, per record and tower: activation, LayerNorm epsilon, attention-pool heads, read-out,
  context, preprocessing, as open_clip/timm construct them;
- PE's original checkpoint layout, save/load round trips, the loader's family recognition and refusals.
"""
import copy
import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference_models as R
from vop.backbone import load_clip, save_clip
from vop.backbone.clip import CLIP
from vop.backbone.config import CLIP_MEAN, CLIP_STD, get_arch, infer_config, parameter_count, refused_reason
from vop.backbone.layers import rope_angles
from vop.errors import CheckpointError, ConfigError
from vop import formats

SHIPPED = {"PE-Core-B-16": "pe-core-tiny", "EVA02-B-16": "eva02-tiny", "PE-Core-L-14-336": "pe-core-tiny",
           "EVA02-L-14": "eva02-tiny", "EVA02-L-14-336": "eva02-tiny", "PE-Core-T-16-384": "pe-core-tiny",
           "PE-Core-S-16-384": "pe-core-tiny"}
# the spec's table (docs/methods.md, Backbones): image tower, text tower, all (with the logit scale)
COUNTS = {"PE-Core-B-16": (93_673_984, 353_986_560, 447_660_545), "EVA02-B-16": (86_263_040, 63_428_096, 149_691_137),
          "PE-Core-L-14-336": (317_152_256, 353_986_560, 671_138_817),
          "EVA02-L-14": (304_105_152, 123_650_304, 427_755_457), "EVA02-L-14-336": (304_432_832, 123_650_304, 428_083_137),
          "PE-Core-T-16-384": (6_141_056, 63_405_056, 69_546_113), "PE-Core-S-16-384": (23_783_168, 63_405_056, 87_188_225)}
TOL = 1e-5


def _inputs(ctx: int, size: int = 32, n: int = 3):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, size, size, generator=g)
    tokens = torch.randint(1, 49405, (n, ctx), generator=g)
    tokens[:, 0] = 49406
    ends = [5, ctx - 1, min(12, ctx - 2)][:n]
    for row, end in enumerate(ends):  # [EOT] early, last, in the middle; zero padding after it
        tokens[row, end] = 49407
        tokens[row, end + 1:] = 0
    return images, tokens


@torch.no_grad()
def _ours(model: CLIP, images, tokens):
    return F.normalize(model.encode_image(images), dim=-1), F.normalize(model.encode_text(tokens), dim=-1)


def _meta_clip(cfg) -> CLIP:
    with torch.device("meta"):
        return CLIP(cfg)


# ------------------------------------------------------------------------------------------------
# parity with open_clip's own models
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """{(config, suffix): (open_clip model, file)} at the tiny size, for every shipped config (each built by its
    own timm model function, at the tiny sizes)."""
    R.require_reference()
    d = tmp_path_factory.mktemp("open_clip")
    out = {}
    for name in SHIPPED:
        model = R.open_clip_model(name, tiny=True)
        for suffix in (".pt", ".safetensors"):
            out[name, suffix] = model, R.save_open_clip(model, d / f"{name}{suffix}")
    return out


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("name", sorted(SHIPPED))
@pytest.mark.parametrize("named", [False, True])
def test_embeddings_equal_open_clip(reference, name, suffix, named):
    ref, path = reference[name, suffix]
    arch = SHIPPED[name]
    model = load_clip(path, arch=arch if named else None).eval()
    assert model.cfg == get_arch(arch)  # recognised from the key patterns when not named
    images, tokens = _inputs(model.cfg.text.context_length)
    ri, rt = R.reference_embeddings(ref, images, tokens)
    oi, ot = _ours(model, images, tokens)
    assert (ri - oi).abs().max() < TOL and (rt - ot).abs().max() < TOL, ((ri - oi).abs().max(), (rt - ot).abs().max())
    assert model.logit_scale.item() == ref.logit_scale.item() and model.logit_bias is None


def test_the_parity_sees_a_wrong_epsilon_and_hardly_the_gelu_variant(reference):
    """A sanity check of the test itself: EVA02's image LayerNorms (1e-6) read with 1e-5 move the tiny embeddings
    far beyond the tolerance; PE's exact GELU read as tanh-GELU moves them by about the tolerance only, which is
    why the activations are asserted per record (test_what_no_tensor_shows)."""
    images, tokens = _inputs(77)
    ref, path = reference["EVA02-B-16", ".pt"]
    cfg = get_arch("eva02-tiny")
    wrong = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, eps=1e-5))
    ri, _ = R.reference_embeddings(ref, images, tokens)
    assert (ri - _ours(load_clip(path, arch=wrong).eval(), images, tokens)[0]).abs().max() > 10 * TOL
    ref, path = reference["PE-Core-B-16", ".pt"]
    cfg = get_arch("pe-core-tiny")
    tanh = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, act="gelu_tanh"))
    images, tokens = _inputs(32)
    ri, _ = R.reference_embeddings(ref, images, tokens)
    assert 0 < (ri - _ours(load_clip(path, arch=tanh).eval(), images, tokens)[0]).abs().max() < 20 * TOL


@pytest.mark.slow
def test_real_size_eva02_b16_equals_open_clip(tmp_path):
    """One shipped config at its real size (149,691,137 parameters, 224 px), saved as open_clip saves it. A minute
    on two CPU cores: run with VOP_REAL_SIZE_PARITY=1 (the tiny configs and the meta-device checks run always)."""
    if os.environ.get("VOP_REAL_SIZE_PARITY") != "1":
        pytest.skip("real-size parity (about a minute on CPU): set VOP_REAL_SIZE_PARITY=1 to run it")
    R.require_reference()
    ref = R.open_clip_model("EVA02-B-16")
    path = R.save_open_clip(ref, tmp_path / "EVA02-B-16.safetensors")
    model = load_clip(path).eval()
    assert model.cfg == get_arch("EVA02-B-16")
    images, tokens = _inputs(77, size=224, n=2)
    ri, rt = R.reference_embeddings(ref, images, tokens)
    oi, ot = _ours(model, images, tokens)
    assert (ri - oi).abs().max() < TOL and (rt - ot).abs().max() < TOL, ((ri - oi).abs().max(), (rt - ot).abs().max())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_real_size_tensors_are_open_clips(name):
    """open_clip's model of every shipped config on the meta device: its state dict, converted by vop.formats,
    has exactly the tensors (names, shapes) of vop's CLIP for the record; the counts are the spec's."""
    open_clip, _ = R.require_reference()
    from open_clip.model import CustomTextCLIP

    c = R.open_clip_config(name)
    with torch.device("meta"):
        ref = CustomTextCLIP(embed_dim=c["embed_dim"], vision_cfg=c["vision_cfg"], text_cfg=c["text_cfg"])
    sd, record = formats.canonical(ref.state_dict(), {})
    assert record is None
    ours = _meta_clip(get_arch(name))
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    vision = sum(p.numel() for p in ours.visual.parameters())
    total = sum(p.numel() for p in ours.parameters())
    assert (vision, total - vision - 1, total) == COUNTS[name]
    assert total == sum(p.numel() for p in ref.parameters()) == parameter_count(get_arch(name))
    assert infer_config(sd) == get_arch(name)  # the loader recognises it without arch=


# ------------------------------------------------------------------------------------------------
# RoPE tables
# ------------------------------------------------------------------------------------------------
def _formula(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's formula: D/4 frequencies theta_k = 1 / 10000^(k / (D/4)) per axis; patch (r, c): PE x = c + 1,
    y = r + 1, x first; EVA02 t = i / g * 16 (the 16 x 16 pretraining grid), y first; pair i rotated by angle i."""
    v = get_arch(name).vision
    g, nb = v.grid, v.head_dim // 4
    theta = 1.0 / 10000.0 ** (torch.arange(nb, dtype=torch.float32) / nb)
    r, c = (t.reshape(-1).float() for t in torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"))
    first, second = (c + 1, r + 1) if name.startswith("PE") else (r / g * 16, c / g * 16)
    angle = torch.cat([first[:, None] * theta, second[:, None] * theta], 1).repeat_interleave(2, -1)
    return angle.cos(), angle.sin()


_TIMM = {"PE-Core-B-16": "vit_pe_core_base_patch16_224", "PE-Core-L-14-336": "vit_pe_core_large_patch14_336",
         "PE-Core-T-16-384": "vit_pe_core_tiny_patch16_384", "PE-Core-S-16-384": "vit_pe_core_small_patch16_384",
         "EVA02-B-16": "eva02_base_patch16_clip_224", "EVA02-L-14": "eva02_large_patch14_clip_224",
         "EVA02-L-14-336": "eva02_large_patch14_clip_336"}


@pytest.mark.parametrize("name", sorted(_TIMM))
def test_rope_tables_equal_timm_and_the_formula(name):
    _, timm = R.require_reference()
    v = get_arch(name).vision
    cos, sin = rope_angles(v.grid, v.head_dim, v.rope_theta, v.rope_offset, v.rope_indexing, v.rope_ref_grid)
    trunk = timm.create_model(_TIMM[name], pretrained=False, num_classes=0, depth=1)  # the table needs no blocks
    t_sin, t_cos = trunk.rope.get_embed().chunk(2, -1)
    f_cos, f_sin = _formula(name)
    for ours, other in ((cos, t_cos), (sin, t_sin), (cos, f_cos), (sin, f_sin)):
        assert ours.shape == (v.num_patches, v.head_dim) and (ours - other).abs().max().item() == 0.0
    clip = CLIP(dataclasses.replace(get_arch("pe-core-tiny" if name.startswith("PE") else "eva02-tiny")))
    assert clip.visual.rope.cos.dtype == torch.float32


def test_rope_rows_are_per_patch_with_identity_rows_in_front():
    clip = CLIP(get_arch("pe-core-tiny"))
    m = clip.cfg.vision.num_patches
    cos, sin = clip.rope("visual", 1 + 5 + m)  # [CLS], 5 prompts, the patches
    assert torch.equal(cos[:6], torch.ones(6, cos.shape[1])) and torch.equal(sin[:6], torch.zeros(6, sin.shape[1]))
    assert torch.equal(cos[6:], clip.visual.rope.cos) and torch.equal(sin[6:], clip.visual.rope.sin)
    cos, sin = clip.rope("visual", 3 + 2 + 3 * m, tiles=3)  # VoP^F: F = 3 [CLS], 2 prompts, 3 frames of patches
    assert torch.equal(cos[5:], clip.visual.rope.cos.repeat(3, 1)) and torch.equal(cos[:5], torch.ones(5, cos.shape[1]))
    assert clip.rope("text", 10) is None and CLIP(get_arch("tiny")).rope("visual", 17) is None
    with pytest.raises(ValueError, match="cannot hold"):
        clip.rope("visual", m - 1)


# ------------------------------------------------------------------------------------------------
# what no tensor shows
# ------------------------------------------------------------------------------------------------
def _acts(module: nn.Module) -> set[str]:
    out = set()
    for m in module.modules():
        if isinstance(m, nn.GELU):
            out.add(f"gelu_{m.approximate}")
        elif isinstance(m, nn.SiLU):
            out.add("silu")
        elif type(m).__name__ == "QuickGELU":
            out.add("quick_gelu")
    return out


def _eps(module: nn.Module) -> set[float]:
    return {m.eps for m in module.modules() if isinstance(m, nn.LayerNorm)}


# per shipped record: (image-tower MLP, text MLP, image eps, text eps, pool heads, read-out, context, preprocessing)
_PE = ({"gelu_none"}, {"gelu_none"}, {1e-5}, {1e-5}, 8, "map", 32, ((0.5,) * 3, (0.5,) * 3, "squash", "bilinear"))
_EVA = ({"silu"}, {"gelu_none"}, {1e-6}, {1e-5}, None, "token", 77, (CLIP_MEAN, CLIP_STD, "crop", "bicubic"))
FACTS = {n: (_PE if n.startswith("PE") else _EVA) for n in SHIPPED}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_what_no_tensor_shows(name):
    """Activation (tanh vs exact GELU differ by ~2e-5, inside an embedding tolerance), epsilons, pool heads, read-out,
    context and preprocessing of each shipped record, per tower, as asserted facts and as open_clip/timm build them."""
    open_clip, _ = R.require_reference()
    from open_clip.model import CustomTextCLIP

    vision_act, text_act, veps, teps, pool_heads, readout, ctx, pre = FACTS[name]
    cfg = get_arch(name)
    ours = _meta_clip(cfg)
    c = R.open_clip_config(name)
    with torch.device("meta"):
        ref = CustomTextCLIP(embed_dim=c["embed_dim"], vision_cfg=c["vision_cfg"], text_cfg=c["text_cfg"])
    trunk = ref.visual.trunk
    blocks = lambda m: m.transformer.resblocks if hasattr(m, "transformer") else m.blocks  # noqa: E731
    assert _acts(blocks(ours.visual)) == vision_act == _acts(blocks(trunk))
    assert _acts(ours.transformer) == text_act == _acts(ref.text.transformer)
    assert _eps(ours.visual) == veps == _eps(trunk) and _eps(ours.transformer) | _eps(ours.ln_final) == teps == _eps(ref.text)
    assert cfg.vision.pool == readout == ("map" if trunk.attn_pool is not None else "token")
    if readout == "map":
        assert ours.visual.attn_pool.attn.heads == pool_heads == trunk.attn_pool.num_heads
        assert _acts(ours.visual.attn_pool) == {"gelu_none"} == _acts(trunk.attn_pool)
    assert cfg.text.context_length == ctx == ref.context_length and cfg.text.causal and cfg.text.pool == "argmax"
    p = cfg.vision.preprocess
    assert (p.mean, p.std, p.resize, p.interpolation) == pre and p.size == c["vision_cfg"]["image_size"]
    assert ours.visual.rope is not None and ours.visual.token_readout == (readout == "token")


def test_tiny_records_are_the_shipped_ones_but_for_sizes():
    size_fields = {"image_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "rope_ref_grid", "context_length"}
    for big, tiny in (("PE-Core-B-16", "pe-core-tiny"), ("EVA02-B-16", "eva02-tiny")):
        a, b = get_arch(big), get_arch(tiny)
        for tower in ("vision", "text"):
            x, y = dataclasses.asdict(getattr(a, tower)), dataclasses.asdict(getattr(b, tower))
            diff = {k for k in x if x[k] != y[k]} - size_fields
            assert not diff, (big, tower, diff)
        assert (a.family, a.act, a.logit_bias) == (b.family, b.act, b.logit_bias)


# ------------------------------------------------------------------------------------------------
# formats, records, refusals
# ------------------------------------------------------------------------------------------------
def _pe_original(ref) -> dict:
    """An open_clip PE model's weights in Meta's own layout (perception_models): OpenAI-style names, text at top
    level, ``visual.attn_pool.{probe, attn.in_proj_*, attn.out_proj, layernorm, mlp.c_fc, mlp.c_proj}``, ``visual.proj``
    (width x embed) without a bias (timm's _convert_pe, eva.py:1216-1283, read backwards)."""
    sd = ref.state_dict()
    out = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
    out["logit_scale"] = sd["logit_scale"]
    block = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "attn.in_proj_weight",
             "attn.qkv.bias": "attn.in_proj_bias", "attn.proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj"}
    t = {k[len("visual.trunk."):]: v for k, v in sd.items() if k.startswith("visual.trunk.")}
    for k, v in t.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            for a, b in block.items():
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            out[f"visual.transformer.resblocks.{i}.{rest}"] = v
    out.update({"visual.class_embedding": t["cls_token"].reshape(-1), "visual.positional_embedding": t["pos_embed"][0],
                "visual.conv1.weight": t["patch_embed.proj.weight"], "visual.proj": t["head.weight"].t().contiguous()})
    for a, b in (("norm_pre", "ln_pre"), ("norm", "ln_post"), ("attn_pool.proj", "attn_pool.attn.out_proj"),
                 ("attn_pool.norm", "attn_pool.layernorm"), ("attn_pool.mlp.fc1", "attn_pool.mlp.c_fc"),
                 ("attn_pool.mlp.fc2", "attn_pool.mlp.c_proj")):
        for kind in ("weight", "bias"):
            out[f"visual.{b}.{kind}"] = t[f"{a}.{kind}"]
    out["visual.attn_pool.probe"] = t["attn_pool.latent"]
    for kind in ("weight", "bias"):
        out[f"visual.attn_pool.attn.in_proj_{kind}"] = torch.cat([t[f"attn_pool.q.{kind}"], t[f"attn_pool.kv.{kind}"]])
    return out


def test_pe_original_checkpoint_loads(reference, tmp_path):
    """Meta's own .pt layout (wrapped, as its files are, in a dict with DataParallel prefixes): the same model, its
    projection bias zero (as timm's converter writes it)."""
    ref = copy.deepcopy(reference["PE-Core-B-16", ".pt"][0])
    with torch.no_grad():
        ref.visual.trunk.head.bias.zero_()
    sd = _pe_original(ref)
    assert "visual.proj_bias" not in sd and not any(k.startswith("visual.trunk") for k in sd)
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "PE-Core-B16-224.pt")
    assert formats.read_clip(tmp_path / "PE-Core-B16-224.pt").names == "pe-clip"
    model = load_clip(tmp_path / "PE-Core-B16-224.pt").eval()
    assert model.cfg == get_arch("pe-core-tiny") and torch.equal(model.visual.proj_bias, torch.zeros(48))
    images, tokens = _inputs(32)
    ri, rt = R.reference_embeddings(ref, images, tokens)
    oi, ot = _ours(model, images, tokens)
    assert (ri - oi).abs().max() < TOL and (rt - ot).abs().max() < TOL


@pytest.mark.parametrize("arch", ["pe-core-tiny", "eva02-tiny"])
def test_save_and_load_round_trip_is_bit_identical(arch, tmp_path):
    from vop.backbone import build_clip, weights_fingerprint

    clip = build_clip(arch, seed=3).eval()
    save_clip(clip, tmp_path / "w.safetensors")
    back = load_clip(tmp_path / "w.safetensors").eval()
    assert back.cfg == clip.cfg and weights_fingerprint(back) == weights_fingerprint(clip)
    images, tokens = _inputs(clip.cfg.text.context_length)
    for a, b in zip(_ours(clip, images, tokens), _ours(back, images, tokens)):
        assert torch.equal(a, b)
    assert CLIP.__name__ and clip.cfg.to_dict()["family"] == clip.cfg.family


def test_clip_records_and_keys_are_unchanged():
    """The new fields are written only where they differ from OpenAI's CLIP: old records, keys (and so weights
    fingerprints and prompt checkpoints' architectures) stay as they were."""
    cfg = get_arch("ViT-B-32-quickgelu")
    assert set(cfg.to_dict()) == {"embed_dim", "vision", "text", "act"}
    assert set(cfg.to_dict()["vision"]) == {"image_size", "patch_size", "width", "layers", "heads", "mlp_ratio"}
    assert cfg.key() == ('{"act": "quick_gelu", "embed_dim": 512, "text": {"context_length": 77, "heads": 8, "layers": 12, '
                         '"mlp_ratio": 4.0, "vocab_size": 49408, "width": 512}, "vision": {"heads": 12, "image_size": 224, '
                         '"layers": 12, "mlp_ratio": 4.0, "patch_size": 32, "width": 768}}')


def test_refusals_name_what_is_missing():
    for name, words in (("PE-Core-bigG-14-448", "class token"), ("EVA02-E-14", "post-norm"),
                        ("EVA02-E-14-plus", "post-norm"), ("EVA01-g-14", "EVA01"), ("ViT-B-16-SigLIP-i18n-256", "multilingual"),
                        ("ViT-SO400M-16-SigLIP-i18n-256", "multilingual"), ("ViT-SO400M-14-SigLIP-384", "378"),
                        ("nllb-clip-base-siglip", "NLLB")):
        assert words in refused_reason(name), name
        with pytest.raises(CheckpointError, match="does not support"):
            get_arch(name)
    # a class-less attention-pool tower that is not SigLIP's (no logit bias: PE-Core-bigG's layout) is refused
    sd = _meta_clip(get_arch("pe-core-tiny")).state_dict()
    sd.pop("visual.class_embedding")
    with pytest.raises(CheckpointError, match="without a class token"):
        infer_config(sd)


def test_a_family_file_of_unshipped_sizes_asks_for_arch():
    cfg = get_arch("eva02-tiny")
    odd = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, layers=3))
    with pytest.raises(CheckpointError, match="fit no shipped eva02 architecture.*arch="):
        infer_config(_meta_clip(odd).state_dict())
    with pytest.raises(CheckpointError, match="leave out heads= and act="):
        infer_config(_meta_clip(cfg).state_dict(), heads=(4, 2))


@pytest.mark.parametrize("bad, match", [
    ({"vision": {"rope": True, "heads": 64}}, "divisible by 4"),
    ({"vision": {"pool": "token", "class_token": False}}, "needs vision.class_token"),
    ({"vision": {"qkv_bias": "k"}}, "qkv_bias must be one of qkv, qv"),
    ({"vision": {"mean": [0.5, 0.5]}}, "vision.mean must be three numbers"),
    ({"vision": {"std": [0.5, 0.0, 0.5]}}, "vision.std"),
    ({"vision": {"resize": "pad"}}, "resize must be one of crop, squash"),
    ({"vision": {"eps": 0}}, "vision.eps"),
    ({"vision": {"ln_pre": 1}}, "ln_pre must be true or false"),
    ({"text": {"pool": "eos"}}, "text.pool must be one of argmax, last"),
    ({"family": "blip"}, "family must be one of"),
    ({"vision": {"proj": False, "width": 128}}, "embed_dim 64 must be the image tower.s width 128"),
    ({"vision": {"proj": False, "proj_bias": True}}, "proj_bias is a bias on the projection"),
    ({"text": {"tokenizer": "bert"}}, "text.tokenizer must be one of clip, gemma, t5"),
])
def test_records_are_checked_before_anything_is_built(bad, match):
    from vop.backbone.config import CLIPConfig

    d = get_arch("tiny").to_dict()
    for k, v in bad.items():
        if isinstance(v, dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    with pytest.raises(ConfigError, match=match):
        CLIPConfig.from_dict(d)


def test_frozen_logit_scale_is_not_clamped_a_trained_one_is():
    clip = CLIP(get_arch("tiny"))
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(300.0))
    clip.requires_grad_(False)
    clip.clamp_logit_scale()
    assert clip.logit_scale.item() == pytest.approx(math.log(300.0))
    clip.logit_scale.requires_grad_(True)
    clip.clamp_logit_scale()
    assert clip.logit_scale.item() == pytest.approx(math.log(100.0))


def test_the_console_script_refuses_unsupported_families_cleanly():
    import os
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "vop")
    proc = subprocess.run([exe, "params", "--backbone", "PE-Core-bigG-14-448"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert "PE-Core-bigG-14-448" in proc.stderr and "class token" in proc.stderr
