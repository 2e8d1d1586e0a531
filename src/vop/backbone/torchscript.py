"""Moved to :mod:`vop.formats.torchscript` (the TorchScript format); these names stay importable from here."""
from vop.formats.torchscript import convert_hint, is_torchscript, read_torchscript  # noqa: F401
