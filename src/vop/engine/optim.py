"""AdamW with the usual CLIP fine-tuning groups and a warmup + cosine schedule, at the learning rates a run
resolves from its config and its method's declared rates (:func:`resolve_rates`)."""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

from vop.methods.base import VideoTextModel

if TYPE_CHECKING:
    from vop.engine.config import RunConfig

RATES = ("lr", "backbone_lr")


def resolve_rates(cfg: "RunConfig") -> tuple["RunConfig", str]:
    """The run's learning rates, in the one place they are decided: ``optim.lr`` / ``optim.backbone_lr`` as given
    (a value always wins), else (None: left out of the file and the overrides, or null) the rate its method
    declares at registration (``@register(..., rates=Rates(lr, backbone_lr, why))``, a plugin's alike).

    Returns a copy of ``cfg`` with both filled in (what the run saves in its config.yaml, so that a resumed
    or repeated run uses the same numbers whatever the method declares later) and one line saying each value
    and where it comes from: ``lr 1e-05, backbone_lr 0 (declared by cma: <why>)``."""
    from vop.methods import method_facts

    o = cfg.optim
    missing = [name for name in RATES if getattr(o, name) is None]
    values = {name: getattr(o, name) for name in RATES}
    source = {name: "given in the config" for name in RATES}
    if missing:
        declared = method_facts(cfg.model.method).rates
        why = f": {declared.why}" if declared.why else ""
        for name in missing:
            values[name] = _declared(cfg.model.method, name, getattr(declared, name))
            source[name] = f"declared by {cfg.model.method}{why}"
    parts = [f"{name} {values[name]:g} ({source[name]})" for name in RATES]
    if source["lr"] == source["backbone_lr"]:
        parts = [f"lr {values['lr']:g}, backbone_lr {values['backbone_lr']:g} ({source['lr']})"]
    line = "learning rates: " + "; ".join(parts)
    if not missing:
        return cfg, line
    return dataclasses.replace(cfg, optim=dataclasses.replace(o, **values)), line


def _declared(method: str, name: str, value: object) -> float:
    """A declared rate checked as ``optim.<name>`` is (finite; lr > 0, backbone_lr >= 0): a plugin's mistake is a
    ConfigError naming the method, not a number the optimiser trips over."""
    from vop.errors import ConfigError
    from vop.methods import plugin_of

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value > 0 if name == "lr" else value >= 0)
    if not ok:
        plugin = plugin_of(method)
        who = f"method {method!r}" + (f" (from the plugin {plugin})" if plugin else "")
        raise ConfigError(f"{who} declares {name}={value!r} in its @register rates, which is not a learning rate "
                          f"({'> 0' if name == 'lr' else '>= 0'}, finite): give optim.{name}=VALUE")
    return float(value)


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
