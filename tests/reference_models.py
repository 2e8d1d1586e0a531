"""Reference models for the backbone families, from code nobody here wrote: open_clip 3.3.0 and timm 1.0.31.

Both are installed without their dependencies (``pip install --no-deps timm==1.0.31 open_clip_torch==3.3.0``)
and import torchvision, which vop does not have: :func:`import_reference` puts a stub ``torchvision`` in
``sys.modules`` (any submodule, any attribute a dummy class) for the tests' process only, then imports them.
Tests call :func:`require_reference` (a ``pytest.skip`` naming the pip command when either is absent).

:func:`open_clip_model` builds open_clip's own ``CustomTextCLIP`` for a shipped config (its
``model_configs/<name>.json``), at full size or at a tiny size: the timm image tower is then the shipped
config's own timm model function called with smaller sizes (``timm.models.eva.<fn>(embed_dim=64, ...)``,
everything else - RoPE layout, pool heads, norms, activations - as the shipped function sets it), registered
under a new timm name so that open_clip's ``TimmModel`` builds it exactly as it builds the real one.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest
import torch

PIP = "pip install --no-deps timm==1.0.31 open_clip_torch==3.3.0"
VERSIONS = {"open_clip": "3.3.0", "timm": "1.0.31"}


class _DummyMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _dummy(name)


def _dummy(name: str) -> type:
    return _DummyMeta(name, (), {"__init__": lambda self, *a, **k: None, "__call__": lambda self, *a, **k: None})


class _StubModule(types.ModuleType):
    """A stand-in torchvision module: every attribute is a dummy class (timm imports FrozenBatchNorm2d ...)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _dummy(name)


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StubModule(spec.name)
        m.__path__ = []
        m.__version__ = "0.0.0+vop-test-stub"
        return m

    def exec_module(self, module):
        pass


def _have(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


_IMPORTED: tuple | None = None


def import_reference():
    """(open_clip, timm), imported with a stub torchvision if the real one is absent."""
    global _IMPORTED
    if _IMPORTED is None:
        if not _have("torchvision") and not any(isinstance(f, _StubFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _StubFinder())
        import open_clip
        import timm

        _IMPORTED = (open_clip, timm)
    return _IMPORTED


def require_reference():
    """Skip the calling test (with the pip command) unless open_clip 3.3.0 and timm 1.0.31 are installed."""
    if not (_have("open_clip") and _have("timm")):
        pytest.skip(f"open_clip / timm are not installed (reference code for the parity tests): {PIP}")
    try:
        open_clip, timm = import_reference()
    except ImportError as e:  # one of their own imports is missing (the [dev] extras bring them all)
        pytest.skip(f"open_clip / timm do not import ({e}): pip install -e '.[dev]' and {PIP}")
    got = {"open_clip": open_clip.__version__, "timm": timm.__version__}
    if got != VERSIONS:
        pytest.skip(f"the parity tests were written against {VERSIONS}, found {got}: {PIP}")
    return open_clip, timm


def open_clip_config(name: str) -> dict:
    open_clip, _ = import_reference()
    return json.loads((Path(open_clip.__file__).parent / "model_configs" / f"{name}.json").read_text())


#: tiny sizes of an image tower (the shipped timm function's other arguments kept), of a text tower
TINY_VISION = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
TINY_TEXT = dict(width=64, heads=2, layers=2)
TINY_EMBED = 48
TINY_VOCAB = 1000  # SigLIP's tiny text vocabulary (its tiny tokenizer files stay below it)


def _tiny_timm_name(fn_name: str, **extra) -> str:
    """Register (once) a timm model that is the shipped ``fn_name`` at the tiny sizes; its name."""
    _, timm = import_reference()
    from timm.models import eva, register_model, vision_transformer

    name = f"voptest_tiny_{fn_name}"
    if name not in timm.list_models(name):
        module = eva if hasattr(eva, fn_name) else vision_transformer  # PE-Core / EVA02; SigLIP
        shipped = getattr(module, fn_name)

        def fn(pretrained: bool = False, **kwargs):
            return shipped(pretrained=False, **dict(TINY_VISION, **extra, **kwargs))

        fn.__name__ = fn.__qualname__ = name
        fn.__module__ = module.__name__
        register_model(fn)
    return name


def open_clip_model(name: str, tiny: bool = False, seed: int = 0):
    """open_clip's model of the shipped config ``name`` (e.g. "PE-Core-B-16"), its own code and init, in eval
    mode, every tensor then drawn at random (biases and LayerNorms too: a missing bias or a swapped LayerNorm
    shows). ``tiny``: at the tiny sizes (image 32 px, width 64, 2 layers; text width 64, 2 layers; embedding 48;
    the PE-Core tiny keeps its RoPE rescale at the identity: reference grid = the tiny grid, as every PE-Core
    size is at its native resolution; SigLIP, which has no image projection, embeds in the image width, 64,
    and its text vocabulary is cut to :data:`TINY_VOCAB` ids)."""
    open_clip, _ = import_reference()
    from open_clip.model import CustomTextCLIP

    cfg = open_clip_config(name)
    vision, text = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    embed = cfg["embed_dim"]
    if tiny:
        fn = vision["timm_model_name"]
        extra = {"ref_feat_shape": (4, 4)} if "pe_core" in fn else {}
        vision.update(image_size=TINY_VISION["img_size"], timm_model_name=_tiny_timm_name(fn, **extra))
        text.update(TINY_TEXT)
        embed = TINY_EMBED
        if vision.get("timm_proj") == "none":  # SigLIP
            embed = TINY_VISION["embed_dim"]
            text.update(vocab_size=TINY_VOCAB)
    torch.manual_seed(seed)
    model = CustomTextCLIP(embed_dim=embed, vision_cfg=vision, text_cfg=text, init_logit_bias=cfg.get("init_logit_bias"))
    randomise(model, seed)
    return model.eval()


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter drawn again: weights N(0, 1/sqrt(fan-in)), LayerNorm gains 1 + N(0, 0.1), biases and
    embeddings N(0, 0.02 .. 0.1), logit scale log(1 / 0.07) + 0.1, SigLIP's logit bias -10 + N(0, 0.05)."""
    g = torch.Generator().manual_seed(seed + 1)
    for n, p in model.named_parameters():
        if n == "logit_scale":
            p.fill_(2.7593)
        elif n == "logit_bias":
            p.fill_(-10.0 + 0.05 * torch.randn((), generator=g).item())
        elif p.ndim >= 2 and not n.endswith(("cls_token", "pos_embed", "latent", "positional_embedding")):
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)
        elif n.endswith("weight") and p.ndim == 1:  # LayerNorm gains
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


def save_open_clip(model, path: Path) -> Path:
    """The state dict as open_clip writes it: ``torch.save`` for .pt/.bin, safetensors' ``save_file``."""
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


@torch.no_grad()
def reference_embeddings(model, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's L2-normalised image and text embeddings."""
    return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
