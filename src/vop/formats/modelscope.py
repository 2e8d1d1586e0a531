"""The authors' released models: ModelScope model folders (a folder where a checkpoint is expected).

A folder (``damo/cv_vit-b32_retrieval_vop``, ``..._vop_bias``, ``..._vop_proj``, ``..._vop_partial``;
code in modelscope/models/cv/vop_retrieval) holds:

- ``configuration.json``: ``model.type`` and a ``hyperparam`` section (``num_frames``, ``input_res``,
  ``pooling_type``; for VoP also ``vp_token_num``, ``tp_prefix_token_num``, ``tp_suffix_token_num``);
- ``ViT-B-32.pt``: OpenAI's CLIP archive, the backbone (CLIP weights: read by the CLIP formats);
- ``VoP_<data>.pth`` (basic VoP, type ``vop-retrieval-model``) or ``VoPSE_<data>.pth`` (the baselines,
  type ``vop-retrieval-model-se``): ``{"state_dict": ...}`` of the whole port model, keys possibly
  ``module.``-prefixed. VoP: ``visual_prompt_learner.visual_prompts`` (L, 1, n_v, d_v),
  ``text_prompt_learner.text_prompts`` (L, n_prefix + n_suffix, d_t) and copies of the frozen CLIP
  under ``clip.``, ``image_encoder.`` (= ``visual.``) and ``text_encoder.``. VoPSE: a complete CLIP
  under ``clip.``.

Read here: the files and the hyperparameters (checked: vop.limits), the weights (with
``torch.load(weights_only=True)``) and the OpenAI name of each CLIP copy. Which vop method and
options a folder is, and the checks against the backbone, are vop.methods.modelscope's.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from vop import limits
from vop.errors import CheckpointError
from vop.formats.registry import Format, Tensors, reason, register

FORMAT = "modelscope-vop"
CONFIG, BACKBONE = "configuration.json", "ViT-B-32.pt"
TYPES = {"vop": "vop-retrieval-model", "se": "vop-retrieval-model-se"}
_HYPER = {"vop": ("vp_token_num", "tp_prefix_token_num", "tp_suffix_token_num", "num_frames", "input_res"),
          "se": ("num_frames", "input_res")}  # integers; pooling_type too
#: what the hyperparameters may be (vop.limits): prompt counts and frames as vop's own options, sizes as an architecture's
_BOUNDS = {"vp_token_num": (0, limits.MAX_PROMPT_TOKENS), "tp_prefix_token_num": (0, limits.MAX_CONTEXT),
           "tp_suffix_token_num": (0, limits.MAX_CONTEXT), "num_frames": (1, limits.MAX_FRAMES),
           "input_res": (1, limits.MAX_IMAGE_SIZE)}
_CLIP_COPIES = {"clip.": "", "image_encoder.": "visual.", "text_encoder.": ""}  # port prefix -> OpenAI name prefix
VISUAL_PROMPTS, TEXT_PROMPTS = "visual_prompt_learner.visual_prompts", "text_prompt_learner.text_prompts"


@dataclass
class Folder:
    path: Path
    layout: str  # "vop" or "se"
    weights: Path  # the .pth
    hyperparam: dict[str, Any]

    @property
    def config(self) -> Path:
        return self.path / CONFIG


def read_folder(path: str | os.PathLike) -> Folder:
    """Find and check a folder's files and hyperparameters (reads no weights)."""
    path = Path(path)
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{path}: is a folder without {CONFIG}, not one of the authors' ModelScope model folders "
            f"({CONFIG}, {BACKBONE} and VoP_*.pth or VoPSE_*.pth); or give a prompt checkpoint (.safetensors)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: not readable JSON ({e})") from None
    hp = cfg.get("hyperparam") if isinstance(cfg, dict) else None
    if not isinstance(hp, dict):
        raise CheckpointError(f"{cfg_file}: has no 'hyperparam' section (the authors' model settings)")
    found = sorted(path.glob("VoP_*.pth")) + sorted(path.glob("VoPSE_*.pth"))
    if len(found) != 1:
        what = "no weights file" if not found else f"several weights files ({', '.join(f.name for f in found)})"
        raise CheckpointError(f"{path}: {what}; expected one VoP_*.pth (VoP) or VoPSE_*.pth (the bias/proj/partial baselines)")
    layout = "se" if found[0].name.startswith("VoPSE_") else "vop"
    model = cfg.get("model")
    mtype = model.get("type") if isinstance(model, dict) else None
    if mtype is not None and mtype != TYPES[layout]:
        raise CheckpointError(f"{cfg_file}: model type {mtype!r}, but {found[0].name} is a {TYPES[layout]!r}")
    missing = [k for k in (*_HYPER[layout], "pooling_type") if k not in hp]
    if missing:
        raise CheckpointError(f"{cfg_file}: hyperparam lacks {', '.join(missing)}")
    for k in _HYPER[layout]:
        lo, hi = _BOUNDS[k]
        limits.check_int(hp[k], f"{cfg_file}: hyperparam {k}", lo, hi, error=CheckpointError)
    if hp["pooling_type"] != "avg":
        raise CheckpointError(f"{cfg_file}: pooling_type {hp['pooling_type']!r} is not supported (the authors' code has only "
                              "'avg': the mean of the L2-normalised frame embeddings)")
    return Folder(path, layout, found[0], hp)


def read_weights(folder: Folder) -> Tensors:
    """The .pth's state dict, ``module.`` removed (as the authors' loader does)."""
    f = folder.weights
    try:
        obj = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{f}: cannot be read with torch.load(weights_only=True) ({reason(e)})") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    sd = sd if isinstance(sd, Mapping) else {}
    bad = next((k for k, v in sd.items() if isinstance(v, torch.Tensor) and not isinstance(k, str)), None)
    if bad is not None:
        raise CheckpointError(f"{f}: a tensor is stored under the key {bad!r} ({type(bad).__name__}), not a name: "
                              "not a state dict the authors' code writes")
    tensors = {k.replace("module.", ""): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{f}: holds no tensors (expected {{'state_dict': {{name: tensor}}}}, as the authors' code saves)")
    return tensors


def clip_names(folder: Folder, sd: Tensors) -> dict[str, str | None]:
    """Port key -> OpenAI name of every tensor of the .pth but the prompts (None: no CLIP copy of this
    layout: a VoPSE model holds nothing but its CLIP, under ``clip.``), in the file's order."""
    prompts = (VISUAL_PROMPTS, TEXT_PROMPTS) if folder.layout == "vop" else ()
    out: dict[str, str | None] = {}
    for key in sd:
        if key in prompts:
            continue
        prefix = next((p for p in _CLIP_COPIES if key.startswith(p)), None)
        if folder.layout == "se" and prefix != "clip.":
            prefix = None
        out[key] = _CLIP_COPIES[prefix] + key[len(prefix):] if prefix else None
    return out


register(Format(FORMAT, is_checkpoint=lambda path: path.is_dir()))
