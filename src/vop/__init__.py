"""vop: text-video retrieval by prompt tuning a frozen CLIP (VoP, CVPR 2023), and its baselines.

    import vop
    model = vop.create_model("vop-f", "path/to/ViT-B-32.pt", frames=12)
    tokens = model.tokenizer()(["a dog jumps into a pool"])
    t = model.encode_text(tokens)            # (1, 512)
    v = model.encode_video(videos)           # videos: B x F x 3 x H x W, CLIP-normalised
"""
from vop._version import __version__
from vop.backbone import CLIP, CLIPConfig, CLIPTokenizer, build_clip, get_arch, list_archs, load_clip, save_clip
from vop.errors import CheckpointError, ConfigError, DataError, MissingDependencyError, VopError
from vop.methods import count_parameters, create_model, list_methods, method_facts
from vop.methods.base import VideoTextModel
from vop.methods.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint

__all__ = [
    "__version__", "CLIP", "CLIPConfig", "CLIPTokenizer", "build_clip", "get_arch", "list_archs", "load_clip",
    "save_clip", "create_model", "count_parameters", "list_methods", "method_facts", "VideoTextModel", "save_checkpoint",
    "load_checkpoint", "read_checkpoint_meta", "VopError", "CheckpointError", "ConfigError", "DataError",
    "MissingDependencyError",
]
