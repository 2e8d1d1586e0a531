"""SigLIP / SigLIP2 against code nobody here wrote: open_clip 3.3.0 / timm 1.0.31 (tests/reference_models.py) and
Hugging Face transformers' ``SiglipModel`` and tokenizers.

- parity: open_clip's own model of every shipped SigLIP config at tiny sizes (its timm function with smaller sizes,
  everything else as shipped), random weights, saved as open_clip saves it (.pt, .safetensors), loaded by
  ``vop.load_clip``: image and text embeddings within 1e-5 (fp32, L2-normalised), logit scale and bias equal;
  ``zeroshot`` on one-frame videos gives the image embedding;
- Hugging Face: a tiny ``SiglipModel`` saved with ``save_pretrained`` loads as a folder (and as a file with its
  config.json beside it); its tanh-GELU image tower read from config.json; NaFlex (``Siglip2Model``) refused;
- every shipped config at real size on the meta device: open_clip's tensors, converted, are vop's (names, shapes);
  counts as the spec's table; what no tensor shows (activation per tower and config, epsilons, pool heads and MLP,
  mask, read-out, tokenizer kind, preprocessing) as open_clip/timm build them; the GELU variant checked directly
  (its effect, ~2e-5, hides inside an embedding tolerance);
- the tokenizer: a tiny tokenizer.json (tests/tokenizer_files.py) gives open_clip's HFTokenizer's and transformers'
  ids; the cleaning is open_clip's canonicalize; the template, truncation, padding and refusals; a SentencePiece
  .model read through a stand-in ``sentencepiece``.
"""
import dataclasses
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference_models as R
import tokenizer_files as T
from vop import formats
from vop.backbone import build_clip, load_clip
from vop.backbone.clip import CLIP
from vop.backbone.config import get_arch, list_archs, parameter_count
from vop.backbone.tokenizer import FileTokenizer, canonicalize
from vop.errors import CheckpointError, ConfigError

TOL = 1e-5
#: every shipped SigLIP / SigLIP2 record (open_clip's English configs)
SIGLIP = sorted(n for n in list_archs() if "siglip" in n.lower() and n != "siglip-tiny")
# the spec's table (backbones.md, sections 3 and 5): image tower, text tower, all (with the logit scale and bias)
COUNTS = {"ViT-B-16-SigLIP2": (92_884_224, 282_303_744, 375_187_970), "ViT-B-16-SigLIP": (92_884_224, 110_271_744, 203_155_970)}
# basic VoP (8 + 8 tokens per layer): the spec's section 5
VOP_COUNTS = {"ViT-B-16-SigLIP2": 147_456, "ViT-L-16-SigLIP2-256": 393_216, "ViT-SO400M-14-SigLIP2": 497_664,
              "ViT-SO400M-16-SigLIP2-256": 497_664}
# the image tower's activation in timm (vision_transformer.py:4318-4481): exact GELU unless act_layer='gelu_tanh'
TANH_VISION = {"ViT-B-32-SigLIP2-256", "ViT-L-16-SigLIP2-512", "ViT-SO400M-16-SigLIP2-256", "ViT-SO400M-16-SigLIP2-384",
               "ViT-SO400M-16-SigLIP2-512", "ViT-gopt-16-SigLIP2-256", "ViT-gopt-16-SigLIP2-384"}


def _tiny(name: str):
    """The shipped record of ``name`` at the tiny sizes of tests/reference_models.py (all else as shipped)."""
    c = get_arch(name)
    v = dataclasses.replace(c.vision, image_size=32, patch_size=8, width=64, layers=2, heads=2)
    t = dataclasses.replace(c.text, vocab_size=R.TINY_VOCAB, width=64, heads=2, layers=2)
    return dataclasses.replace(c, embed_dim=64, vision=v, text=t)


def _inputs(ctx: int, n: int = 3, size: int = 32):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, size, size, generator=g)
    tokens = torch.randint(2, R.TINY_VOCAB, (n, ctx), generator=g)
    for row, end in enumerate([5, ctx - 1, min(12, ctx - 2)][:n]):  # EOS (1) then pads (0), as SigLIP2's tokenizer
        tokens[row, end] = 1
        tokens[row, end + 1:] = 0
    return images, tokens


@torch.no_grad()
def _ours(model: CLIP, images, tokens):
    return F.normalize(model.encode_image(images), dim=-1), F.normalize(model.encode_text(tokens), dim=-1)


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------
# parity with open_clip
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    R.require_reference()
    d = tmp_path_factory.mktemp("siglip")
    out = {}
    for name in SIGLIP:
        model = R.open_clip_model(name, tiny=True)
        suffixes = (".pt", ".safetensors") if name == "ViT-B-16-SigLIP2" else (".safetensors",)
        for suffix in suffixes:
            out[name, suffix] = model, R.save_open_clip(model, d / f"{name}{suffix}")
    return out


@pytest.mark.parametrize("name", SIGLIP)
def test_embeddings_equal_open_clip(reference, name):
    ref, path = reference[name, ".safetensors"]
    model = load_clip(path, arch=_tiny(name)).eval()
    images, tokens = _inputs(model.cfg.text.context_length)
    ri, rt = R.reference_embeddings(ref, images, tokens)
    oi, ot = _ours(model, images, tokens)
    assert _diff(ri, oi) < TOL and _diff(rt, ot) < TOL, (_diff(ri, oi), _diff(rt, ot))
    assert model.logit_scale.item() == ref.logit_scale.item() and model.logit_bias.item() == ref.logit_bias.item()
    assert model.logit_scale.shape == () == model.logit_bias.shape


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_siglip2_b16_is_recognised_from_its_tensors(reference, suffix):
    """Without arch=: the family from the key patterns (attention pool, no [CLS], logit bias, biased text
    projection), the record from the sizes (the tiny ViT-B-16-SigLIP2 is the shipped siglip-tiny)."""
    ref, path = reference["ViT-B-16-SigLIP2", suffix]
    assert formats.read_clip(path).names == "open-clip-timm"
    model = load_clip(path).eval()
    assert model.cfg == get_arch("siglip-tiny") == _tiny("ViT-B-16-SigLIP2")
    images, tokens = _inputs(64)
    ri, rt = R.reference_embeddings(ref, images, tokens)
    oi, ot = _ours(model, images, tokens)
    assert _diff(ri, oi) < TOL and _diff(rt, ot) < TOL
    # the dual encoder's scores: open_clip's get_logits (exp(scale) * cos + bias)
    with torch.no_grad():
        want, _ = ref.get_logits(images, tokens)
    assert torch.allclose(model.logits(oi @ ot.t()), want, atol=1e-4)
    # zero-shot on one-frame videos is the image tower
    from vop.methods import create_model

    zs = create_model("zeroshot", model, frames=1)
    with torch.no_grad():
        assert _diff(F.normalize(zs.encode_video(images[:, None]), dim=-1), ri) < TOL
        assert _diff(F.normalize(zs.encode_text(tokens), dim=-1), rt) < TOL


def test_sizes_no_record_has_are_refused_naming_arch(tmp_path):
    """A SigLIP file whose sizes fit no shipped record (here: siglip-tiny with 3 image layers) is refused, naming
    arch= and what its tensors cannot show; arch= loads it. Every shipped record is told apart by its shapes."""
    from vop.backbone.config import resolve_config

    cfg = get_arch("siglip-tiny")
    odd = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, layers=3))
    sd = CLIP(odd).state_dict()
    import safetensors.torch

    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match="odd.safetensors: these siglip weights .*layers 3.* fit no shipped siglip "
                                              "architecture .*attention-pool heads, the GELU of each tower.*arch="):
        load_clip(tmp_path / "odd.safetensors")
    assert load_clip(tmp_path / "odd.safetensors", arch=odd).cfg == odd
    for name in SIGLIP:
        with torch.device("meta"):
            assert resolve_config(CLIP(get_arch(name)).state_dict(), None) == get_arch(name), name


def test_the_gelu_variant_hides_inside_the_tolerance_and_is_asserted_per_config(reference):
    """The image tower's exact GELU (open_clip's B/16) read as tanh-GELU moves the tiny embeddings by a few 1e-5
    or less: why the activation of every record is asserted directly (test_what_no_tensor_shows, test_gelu_...)."""
    ref, path = reference["ViT-B-16-SigLIP2", ".safetensors"]
    cfg = _tiny("ViT-B-16-SigLIP2")
    tanh = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, act="gelu_tanh"))
    images, tokens = _inputs(64)
    ri, _ = R.reference_embeddings(ref, images, tokens)
    assert 0 < _diff(ri, _ours(load_clip(path, arch=tanh).eval(), images, tokens)[0]) < 20 * TOL


@pytest.mark.parametrize("name", SIGLIP)
def test_gelu_variant_of_each_record_is_timms_and_open_clips(name):
    """The activation each tower applies, on numbers where the two GELUs differ (> 1e-4): the record's module
    computes timm's image-tower act_layer and open_clip's text act, exactly."""
    _, timm = R.require_reference()
    from timm.models import vision_transformer as vt

    c = R.open_clip_config(name)
    fn = c["vision_cfg"]["timm_model_name"]
    with torch.device("meta"):
        trunk = getattr(vt, fn)(pretrained=False, depth=1, num_classes=0)
    x = torch.linspace(-4, 4, 401)
    ours = CLIP(dataclasses.replace(_tiny(name)))
    mine_v, mine_t = ours.visual.transformer.resblocks[0].mlp.gelu, ours.transformer.resblocks[0].mlp.gelu
    theirs_v = trunk.blocks[0].mlp.act  # parameterless: it runs on CPU numbers
    tanh_text = c["text_cfg"].get("act_kwargs", {}).get("approximate") == "tanh"
    assert (F.gelu(x) - F.gelu(x, approximate="tanh")).abs().max() > 1e-4  # the check can tell them apart
    assert torch.equal(mine_v(x), theirs_v(x)) and torch.equal(ours.visual.attn_pool.mlp.gelu(x), theirs_v(x))
    assert torch.equal(mine_t(x), F.gelu(x, approximate="tanh" if tanh_text else "none"))
    assert torch.equal(theirs_v(x), F.gelu(x, approximate="tanh" if name in TANH_VISION else "none"))
    assert ("SigLIP2" in name) == tanh_text


# ------------------------------------------------------------------------------------------------
# real sizes on the meta device
# ------------------------------------------------------------------------------------------------
def _open_clip_meta(name: str):
    from open_clip.model import CustomTextCLIP

    c = R.open_clip_config(name)
    with torch.device("meta"):
        return CustomTextCLIP(embed_dim=c["embed_dim"], vision_cfg=c["vision_cfg"], text_cfg=c["text_cfg"],
                              init_logit_bias=c["init_logit_bias"]), c


@pytest.mark.parametrize("name", SIGLIP)
def test_real_size_tensors_and_counts_are_open_clips(name):
    R.require_reference()
    ref, _ = _open_clip_meta(name)
    sd, record = formats.canonical(ref.state_dict(), {})
    assert record is None
    cfg = get_arch(name)
    with torch.device("meta"):
        ours = CLIP(cfg)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    total = sum(p.numel() for p in ref.parameters())
    assert parameter_count(cfg) == total == sum(p.numel() for p in ours.parameters())
    if name in COUNTS:
        vision = sum(p.numel() for p in ref.visual.parameters())
        text = sum(p.numel() for p in ref.text.parameters())
        assert (vision, text, total) == COUNTS[name]
        assert ours.visual.proj is None and sum(p.numel() for p in ours.visual.parameters()) == vision
    if name in VOP_COUNTS:
        from vop.methods import create_model

        with torch.device("meta"):
            clip = CLIP(cfg)
            assert create_model("vop", clip, frames=12).parameter_counts()["counted"] == VOP_COUNTS[name]
            assert create_model("vop-f", clip, frames=12).parameter_counts()["uncounted"] == 12 * cfg.vision.width


def _acts(module: nn.Module) -> set[str]:
    """The GELUs of a module: torch's (its ``approximate``) and timm's own classes (GELUTanh, GELU)."""
    out = set()
    for m in module.modules():
        if isinstance(m, nn.GELU):
            out.add(f"gelu_{m.approximate}")
        elif type(m).__name__ in ("GELUTanh", "GELU"):
            out.add("gelu_tanh" if type(m).__name__ == "GELUTanh" else "gelu_none")
    return out


def _eps(module: nn.Module) -> set[float]:
    return {m.eps for m in module.modules() if isinstance(m, nn.LayerNorm)}


@pytest.mark.parametrize("name", SIGLIP)
def test_what_no_tensor_shows(name):
    """Per record and tower, as open_clip/timm build the real-size model: activation, LayerNorm epsilon, pool heads
    and MLP width and activation, no causal mask, read-out at the last position, context, tokenizer kind,
    preprocessing (open_clip's _slpcfg: mean = std = 0.5, bicubic squash)."""
    R.require_reference()
    ref, c = _open_clip_meta(name)
    cfg = get_arch(name)
    with torch.device("meta"):
        ours = CLIP(cfg)
    trunk = ref.visual.trunk
    assert _acts(ours.visual.transformer) == _acts(trunk.blocks) == {"gelu_tanh" if name in TANH_VISION else "gelu_none"}
    assert _acts(ours.visual.attn_pool) == _acts(trunk.attn_pool) == _acts(trunk.blocks)
    assert _acts(ours.transformer) == _acts(ref.text.transformer)
    assert _eps(ours.visual) == _eps(trunk) == {1e-6} == _eps(ours.transformer) | _eps(ours.ln_final) == _eps(ref.text)
    pool = ours.visual.attn_pool
    assert pool.attn.heads == trunk.attn_pool.num_heads == cfg.vision.heads
    assert pool.mlp.c_fc.out_features == trunk.attn_pool.mlp.fc1.out_features
    assert trunk.cls_token is None and not cfg.vision.class_token and trunk.attn_pool.latent_len == 1
    t = cfg.text
    assert ref.text.attn_mask is None and not t.causal and ref.text.pool_type == "last" == t.pool
    assert t.context_length == c["text_cfg"]["context_length"] and t.tokenizer == ("gemma" if "SigLIP2" in name else "t5")
    assert isinstance(ref.text.text_projection, nn.Linear) and t.proj_bias and not cfg.vision.proj
    p = cfg.vision.preprocess
    assert (p.mean, p.std, p.resize, p.interpolation, p.size) == ((0.5,) * 3, (0.5,) * 3, "squash", "bicubic",
                                                                  c["vision_cfg"]["image_size"])


def test_tiny_record_is_the_shipped_b16_but_for_sizes():
    assert get_arch("siglip-tiny") == _tiny("ViT-B-16-SigLIP2")


# ------------------------------------------------------------------------------------------------
# Hugging Face SiglipModel
# ------------------------------------------------------------------------------------------------
def _hf_siglip(vision_act: str = "gelu_pytorch_tanh"):
    from transformers import SiglipConfig, SiglipModel

    cfg = SiglipConfig(
        text_config=dict(vocab_size=R.TINY_VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=None,
                         eos_token_id=1),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act=vision_act))
    torch.manual_seed(0)
    model = SiglipModel(cfg).eval()
    R.randomise(model, 0)
    return model


@pytest.mark.parametrize("vision_act, ours", [("gelu_pytorch_tanh", "gelu_tanh"), ("gelu", "gelu")])
def test_hugging_face_siglip_folder_equals_transformers(vision_act, ours, tmp_path):
    pytest.importorskip("transformers")
    hf = _hf_siglip(vision_act)
    hf.save_pretrained(tmp_path / "hf")
    model = load_clip(tmp_path / "hf").eval()
    assert formats.read_clip(tmp_path / "hf").names == "hf-siglip"
    assert model.cfg.vision.act == ours and model.cfg.text.act == "gelu_tanh"  # HF's text tower: tanh-GELU
    assert model.cfg == dataclasses.replace(get_arch("siglip-tiny"),
                                            vision=dataclasses.replace(get_arch("siglip-tiny").vision, act=ours))
    images, tokens = _inputs(64)
    with torch.no_grad():  # no attention_mask: SigLIP's text tower attends to its pads (as open_clip, big_vision)
        out = hf(input_ids=tokens, pixel_values=images)
    oi, ot = _ours(model, images, tokens)
    assert _diff(out.image_embeds, oi) < TOL and _diff(out.text_embeds, ot) < TOL
    assert model.logit_scale.item() == hf.logit_scale.item() and model.logit_bias.item() == hf.logit_bias.item()
    assert _diff(model.logits(ot @ oi.t()), out.logits_per_text) < 1e-4
    # the weights file alone, its config.json beside it
    alone = load_clip(tmp_path / "hf" / "model.safetensors").eval()
    assert alone.cfg == model.cfg


def test_hugging_face_refusals(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Siglip2Config, Siglip2Model

    cfg = Siglip2Config(text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_patches=16, patch_size=8))
    Siglip2Model(cfg).save_pretrained(tmp_path / "naflex")
    with pytest.raises(CheckpointError, match="NaFlex"):
        load_clip(tmp_path / "naflex")
    hf = _hf_siglip()
    hf.save_pretrained(tmp_path / "nohead")
    c = json.loads((tmp_path / "nohead" / "config.json").read_text())
    c["vision_config"]["vision_use_head"] = False
    (tmp_path / "nohead" / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="vision_use_head"):
        load_clip(tmp_path / "nohead")
    c["vision_config"]["vision_use_head"] = True
    c["vision_config"]["hidden_act"] = "relu"
    (tmp_path / "nohead" / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="hidden_act 'relu'"):
        load_clip(tmp_path / "nohead")


# ------------------------------------------------------------------------------------------------
# the tokenizer
# ------------------------------------------------------------------------------------------------
TEXTS = ["A red circle, moving LEFT!!", "the_square   turns blue -- then (the circle) moves up.", "&amp; caf\u00e9's dog",
         "word " * 80, "", "  Two   people: cooking food in a kitchen?  "]


def test_canonicalize_is_open_clips():
    R.require_reference()
    from open_clip.tokenizer import _clean_canonicalize

    for text in TEXTS + ["don't STOP_me now", "<b>bold</b> &lt;x&gt;", "tab\tand\nnewline", "\u00c9COLE \u2019quote\u2019"]:
        assert canonicalize(text) == _clean_canonicalize(text), text


def test_tokenizer_json_equals_open_clip_and_transformers(tmp_path):
    """A tiny tokenizer.json with SigLIP2's template (text, EOS): vop's ids are open_clip's HFTokenizer's (clean=
    'canonicalize', context 64) and transformers' (AutoTokenizer on the folder, max_length padding)."""
    R.require_reference()
    from open_clip.tokenizer import HFTokenizer
    from transformers import AutoTokenizer

    path = T.tiny_tokenizer(tmp_path / "tok")
    ours = FileTokenizer(path, "gemma", 64, vocab_size=R.TINY_VOCAB)(TEXTS)
    theirs = HFTokenizer(str(tmp_path / "tok"), context_length=64, clean="canonicalize")(TEXTS)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))([canonicalize(t) for t in TEXTS], padding="max_length",
                                                              max_length=64, truncation=True, return_tensors="pt")
    assert torch.equal(ours, theirs) and torch.equal(ours, hf.input_ids)
    assert ours.shape == (len(TEXTS), 64) and ours[3, -1].item() == 1  # truncated: EOS kept last
    assert ours[4, 0].item() == 1 and (ours[4, 1:] == 0).all()  # the empty text: EOS, then pads (0)
    eos_rows = [(row == 1).nonzero().flatten().tolist() for row in ours]
    assert all(len(r) == 1 for r in eos_rows)


def test_the_config_flags_win_over_the_files_template(tmp_path):
    """A tokenizer.json whose post-processor adds BOS while tokenizer_config.json says add_bos_token false,
    add_eos_token true (Gemma's layout under SigLIP2's settings): the config's template (text, then EOS), as
    open_clip's SigLipTokenizer builds Gemma's (add_bos_token=False, add_eos_token=True) and transformers 4's fast
    tokenizers rebuilt it (transformers 5 ignores the flags; SigLIP2's published tokenizer.json carries that template
    itself, so both agree on it): the ids are the file's own with BOS dropped and EOS appended."""
    path = T.tiny_tokenizer(tmp_path / "tok", template="<bos> $A")
    ours = FileTokenizer(path, "gemma", 64)(TEXTS[:3])
    tk = T.require_tokenizers().Tokenizer.from_file(str(path))
    for row, text in zip(ours, TEXTS[:3]):
        words = tk.encode(canonicalize(text), add_special_tokens=False).ids
        want = words + [1] + [0] * (64 - len(words) - 1)
        assert row.tolist() == want  # no BOS (2), EOS (1), pads (0)
    # without the config's flags, the file's own template
    path = T.tiny_tokenizer(tmp_path / "own", template="<bos> $A", add_eos_in_config=None)
    assert FileTokenizer(path, "gemma", 64)(["a dog"])[0, 0].item() == 2


def test_budget_caps_the_caption_inside_the_full_context(tmp_path):
    path = T.tiny_tokenizer(tmp_path / "tok")
    full = FileTokenizer(path, "gemma", 64)(["word " * 80])
    capped = FileTokenizer(path, "gemma", 64, budget=10)(["word " * 80])
    assert capped.shape == (1, 64) and capped[0, 9].item() == 1 and (capped[0, 10:] == 0).all()
    assert torch.equal(capped[0, :9], full[0, :9])


def test_tokenizer_file_refusals(tmp_path):
    T.require_tokenizers()
    with pytest.raises(ConfigError, match="no such file"):
        FileTokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ConfigError, match="bad.json: cannot be read by the tokenizers library"):
        FileTokenizer(tmp_path / "bad.json")
    path = T.tiny_tokenizer(tmp_path / "big", vocab_size=200)
    with pytest.raises(ConfigError, match="beyond the text tower's vocabulary of 10"):
        FileTokenizer(path, "gemma", 64, vocab_size=10)(["a red circle moving left"])
    nopad = T.tiny_tokenizer(tmp_path / "nopad")
    c = json.loads((tmp_path / "nopad" / "tokenizer_config.json").read_text())
    c.pop("pad_token")
    (tmp_path / "nopad" / "tokenizer_config.json").write_text(json.dumps(c))
    tk = json.loads(nopad.read_text())
    tk["model"]["vocab"] = [v for v in tk["model"]["vocab"] if v[0] != "<pad>"]
    tk["added_tokens"] = [a for a in tk["added_tokens"] if a["content"] != "<pad>"]
    nopad.write_text(json.dumps(tk))
    with pytest.raises(ConfigError, match="names no pad token"):
        FileTokenizer(nopad)


def test_sentencepiece_model_file_through_a_stand_in(tmp_path, monkeypatch):
    """A SentencePiece .model (not JSON): ids from sentencepiece, EOS appended, padded with the vocabulary's pad id
    (Gemma 0, T5 1: open_clip's SigLipTokenizer), truncated keeping EOS. ``sentencepiece`` is not a dependency: a
    stand-in module records what vop asks of it."""
    class Processor:
        def __init__(self, model_file):
            self.file = model_file

        def eos_id(self):
            return 1

        def encode(self, text):
            return [10 + len(w) for w in text.split()]

        def decode(self, ids):
            return " ".join("x" * (i - 10) for i in ids)

    monkeypatch.setitem(sys.modules, "sentencepiece", types.SimpleNamespace(SentencePieceProcessor=Processor))
    (tmp_path / "spiece.model").write_bytes(b"\x0a\x0b protobuf bytes")
    gemma = FileTokenizer(tmp_path / "spiece.model", "gemma", 8)(["A cat, sleeping!", "one two three four five six seven eight"])
    assert gemma.tolist() == [[11, 13, 18, 1, 0, 0, 0, 0], [13, 13, 15, 14, 14, 13, 15, 1]]
    t5 = FileTokenizer(tmp_path, "t5", 8)(["a cat"])  # a folder: its spiece.model
    assert t5.tolist() == [[11, 13, 1, 1, 1, 1, 1, 1]]
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    from vop.backbone import tokenizer as tokenizer_module
    from vop.errors import MissingDependencyError

    tokenizer_module._sp_tokenizer.cache_clear()  # the stand-in's processor is cached per file

    with pytest.raises(MissingDependencyError, match="pip install sentencepiece"):
        FileTokenizer(tmp_path / "spiece.model", "gemma", 8)


def test_without_the_tokenizers_package_the_error_names_the_pip_command(tmp_path, monkeypatch):
    """``tokenizers`` is no dependency of vop (an optional one: the ``siglip`` extra; transformers brings it)."""
    from vop.backbone import tokenizer as tokenizer_module
    from vop.errors import MissingDependencyError

    path = T.tiny_tokenizer(tmp_path / "tok")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    tokenizer_module._json_tokenizer.cache_clear()
    with pytest.raises(MissingDependencyError, match="needs the Python package 'tokenizers'.*pip install 'vop\\[siglip\\]' "
                                                     "\\(or pip install tokenizers"):
        FileTokenizer(path)
    tokenizer_module._json_tokenizer.cache_clear()


def test_load_clip_finds_the_tokenizer_beside_the_weights(tmp_path):
    """open_clip's and Hugging Face's model folders hold tokenizer.json next to the weights: found by itself;
    tokenizer= wins; a CLIP backbone refuses tokenizer=."""
    from vop.backbone import save_clip

    T.tiny_tokenizer(tmp_path / "model")
    save_clip(build_clip("siglip-tiny", seed=1), tmp_path / "model" / "siglip.safetensors")
    clip = load_clip(tmp_path / "model" / "siglip.safetensors")
    assert clip.tokenizer_file == tmp_path / "model" / "tokenizer.json"
    assert clip.tokenizer()(["a dog"]).shape == (1, 64)
    other = T.tiny_tokenizer(tmp_path / "other", vocab_size=150)
    assert load_clip(tmp_path / "model" / "siglip.safetensors", tokenizer=other).tokenizer_file == other
    with pytest.raises(CheckpointError, match="siglip.safetensors: tokenizer file .*nothere.json: no such file"):
        load_clip(tmp_path / "model" / "siglip.safetensors", tokenizer=tmp_path / "nothere.json")
    save_clip(build_clip("tiny", seed=1), tmp_path / "clip.safetensors")
    with pytest.raises(CheckpointError, match="CLIP's BPE"):
        load_clip(tmp_path / "clip.safetensors", tokenizer=other)
    alone = tmp_path / "alone"
    alone.mkdir()
    save_clip(build_clip("siglip-tiny", seed=1), alone / "w.safetensors")
    with pytest.raises(ConfigError, match="tokenizer.json"):
        load_clip(alone / "w.safetensors").tokenizer()


# ------------------------------------------------------------------------------------------------
# preprocessing from the record
# ------------------------------------------------------------------------------------------------
def test_frames_are_squashed_bicubic_and_normalised_with_half(world):
    """A dataset built with SigLIP's record (clip.preprocess) resizes a video's frames by squashing them bicubically
    (no centre crop: open_clip's _slpcfg) and the model input is (x / 255 - 0.5) / 0.5, not CLIP's statistics."""
    from vop.data import get_dataset
    from vop.data.decode import load_frames
    from vop.data.transforms import to_model_input

    pre = build_clip("siglip-tiny", seed=0).preprocess
    assert (pre.resize, pre.interpolation, pre.mean, pre.std) == ("squash", "bicubic", (0.5,) * 3, (0.5,) * 3)
    ds = get_dataset("collection", world, "val", frames=2, size=32, preprocess=pre)
    item = ds.video_dataset()[0]
    frames, _ = load_frames(ds.video_paths[0], 2, train=False)
    raw = torch.from_numpy(frames).permute(0, 3, 1, 2)
    want = F.interpolate(raw, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(item["video"], want)
    assert not torch.equal(want, F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False, antialias=True))
    # a non-square frame is squashed (the aspect ratio not kept), not centre-cropped
    from vop.data import resize_frames
    from vop.data.transforms import resize_center_crop

    wide = torch.randint(0, 256, (2, 3, 40, 72), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    squashed = resize_frames(wide, 32, pre)
    assert torch.equal(squashed, F.interpolate(wide, size=(32, 32), mode="bicubic", align_corners=False, antialias=True))
    assert not torch.equal(squashed, resize_center_crop(wide, 32, "bicubic"))
    x = to_model_input(item["video"][None], preprocess=pre)
    assert torch.allclose(x, (item["video"][None].float() / 255 - 0.5) / 0.5)
