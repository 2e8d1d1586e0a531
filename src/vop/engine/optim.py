"""AdamW with the usual CLIP fine-tuning groups and a warmup + cosine schedule."""
from __future__ import annotations

import math

import torch

from vop.methods.base import VideoTextModel


def param_groups(model: VideoTextModel, lr: float, backbone_lr: float, weight_decay: float) -> list[dict]:
    """Four groups: {new modules, CLIP weights} x {decayed, not decayed}.

    Weight decay applies to weight matrices only; never to prompts, embeddings added to tokens
    (frame position embedding, position/context tokens), biases, LayerNorms or the logit scale.
    New modules (prompts, adapters, context module) use ``lr``; CLIP's own tensors ``backbone_lr``.
    Which tensors are not decayed is the model's answer (``model.no_weight_decay()``).
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    no_decay = model.no_weight_decay()
    for name, p in model.named_trainable_parameters():
        backbone = name.startswith("clip.")
        groups.setdefault((backbone, name not in no_decay), []).append(p)
    out = []
    for (backbone, decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": backbone_lr if backbone else lr,
                    "weight_decay": weight_decay if decay else 0.0,
                    "name": f"{'backbone' if backbone else 'new'}-{'decay' if decay else 'no_decay'}"})
    return out


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
