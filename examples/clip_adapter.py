"""Adding a method to vop in one file: CLIP-Adapter (Gao et al., 2021) on both towers' outputs.

CLIP-Adapter keeps CLIP frozen and learns a small bottleneck MLP on the *output* features, mixed
with the original feature by a residual ratio alpha: f' = alpha * A(f) + (1 - alpha) * f, with
A = Linear(D, D/r, no bias) -> ReLU -> Linear(D/r, D, no bias) -> ReLU. Here one adapter for the text
embedding and one applied to every frame embedding (before meanP pooling).

Everything vop needs to know is in this file: the options dataclass, the facts given to
``@register`` (label, learning rates, what it trains of CLIP), and the trainable modules built in
``build``. Nothing else in vop changes. Use it from Python by importing this module before
``vop.create_model("clip-adapter", ...)``, or from the ``vop`` command line by declaring it as a
plugin in your package's pyproject.toml (see docs/methods.md, "Adding a method"):

    [project.entry-points."vop.methods"]
    clip-adapter = "clip_adapter"
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vop.methods import Rates, VideoTextModel, register


@dataclass
class CLIPAdapterOptions:
    reduction: int = 4  # bottleneck width D / reduction
    ratio: float = 0.2  # alpha: the share of the adapted feature


def bottleneck(width: int, reduction: int) -> nn.Sequential:
    hidden = max(1, width // reduction)
    return nn.Sequential(nn.Linear(width, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, width, bias=False), nn.ReLU())


@register("clip-adapter", label="CLIP-Adapter", rates=Rates(1e-3, 0.0, "CLIP-Adapter's few-shot recipe"),
          demo_rates=Rates(3e-3, 1e-5))
class CLIPAdapter(VideoTextModel):
    Options = CLIPAdapterOptions

    def build(self) -> None:
        d = self.clip.cfg.embed_dim
        self.text_adapter = bottleneck(d, self.opts.reduction)
        self.frame_adapter = bottleneck(d, self.opts.reduction)

    def _mix(self, adapter: nn.Module, f: torch.Tensor) -> torch.Tensor:
        return self.opts.ratio * adapter(f) + (1 - self.opts.ratio) * f

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._mix(self.text_adapter, super().encode_text(tokens))

    def encode_frames(self, video: torch.Tensor) -> torch.Tensor:
        return self._mix(self.frame_adapter, super().encode_frames(video))
