"""Checkpoint formats, one module per format: bytes in, tensors with canonical names and records out.

A format module reads a file or folder into tensors (detecting its format by content, never by the
file's name), converts their names to the canonical ones (OpenAI's CLIP names) and gives the records
the file holds (an architecture, a prompt checkpoint's metadata) as plain data, every number checked
(vop.limits). It builds no model and knows no method: what the records mean is vop.backbone's (the
architecture, the CLIP) and vop.methods' (the method, its tensors). It imports nothing of vop but
vop.errors, vop.limits and this package (tests/test_formats_path.py checks it).

CLIP weights (``vop.load_clip``, :func:`read_clip`):

- ``torchscript``: OpenAI TorchScript archives, read as data, never run;
- ``torch_state_dict``: open_clip / PyTorch state dicts (``torch.load(weights_only=True)``; the fallback);
- ``safetensors_clip``: ``.safetensors`` files, with our ``vop_clip_config`` architecture record;
- ``hf_siglip``: Hugging Face ``SiglipModel`` names (converted; config.json as the record; the folder is hf_clip's);
- ``hf_clip``: Hugging Face ``CLIPModel`` folders and names (converted; config.json as the record);
- ``open_clip_timm``: open_clip's PE-Core, EVA02-CLIP and SigLIP (a timm image tower, ``visual.trunk.*``, text under ``text.*``);
- ``pe_clip``: Meta's own Perception Encoder checkpoints (OpenAI-style names with ``visual.attn_pool.*``);
- ``openai_clip``: OpenAI / open_clip names, the canonical ones (the fallback of the names).

Trained models (``vop.load_checkpoint``, :func:`checkpoint_format`):

- ``modelscope``: the authors' ModelScope folders;
- ``vop_prompts``: vop's own prompt checkpoints (safetensors + JSON metadata; the fallback).

A new format is one module here, ending with ``register(Format(...))`` (see vop.formats.registry for
the roles a format can play), and one import line below.
"""
from vop.formats.registry import (ArchRecord, ClipWeights, Format, canonical, checkpoint_format, expected, list_formats,
                                  read_clip, read_raw, register)

# Registration, in the order "expected ..." messages list the formats. A new format: one module + one line here.
from vop.formats import torchscript  # noqa: F401,E402,I001
from vop.formats import torch_state_dict  # noqa: F401,E402
from vop.formats import safetensors_clip  # noqa: F401,E402
from vop.formats import hf_siglip  # noqa: F401,E402
from vop.formats import hf_clip  # noqa: F401,E402
from vop.formats import open_clip_timm  # noqa: F401,E402
from vop.formats import pe_clip  # noqa: F401,E402
from vop.formats import openai_clip  # noqa: F401,E402
from vop.formats import modelscope  # noqa: F401,E402
from vop.formats import vop_prompts  # noqa: F401,E402

__all__ = ["ArchRecord", "ClipWeights", "Format", "register", "list_formats", "expected", "read_raw", "canonical",
           "read_clip", "checkpoint_format"]
