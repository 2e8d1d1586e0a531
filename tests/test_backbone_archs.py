"""Shipped architectures against open_clip's configs; head counts and activation read from tensors or named."""
import dataclasses

import pytest
import torch

import vop
from vop.backbone import CLIPTokenizer, load_clip, save_clip
from vop.backbone.checkpoint import to_openai
from vop.backbone.clip import CLIP
from vop.backbone.config import CLIPConfig, TextConfig, VisionConfig, get_arch, infer_config, list_archs, refused_reason
from vop.errors import CheckpointError, ConfigError

# open_clip's ViT configs (src/open_clip/model_configs, commit 89fb801): the ones our towers express ...
COVERED = """ViT-B-16 ViT-B-16-plus ViT-B-16-plus-240 ViT-B-16-quickgelu ViT-B-32 ViT-B-32-256 ViT-B-32-plus-256
ViT-B-32-quickgelu ViT-H-14 ViT-H-14-378 ViT-H-14-378-quickgelu ViT-H-14-quickgelu ViT-H-16 ViT-L-14 ViT-L-14-280
ViT-L-14-336 ViT-L-14-336-quickgelu ViT-L-14-quickgelu ViT-L-16 ViT-L-16-320 ViT-M-16 ViT-M-32 ViT-M-32-alt ViT-S-16
ViT-S-16-alt ViT-S-32 ViT-S-32-alt ViT-bigG-14 ViT-bigG-14-quickgelu ViT-e-14 ViT-g-14""".split()
# ... and the ones they do not, by the feature the error names
REFUSED = {
    # the SigLIP / SigLIP2 configs vop does not build (the other 23 ship: SIGLIP_SHIPPED, tests/test_backbone_siglip.py)
    "multilingual": "ViT-B-16-SigLIP-i18n-256 ViT-SO400M-16-SigLIP-i18n-256",
    "NaFlex": "ViT-B-16-SigLIP2-naflex ViT-SO400M-16-SigLIP2-naflex",
    "378": "ViT-SO400M-14-SigLIP-384",
    "no_ln_pre": "ViT-L-14-CLIPA ViT-L-14-CLIPA-336 ViT-H-14-CLIPA ViT-H-14-CLIPA-336 ViT-bigG-14-CLIPA ViT-bigG-14-CLIPA-336",
    "pool_type='eos'": """ViT-H-14-worldwide ViT-H-14-worldwide-378 ViT-H-14-worldwide-quickgelu ViT-L-14-worldwide
        ViT-L-14-worldwide-quickgelu ViT-bigG-14-worldwide ViT-bigG-14-worldwide-378""",
    "ls_init_value": "ViT-M-16-alt",
}

SIGLIP_SHIPPED = """ViT-B-16-SigLIP ViT-B-16-SigLIP-256 ViT-B-16-SigLIP-384 ViT-B-16-SigLIP-512 ViT-B-16-SigLIP2
    ViT-B-16-SigLIP2-256 ViT-B-16-SigLIP2-384 ViT-B-16-SigLIP2-512 ViT-B-32-SigLIP2-256 ViT-L-16-SigLIP-256
    ViT-L-16-SigLIP-384 ViT-L-16-SigLIP2-256 ViT-L-16-SigLIP2-384 ViT-L-16-SigLIP2-512 ViT-SO400M-14-SigLIP
    ViT-SO400M-14-SigLIP-378 ViT-SO400M-14-SigLIP2 ViT-SO400M-14-SigLIP2-378 ViT-SO400M-16-SigLIP2-256
    ViT-SO400M-16-SigLIP2-384 ViT-SO400M-16-SigLIP2-512 ViT-gopt-16-SigLIP2-256 ViT-gopt-16-SigLIP2-384""".split()

# Numbers as open_clip's config files write them: (image_size, patch, width, layers, head_width, mlp_ratio),
# (context, vocab, width, heads, layers), embed_dim, quick_gelu
OPEN_CLIP = {
    "ViT-B-32-quickgelu": ((224, 32, 768, 12, 64, 4.0), (77, 49408, 512, 8, 12), 512, True),
    "ViT-B-16-plus-240": ((240, 16, 896, 12, 64, 4.0), (77, 49408, 640, 10, 12), 640, False),
    "ViT-S-16-alt": ((224, 16, 384, 12, 64, 4.0), (77, 49408, 256, 4, 10), 256, False),
    "ViT-L-14-336": ((336, 14, 1024, 24, 64, 4.0), (77, 49408, 768, 12, 12), 768, False),
    "ViT-H-14": ((224, 14, 1280, 32, 80, 4.0), (77, 49408, 1024, 16, 24), 1024, False),
    "ViT-H-14-378-quickgelu": ((378, 14, 1280, 32, 80, 4.0), (77, 49408, 1024, 16, 24), 1024, True),
    "ViT-g-14": ((224, 14, 1408, 40, 88, 4.3637), (77, 49408, 1024, 16, 24), 1024, False),
    "ViT-bigG-14": ((224, 14, 1664, 48, 104, 4.9231), (77, 49408, 1280, 20, 32), 1280, False),
    "ViT-e-14": ((224, 14, 1792, 56, 112, 8.5715), (77, 49408, 1280, 20, 36), 1280, False),
}

# open_clip's docs/model_profile.csv: (all, image tower) parameters in millions
PROFILE = {"ViT-S-16-alt": (42.40, 21.76), "ViT-M-32-alt": (80.07, 39.63), "ViT-B-32": (151.28, 87.85),
           "ViT-B-16": (149.62, 86.19), "ViT-B-16-plus-240": (208.38, 117.21), "ViT-L-14-336": (427.94, 304.29),
           "ViT-H-14": (986.11, 632.08), "ViT-H-16": (986.26, 632.23), "ViT-g-14": (1366.68, 1012.65),
           "ViT-bigG-14": (2539.57, 1844.91), "ViT-e-14": (4581.09, 3807.72)}


def _meta(cfg: CLIPConfig) -> CLIP:
    with torch.device("meta"):
        return CLIP(cfg)


def _count(v, t, embed_dim) -> tuple[int, int]:
    """Parameters of an OpenAI-layout CLIP from open_clip's numbers: (all, image tower)."""
    size, patch, w, layers, _, ratio = v
    ctx, vocab, tw, _, tlayers = t

    def blocks(width, n, hidden):  # ln_1, in_proj, out_proj, ln_2, c_fc, c_proj
        return n * (2 * width + 3 * width * (width + 1) + width * (width + 1) + 2 * width
                    + hidden * (width + 1) + width * (hidden + 1))

    image = (3 * patch * patch * w + w + ((size // patch) ** 2 + 1) * w + 2 * w + blocks(w, layers, int(w * ratio))
             + 2 * w + w * embed_dim)
    text = vocab * tw + ctx * tw + blocks(tw, tlayers, 4 * tw) + 2 * tw + tw * embed_dim
    return image + text + 1, image


def test_every_open_clip_vit_is_covered_or_refused():
    refused = [n for names in REFUSED.values() for n in names.split()]
    assert len(COVERED) == 31 and len(refused) == 19 and not set(COVERED) & set(refused)
    assert set(COVERED) <= set(list_archs())
    # the 28 SigLIP / SigLIP2 configs of open_clip 3.3.0 (+ 2 NaFlex): 23 shipped, the rest refused with the reason
    assert len(SIGLIP_SHIPPED) == 23 and set(SIGLIP_SHIPPED) <= set(list_archs()) and not set(SIGLIP_SHIPPED) & set(refused)
    assert all(refused_reason(n) is None for n in SIGLIP_SHIPPED)
    for feature, names in REFUSED.items():
        for name in names.split():
            assert refused_reason(name) is not None, name
            with pytest.raises(CheckpointError, match="does not support") as e:
                get_arch(name)
            assert feature in str(e.value), name


@pytest.mark.parametrize("name", list(OPEN_CLIP))
def test_values_are_open_clips(name):
    (size, patch, w, layers, head_width, ratio), (ctx, vocab, tw, theads, tlayers), embed, quick = OPEN_CLIP[name]
    cfg = get_arch(name)
    v, t = cfg.vision, cfg.text
    assert (v.image_size, v.patch_size, v.width, v.layers, v.heads) == (size, patch, w, layers, w // head_width)
    assert v.mlp_width == int(w * ratio)  # open_clip: int(width * mlp_ratio)
    assert (t.context_length, t.vocab_size, t.width, t.heads, t.layers, t.mlp_width) == (ctx, vocab, tw, theads, tlayers, 4 * tw)
    assert cfg.embed_dim == embed and cfg.act == ("quick_gelu" if quick else "gelu")
    m = _meta(cfg)
    assert m.visual.transformer.resblocks[0].attn.heads == w // head_width and m.transformer.resblocks[0].attn.heads == theads
    total, image = _count(*OPEN_CLIP[name][:3])
    assert sum(p.numel() for p in m.parameters()) == total
    assert sum(p.numel() for p in m.visual.parameters()) == image


def test_headline_values():
    h, g = get_arch("ViT-H-14"), get_arch("ViT-bigG-14")
    assert (h.vision.heads, h.text.heads) == (16, 16)  # width // 64 would be 20
    assert (g.vision.width, g.vision.heads, g.vision.mlp_width, g.text.width, g.text.heads) == (1664, 16, 8192, 1280, 20)
    assert get_arch("ViT-B-32").act == "gelu" and get_arch("ViT-B/32-quickgelu").act == "quick_gelu"
    # OpenAI's own slash names mean OpenAI's released (QuickGELU) models, as clip.load does
    for openai, ours in (("ViT-B/32", "ViT-B-32-quickgelu"), ("vit-b/16", "ViT-B-16-quickgelu"),
                         ("ViT-L/14", "ViT-L-14-quickgelu"), ("ViT-L/14@336px", "ViT-L-14-336-quickgelu")):
        assert get_arch(openai) == get_arch(ours) and get_arch(openai).act == "quick_gelu"


@pytest.mark.parametrize("name", list(PROFILE))
def test_parameter_counts_match_open_clips_profile(name):
    m = _meta(get_arch(name))
    total, image = PROFILE[name]
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 2) == total
    assert round(sum(p.numel() for p in m.visual.parameters()) / 1e6, 2) == image


@pytest.mark.parametrize("name", list_archs())
def test_inference_gives_back_every_shipped_arch(name):
    cfg = get_arch(name)
    sd = _meta(cfg).state_dict()
    assert infer_config(sd, act=cfg.act) == cfg
    assert to_openai(dict(sd), {}, arch=name)[1] == cfg
    # the activation is not in the tensors: GELU only where every shipped arch of these shapes is GELU
    twin = name[: -len("-quickgelu")] if name.endswith("-quickgelu") else name + "-quickgelu"
    openai = {"ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"}
    if twin in list_archs() and twin.removesuffix("-quickgelu") not in openai and name.removesuffix("-quickgelu") not in openai:
        with pytest.raises(CheckpointError, match="differ only in the activation"):
            infer_config(sd)  # LAION (GELU) vs DFN/MetaCLIP (QuickGELU): refused, never guessed
        return
    default = infer_config(sd)
    if twin in list_archs():
        assert default == get_arch(twin if cfg.act == "gelu" else name) and default.act == "quick_gelu"
    else:
        assert default == cfg


def test_act_rule():
    assert infer_config(_meta(get_arch("ViT-B-32")).state_dict()).act == "quick_gelu"  # OpenAI's release loads as is
    assert infer_config(_meta(get_arch("ViT-H-16")).state_dict()).act == "gelu"  # no QuickGELU ViT-H-16 in open_clip
    assert infer_config(_meta(get_arch("ViT-g-14")).state_dict()).act == "gelu"
    with pytest.raises(CheckpointError, match="arch='ViT-H-14'"):  # LAION's GELU or DFN's QuickGELU: ask
        infer_config(_meta(get_arch("ViT-H-14")).state_dict())
    assert infer_config(_meta(get_arch("ViT-H-14")).state_dict(), act="gelu") == get_arch("ViT-H-14")
    assert infer_config(_meta(get_arch("ViT-H-16")).state_dict(), act="quick_gelu").act == "quick_gelu"


def test_heads_from_matching_towers_or_refused():
    h = get_arch("ViT-H-14")
    # ViT-H-14 fine-tuned at 336 px: no shipped arch, but both towers are ViT-H-14's
    at336 = dataclasses.replace(h, vision=dataclasses.replace(h.vision, image_size=336))
    got = infer_config(_meta(at336).state_dict())
    assert (got.vision.heads, got.text.heads, got.vision.image_size) == (16, 16, 336)
    # a 1280-wide image tower of another depth: ViT-H's 80-wide heads make width // 64 unsafe
    deeper = dataclasses.replace(h, vision=dataclasses.replace(h.vision, layers=12))
    with pytest.raises(CheckpointError, match=r"1280-wide 12-layer image tower.*16 heads of 80.*arch=.*backbone_arch.*heads="):
        infer_config(_meta(deeper).state_dict())
    assert infer_config(_meta(deeper).state_dict(), heads=(16, 16)).vision.heads == 16
    # unknown towers whose width is a multiple of 64 that no shipped tower contradicts: width // 64
    plain = CLIPConfig(embed_dim=64, vision=VisionConfig(image_size=32, patch_size=8, width=192, layers=1, heads=3),
                       text=TextConfig(width=320, heads=5, layers=1))
    assert infer_config(_meta(plain).state_dict()) == plain


def test_unsupported_tensors_are_named(tiny_clip):
    sd = tiny_clip.state_dict()
    cases = {
        "layer scale": {**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(64)},
        "no_ln_pre": {k: v for k, v in sd.items() if not k.startswith("visual.ln_pre.")},
        "timm image tower": {**sd, "visual.trunk.blocks.0.norm1.weight": torch.ones(64)},
        "attentional pooler": {**sd, "visual.attn_pool.query": torch.ones(4, 64)},
        "1000-token text vocabulary": {**sd, "token_embedding.weight": torch.zeros(1000, 64)},
    }
    for what, bad in cases.items():
        with pytest.raises(CheckpointError, match=what):
            infer_config(bad)


# ---------------------------------------------------------------------------------------------
# end to end: a small model with ViT-H's problem (80-wide heads, width not 64 x heads)


@pytest.fixture(scope="module")
def odd_heads(tmp_path_factory):
    """A Hugging Face CLIPModel with 5 image heads of 80 (width // 64 = 6) and 3 text heads of 96
    (width // 64 = 4), saved as HF-named safetensors without config.json and as a plain OpenAI-named
    state dict (what open_clip writes), neither with an architecture record."""
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPModel

    torch.manual_seed(0)
    hf = CLIPModel(HFConfig(
        text_config=dict(hidden_size=288, intermediate_size=1152, num_hidden_layers=2, num_attention_heads=3,
                         vocab_size=49408, max_position_embeddings=77, hidden_act="gelu"),
        vision_config=dict(hidden_size=400, intermediate_size=1600, num_hidden_layers=2, num_attention_heads=5,
                           image_size=32, patch_size=8, hidden_act="gelu"),
        projection_dim=64,
    )).eval()
    d = tmp_path_factory.mktemp("odd")
    hf.save_pretrained(d / "hf")
    (d / "hf.safetensors").write_bytes((d / "hf" / "model.safetensors").read_bytes())
    cfg = CLIPConfig(embed_dim=64, vision=VisionConfig(image_size=32, patch_size=8, width=400, layers=2, heads=5),
                     text=TextConfig(width=288, heads=3, layers=2), act="gelu")
    torch.save(load_clip(d / "hf").state_dict(), d / "plain.pt")
    return d, hf, cfg


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g), CLIPTokenizer()(["a dog jumps", "two cats on a red sofa", "x"])


def test_odd_heads_refused_then_loaded_exactly(odd_heads):
    d, hf, cfg = odd_heads
    images, tokens = _inputs()
    with torch.no_grad():
        ref_i = hf.get_image_features(pixel_values=images)
        ref_t = hf.get_text_features(input_ids=tokens)
    ref_i, ref_t = getattr(ref_i, "pooler_output", ref_i), getattr(ref_t, "pooler_output", ref_t)
    for f in (d / "hf.safetensors", d / "plain.pt"):
        with pytest.raises(CheckpointError, match=rf"{f.name}.*400-wide 2-layer image tower.*not a multiple of 64.*arch=.*heads="):
            load_clip(f)
        for m in (load_clip(f, arch=cfg), load_clip(f, heads=(5, 3), act="gelu")):
            assert m.cfg == cfg
            with torch.no_grad():
                assert torch.allclose(m.encode_image(images), ref_i, atol=1e-5), f
                assert torch.allclose(m.encode_text(tokens), ref_t, atol=1e-5), f
    # other head counts load without complaint but compute something else
    wrong = load_clip(d / "plain.pt", heads=(4, 4), act="gelu")
    with torch.no_grad():
        assert (wrong.encode_image(images) - ref_i).abs().max() > 1e-3
        assert (wrong.encode_text(tokens) - ref_t).abs().max() > 1e-3


def test_named_arch_must_fit_the_tensors(odd_heads, tiny_clip, tmp_path):
    d, _, cfg = odd_heads
    with pytest.raises(CheckpointError, match=r"plain\.pt: does not fit the architecture ViT-B-32.*named by arch=: "
                                              r"positional_embedding is of shape \(77, 288\), expected \(77, 512\)"):
        load_clip(d / "plain.pt", arch="ViT-B-32")
    with pytest.raises(CheckpointError, match="does not support.*multilingual"):
        load_clip(d / "plain.pt", arch="ViT-SO400M-16-SigLIP-i18n-256")
    with pytest.raises(CheckpointError, match=r"plain\.pt: does not fit the architecture ViT-SO400M-14-SigLIP \(siglip\)"):
        load_clip(d / "plain.pt", arch="ViT-SO400M-14-SigLIP")
    with pytest.raises(CheckpointError, match="not both"):
        load_clip(d / "plain.pt", arch=cfg, heads=(5, 3))
    # a file that records its architecture: arch= must agree on heads
    with pytest.raises(CheckpointError, match=r"records a .*5 heads.* not the .*1 heads"):
        load_clip(d / "hf", arch=dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, heads=1)))
    save_clip(tiny_clip, tmp_path / "tiny.safetensors")
    assert load_clip(tmp_path / "tiny.safetensors", arch="tiny").cfg == get_arch("tiny")
    # a plain tiny state dict: its towers are tiny's (2 heads of 32), not width // 64 = 1
    torch.save(tiny_clip.state_dict(), tmp_path / "tiny.pt")
    assert load_clip(tmp_path / "tiny.pt").cfg == get_arch("tiny")


def test_prompt_checkpoints_and_run_configs_carry_the_arch(odd_heads, tmp_path):
    from vop.engine.config import ModelConfig, RunConfig
    from vop.engine.trainer import check_config
    from vop.methods import resolve_backbone

    d, _, cfg = odd_heads
    clip = resolve_backbone(str(d / "plain.pt"), arch=cfg)
    assert clip.cfg == cfg
    model = vop.create_model("vop", clip, frames=2).eval()
    ckpt = vop.save_checkpoint(model, tmp_path / "p.safetensors")
    # the backbone file has no record of its heads: the checkpoint's is used
    again = vop.load_checkpoint(ckpt, str(d / "plain.pt")).eval()
    video, tokens = torch.randn(1, 2, 3, 32, 32), CLIPTokenizer(20)(["a dog jumps"])
    with torch.no_grad():
        assert torch.equal(again.encode_video(video), model.encode_video(video))
        assert torch.equal(again.encode_text(tokens), model.encode_text(tokens))
    with pytest.raises(CheckpointError, match=r"p\.safetensors: cannot load its backbone.*ViT-B-32\.pt: no such file"):
        vop.load_checkpoint(ckpt, str(tmp_path / "ViT-B-32.pt"))

    ok = RunConfig(model=ModelConfig(backbone=str(d / "plain.pt"), backbone_arch="ViT-H-14"))
    ok.data.root = str(tmp_path)
    check_config(ok)
    for model_cfg, msg in ((ModelConfig(backbone=str(d / "plain.pt"), backbone_arch="ViT-H-14-CLIPA"), "no_ln_pre"),
                           (ModelConfig(backbone="ViT-B-32", backbone_arch="ViT-H-14"), "an architecture already")):
        bad = RunConfig(model=model_cfg)
        bad.data.root = str(tmp_path)
        with pytest.raises(ConfigError, match=msg):
            check_config(bad)
