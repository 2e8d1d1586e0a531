"""CLIP towers: parity with Hugging Face's CLIPModel, every checkpoint format, tokenizer, errors."""
import json
import zipfile

import pytest
import torch

from vop.backbone import CLIPTokenizer, build_clip, load_clip, save_clip
from vop.backbone.checkpoint import weights_fingerprint
from vop.backbone.config import get_arch, infer_config
from vop.errors import CheckpointError

transformers = pytest.importorskip("transformers", reason="pip install -e '.[dev]' (Hugging Face transformers, the parity reference)")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=3,
                           image_size=32, patch_size=8),
        projection_dim=48,
    )
    model = CLIPModel(cfg).eval()
    # make every bias and LayerNorm non-trivial so a dropped or misplaced tensor shows
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.05 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d)
    return d, model


def _inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=g)
    tokens = CLIPTokenizer()(["a red circle", "two blue squares moving left, then up", "x", "a b c d e f g"])
    return images, tokens


def test_hf_parity(hf_dir):
    d, hf = hf_dir
    ours = load_clip(d).eval()
    assert ours.cfg.vision.heads == 3 and ours.cfg.vision.layers == 3 and ours.cfg.embed_dim == 48
    images, tokens = _inputs()
    with torch.no_grad():
        ref_i = hf.get_image_features(pixel_values=images)
        ref_t = hf.get_text_features(input_ids=tokens)
        ref_i = getattr(ref_i, "pooler_output", ref_i)
        ref_t = getattr(ref_t, "pooler_output", ref_t)
        assert torch.allclose(ours.encode_image(images), ref_i, atol=1e-5)
        assert torch.allclose(ours.encode_text(tokens), ref_t, atol=1e-5)
        assert torch.allclose(ours.logit_scale, hf.logit_scale)


def test_every_format_loads_identically(hf_dir, tmp_path):
    d, _ = hf_dir
    ref = load_clip(d).eval()
    heads = (ref.cfg.vision.heads, ref.cfg.text.heads)
    sd = ref.state_dict()
    images, tokens = _inputs()
    with torch.no_grad():
        want_i, want_t = ref.encode_image(images), ref.encode_text(tokens)

    files = {}
    torch.save(sd, tmp_path / "plain.pt")
    files["plain.pt"] = tmp_path / "plain.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "wrapped.bin")
    files["wrapped.bin"] = tmp_path / "wrapped.bin"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "openclip.safetensors")
    files["openclip.safetensors"] = tmp_path / "openclip.safetensors"
    save_clip(ref, tmp_path / "ours.safetensors")
    files["ours.safetensors"] = tmp_path / "ours.safetensors"
    # an OpenAI-style TorchScript archive (traced, with the scalar buffers OpenAI's file carries)
    class Traceable(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.visual = clip.visual
            for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "logit_scale"):
                setattr(self, name, getattr(clip, name))
            self.register_buffer("input_resolution", torch.tensor(32))
            self.register_buffer("context_length", torch.tensor(77))
            self.register_buffer("vocab_size", torch.tensor(49408))
            self._clip = [clip]

        def forward(self, images, tokens):
            return self._clip[0](images, tokens)

    traced = torch.jit.trace(Traceable(ref), (images, tokens), check_trace=False)
    torch.jit.save(traced, str(tmp_path / "openai.pt"))
    assert zipfile.is_zipfile(tmp_path / "openai.pt")
    files["openai.pt"] = tmp_path / "openai.pt"

    for name, f in files.items():
        m = load_clip(f, heads=heads).eval()
        with torch.no_grad():
            assert torch.equal(m.encode_image(images), want_i), name
            assert torch.equal(m.encode_text(tokens), want_t), name
        assert weights_fingerprint(m) == weights_fingerprint(ref), name


def test_infer_config_real_sizes():
    from vop.backbone.clip import CLIP

    for arch in ("ViT-B-32-quickgelu", "ViT-B-16-quickgelu", "ViT-L-14-336-quickgelu"):  # OpenAI's: no option needed
        cfg = get_arch(arch)
        with torch.device("meta"):
            sd = CLIP(cfg).state_dict()
        assert infer_config(sd) == cfg


def test_vit_b32_parameter_count():
    from vop.backbone.clip import CLIP

    with torch.device("meta"):
        m = CLIP(get_arch("ViT-B/32"))
    assert sum(p.numel() for p in m.parameters()) == 151_277_313  # OpenAI's ViT-B/32
    assert sum(p.numel() for p in m.visual.parameters()) == 87_849_216


def test_positional_interpolation(tiny_clip):
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        out = tiny_clip.encode_image(images)
    assert out.shape == (2, tiny_clip.cfg.embed_dim) and torch.isfinite(out).all()
    pos = tiny_clip.visual.positional(tiny_clip.cfg.vision.grid)
    assert pos is tiny_clip.visual.positional_embedding  # same grid: untouched
    big = tiny_clip.visual.positional(8)
    assert big.shape == (65, 64) and torch.equal(big[0], pos[0])
    # interpolating to the same size with the general path is the identity
    back = torch.nn.functional.interpolate(pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic")
    assert torch.allclose(back.permute(0, 2, 3, 1).reshape(16, -1), pos[1:], atol=1e-6)


def test_tokenizer_cleaning_and_truncation():
    tok = CLIPTokenizer(8)
    a = tok(["A  dog&amp;amp;cat\n jumps"])
    b = tok(["a dog&cat jumps"])
    assert torch.equal(a, b)
    long = tok(["one two three four five six seven eight nine ten"])
    assert long.shape == (1, 8) and long[0, 0] == 49406 and long[0, -1] == 49407
    assert tok.decode(long[0]).split() == ["one", "two", "three", "four", "five", "six"]
    short = tok(["hi"])
    assert short[0].tolist()[:3] == [49406, tok.encode("hi")[0], 49407] and short[0, 3:].eq(0).all()
    assert tok.encode("Hello, World!") == tok.encode("hello, world!")


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint at all", b"PK\x03\x04broken"])
def test_bad_files_give_clear_errors(tmp_path, content):
    f = tmp_path / "model.pt"
    f.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.pt.*(empty|cannot be read|expected)"):
        load_clip(f)


def test_truncated_and_missing(tmp_path, tiny_clip):
    save_clip(tiny_clip, tmp_path / "m.safetensors")
    torch.save(tiny_clip.state_dict(), tmp_path / "m.pt")
    for name in ("m.safetensors", "m.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=f"cut-{name}"):
            load_clip(tmp_path / f"cut-{name}")
    with pytest.raises(CheckpointError, match="no such file"):
        load_clip(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="architecture, not weights"):
        load_clip("ViT-B/32")
    (tmp_path / "hfdir").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_clip(tmp_path / "hfdir")


def test_not_clip_and_pickle_refused(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a CLIP"):
        load_clip(tmp_path / "other.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_clip(tmp_path / "evil.pt")


def test_hf_safetensors_without_config_uses_inference(hf_dir, tmp_path):
    d, _ = hf_dir
    import shutil

    shutil.copy(d / "model.safetensors", tmp_path / "model.safetensors")
    m = load_clip(tmp_path / "model.safetensors", heads=(3, 2))
    assert m.cfg.vision.width == 96 and m.cfg.vision.heads == 3
    assert json.loads((d / "config.json").read_text())["projection_dim"] == m.cfg.embed_dim
