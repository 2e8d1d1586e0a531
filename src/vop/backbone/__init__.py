"""CLIP backbone: towers, architectures, loading (the bytes: vop.formats), tokenizer."""
from vop.backbone.checkpoint import build_clip, load_clip, save_clip, weights_fingerprint
from vop.backbone.clip import CLIP
from vop.backbone.config import CLIPConfig, TextConfig, VisionConfig, get_arch, list_archs
from vop.backbone.tokenizer import CLIPTokenizer, clean_text

__all__ = ["CLIP", "CLIPConfig", "VisionConfig", "TextConfig", "get_arch", "list_archs", "build_clip",
           "load_clip", "save_clip", "weights_fingerprint", "CLIPTokenizer", "clean_text"]
