"""Writes configs/<dataset>/<method>.yaml: the paper's setting for every dataset x method.

    python configs/make_configs.py        # regenerate (a test checks the files are up to date)

It writes configs/msrvtt-9k/<backbone>/*.yaml: the same protocol on the backbones people use now
(PE-Core-B-16, EVA02-B-16, ViT-B-16-SigLIP2; docs/methods.md, Backbones), every method that runs on the
backbone (a method reading [CLS] by construction is left out of PE-Core's and SigLIP2's folders, ``proj`` out of
SigLIP2's: its image tower has no projection), at the backbone's native resolution, with its preprocessing and
tokenizer (PE-Core: 32 text positions; SigLIP2: 64, its tokenizer.json read from the weights' folder) taken from
its architecture record.

It also writes configs/msrvtt-9k/ablations/*.yaml: the paper's ablations (uni-modal prompts,
prompted depth, prompt length, VoP^F's K_s) as the same recipe as configs/msrvtt-9k/vop.yaml (or
vop-f.yaml) with one ablated option each; the rows are those of ``vop demo --ablations``
(src/vop/demo/ablations.py) on ViT-B/32's 12 layers.

Setting (paper, Sec. 4.1): CLIP ViT-B/32, 224 px, 12 frames and 32 words (64 frames and 64 words
for the paragraph datasets DiDeMo and ActivityNet), batch 32, AdamW with weight decay 0.2, cosine
decay, 5 epochs. The paper searched each method's learning rate in [1e-6, 1e-2] and did not publish
the values: ours are starting points from public recipes, NOT tuned on these datasets (which
cannot be downloaded here); each method declares them, with the reason, where it is registered
(``rates=`` in src/vop/methods/*.py), and the options a dataset's captions need (its
``config_options``); a method that trains nothing (zero-shot) gets 0 epochs. Model selection uses a
validation split, never the test set: DiDeMo and LSMDC have one; MSR-VTT and ActivityNet do not, so
5% of the training videos are held out.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import yaml

from vop.methods import count_parameters, get_method, list_methods, method_facts

DATASETS = {
    # name: (dataset, train split, val split, test split, frames, words)
    "msrvtt-9k": ("msrvtt", "9k", None, "test", 12, 32),
    "msrvtt-7k": ("msrvtt", "7k", None, "test", 12, 32),
    "didemo": ("didemo", "train", "val", "test", 64, 64),
    "activitynet": ("activitynet", "train", None, "val_1", 64, 64),
    "lsmdc": ("lsmdc", "train", "val", "test", 12, 32),
}


@lru_cache(maxsize=None)
def trains_nothing(method: str, frames: int, options: str = "{}") -> bool:
    """A method that trains no tensor (zero-shot): its runs only evaluate (0 epochs). Built on the meta device
    (``options``: JSON)."""
    return count_parameters(method, "ViT-B-32", frames=frames, **json.loads(options))["trainable"] == 0


#: folder -> (architecture, weights file name) of the backbones beyond CLIP with configs (on BACKBONE_DATASETS)
BACKBONES = {"pe-core-b-16": ("PE-Core-B-16", "PE-Core-B-16.safetensors"),
             "eva02-b-16": ("EVA02-B-16", "EVA02-B-16.safetensors"),
             "vit-b-16-siglip2": ("ViT-B-16-SigLIP2", "ViT-B-16-SigLIP2.safetensors")}
BACKBONE_DATASETS = ("msrvtt-9k",)


def backbone_methods(folder: str) -> list[str]:
    """The methods that run on the backbone of ``folder`` (those reading [CLS] refuse PE-Core's attention pool and
    SigLIP's class-less tower; ``proj`` refuses SigLIP's image tower without a projection)."""
    from vop.backbone.config import get_arch

    cfg = get_arch(BACKBONES[folder][0])
    return [m for m in list_methods() if get_method(m).unsupported_backbone(cfg) is None]


def backbone_config(name: str, method: str, folder: str) -> dict:
    """The protocol of ``config`` on another backbone: its weights (named by architecture), native size."""
    from vop.backbone.config import get_arch

    arch, weights = BACKBONES[folder]
    cfg = config(name, method)
    cfg["model"].update(backbone=weights, backbone_arch=arch, image_size=get_arch(arch).vision.image_size)
    cfg["out_dir"] = f"runs/{name}/{folder}/{method}"
    return cfg


def render_backbone(name: str, method: str, folder: str) -> str:
    from vop.backbone.config import get_arch

    arch, weights = BACKBONES[folder]
    a = get_arch(arch)
    p, t = a.vision.preprocess, a.text
    head = (f"# {method} on {name} with {arch} (see configs/make_configs.py): the paper's protocol on this backbone.\n"
            f"# Backbone: open_clip's {arch} weights ({weights}: .pt, .bin or .safetensors as open_clip saves them"
            + ("; or a Hugging Face SiglipModel folder" if a.family == "siglip" else "") + ").\n"
            f"# From its record: {p.size} px, frames resized {p.resize}/{p.interpolation}, mean {list(p.mean)}, std "
            f"{list(p.std)}; text context {t.context_length} "
            + (f"(captions padded to all {t.context_length} positions, the text prompts on top; read at the last).\n"
               if t.pool == "last" else f"(captions: {t.context_length} minus the text prompts).\n")
            + (f"# Tokenizer: {dict(gemma='Gemma', t5='T5 c4-en').get(t.tokenizer, t.tokenizer)} SentencePiece vocabulary from a file (never downloaded): the tokenizer.json "
               "beside the weights is found by itself; elsewhere add model.tokenizer=/path/to/tokenizer.json.\n"
               if t.tokenizer != "clip" else "")
            +
            f"# Learning rates: {method_facts(method).rates.why} (CLIP's starting points, not tuned for {arch}).\n"
            f"# Usage: vop train --config configs/{name}/{folder}/{method}.yaml data.root=/path/to/{DATASETS[name][0]} "
            f"model.backbone=/path/to/{weights}\n")
    return head + yaml.safe_dump(backbone_config(name, method, folder), sort_keys=False)


def config(name: str, method: str) -> dict:
    dataset, train, val, test, frames, words = DATASETS[name]
    rates = method_facts(method).rates  # declared where the method is registered
    lr, blr = rates.lr, rates.backbone_lr
    # what a dataset's captions or frames need of the method (MV-Adapter: a text position per caption token)
    options = get_method(method).config_options(words, frames)
    epochs = 0 if trains_nothing(method, frames, json.dumps(options, sort_keys=True)) else 5  # zero-shot: evaluate only
    return {
        "model": {"method": method, "backbone": "ViT-B-32.pt", "frames": frames, "image_size": 224, "options": options},
        "data": {"dataset": dataset, "root": "", "train_split": train, "val_split": val, "test_split": test,
                 "val_fraction": 0.0 if val else 0.05, "max_words": words, "num_workers": 8, "augment": False},
        "optim": {"epochs": epochs, "batch_size": 32, "lr": lr, "backbone_lr": blr,
                  "weight_decay": 0.2, "warmup_fraction": 0.1, "grad_clip": 1.0, "accumulate": 1, "precision": "auto"},
        "eval": {"batch_size": 32, "postprocess": "none"},
        "seed": 0,
        "out_dir": f"runs/{name}/{method}",
    }


def render(name: str, method: str) -> str:
    why = method_facts(method).rates.why
    head = (f"# {method} on {name}: the paper's setting (see configs/make_configs.py).\n"
            f"# Learning rates: {why}.\n"
            f"# Usage: vop train --config configs/{name}/{method}.yaml data.root=/path/to/{DATASETS[name][0]} "
            f"model.backbone=/path/to/ViT-B-32.pt\n")
    return head + yaml.safe_dump(config(name, method), sort_keys=False)


ABLATION_DATASET = "msrvtt-9k"
ABLATION_LAYERS = 12  # ViT-B/32's layers per tower


def ablation_configs() -> dict[str, str]:
    """{file name: text} of configs/msrvtt-9k/ablations/: one file per distinct run of the ablation table."""
    from vop.demo.ablations import ablations

    name, files, rows_of = ABLATION_DATASET, {}, {}
    for a in ablations(ABLATION_LAYERS):
        for r in a.rows:
            rows_of.setdefault((r.method, r.options), []).append(f"{a.title}: {r.label}")
    for (method, options), rows in rows_of.items():
        slug = method + "".join(f"_{k}{v}" for k, v in options)
        cfg = config(name, method)
        cfg["model"]["options"] = dict(options)
        cfg["out_dir"] = f"runs/{name}/ablations/{slug}"
        head = (f"# The paper's ablations on {name} (see configs/make_configs.py): {method}"
                + (f" with {', '.join(f'{k}={v}' for k, v in options)}" if options else ", its defaults") + ".\n"
                + "".join(f"# Row of {row}\n" for row in rows)
                + f"# Learning rates: {method_facts(method).rates.why}.\n"
                f"# Every row: for c in configs/{name}/ablations/*.yaml; do vop train --config \"$c\" "
                f"data.root=/path/to/{DATASETS[name][0]} model.backbone=/path/to/ViT-B-32.pt; done\n")
        files[f"{slug}.yaml"] = head + yaml.safe_dump(cfg, sort_keys=False)
    return files


# The later methods' own recipes (../shared/spec/later-methods.md, each method's (d) section), next to the
# common protocol above. Only what the authors' scripts/configs fix; everything else as the protocol.
# batch_size is vop's global contrastive batch (all processes together): "per process x GPUs" below.
AS_PUBLISHED = {
    ("msrvtt-9k", "dgl"): ({"optim": {"lr": 2e-3, "batch_size": 512, "precision": "fp16"}, "seed": 42},
                           "knightyxp/DGL scripts/msrvtt.sh: lr 2e-3, 5 epochs, batch 128 per process x 4 GPUs with "
                           "all-gathered features (global 512), fp16 AMP, seed 42"),
    ("lsmdc", "dgl-l"): ({"optim": {"lr": 1e-2, "epochs": 10, "batch_size": 256, "precision": "fp16"}, "seed": 42},
                         "knightyxp/DGL scripts: LSMDC uses the linear generator, lr 1e-2, 10 epochs, batch 64 per "
                         "process (x 4 GPUs as msrvtt.sh; the GPU count of this script is not confirmed)"),
    ("activitynet", "dgl-l"): ({"optim": {"lr": 1e-2, "epochs": 10, "batch_size": 64, "precision": "fp16"}, "seed": 42},
                               "knightyxp/DGL scripts/activitynet.sh: linear generator, lr 1e-2, 10 epochs, batch 16 per "
                               "process (x 4 GPUs as msrvtt.sh; not confirmed), 64 frames, 64 words"),
    ("msrvtt-9k", "mv-adapter"): ({"model": {"backbone": "ViT-B-16.pt", "options": {"train_clip_bias": True}},
                                   "optim": {"lr": 5e-6, "backbone_lr": 1e-7, "batch_size": 128, "precision": "fp16"}},
                                  "zhangbw17/MV-Adapter configs/msrvtt: lr 5e-6 (adapters, CMT), CLIP biases trained "
                                  "at 1e-7, ViT-B/16 (the model's default clip_arch), batch 16 per process (global "
                                  "batch not in the repo; 128 = 8 GPUs assumed), fp16. Not expressible here: BertAdam "
                                  "(no bias correction; vop uses AdamW) and its per-tensor clipping"),
    ("lsmdc", "mv-adapter"): ({"model": {"backbone": "ViT-B-16.pt",
                                         "options": {"train_clip_bias": True, "cmt_mode": "down_in", "cmt_layers": [9, 10, 11]}},
                               "optim": {"lr": 5e-6, "backbone_lr": 1e-7, "batch_size": 128, "precision": "fp16"}},
                              "zhangbw17/MV-Adapter configs/lsmdc: as MSR-VTT with CMT 'down in' on layers 9-11"),
    ("msrvtt-9k", "cma"): ({"optim": {"lr": 1e-5, "batch_size": 128, "precision": "fp16"}, "seed": 42},
                           "LeapLabTHU/Cross-Modal-Adapter README command: lr 1e-5, 5 epochs, batch 128 global "
                           "(4 GPUs x 32, all-gathered), r=8, shared width 16, fp16, seed 42. Not expressible here: "
                           "BertAdam (no bias correction; vop uses AdamW)"),
}
# LoRA and TempMe (../shared/spec/lora-tempme.md, sections 1 (d), 2 (e)): LunarShen/TempMe's main.py and
# scripts/MSRVTT.sh, the only script released (MSR-VTT); the paper's other datasets get the same recipe here
_TEMPME_RECIPE = ("LunarShen/TempMe main.py + scripts/MSRVTT.sh: clip_lr 6e-4 for every LoRA (and clip position) "
                  "tensor, AdamW, weight decay 0.2, warm-up 10% + cosine, 5 epochs, batch 128 global (4 GPUs x 32, "
                  "all-gathered), 12 frames, 32 words, fp32 (no autocast), grad clip 1.0, seed 42{}. Not expressible "
                  "here: clip-level RandAugment rand-m7-n4-mstd0.5-inc1 on training frames, frames decoded at 1 fps "
                  "and 12 taken by linspace in training too (vop samples one frame per segment), weight decay on the "
                  "clip position embeddings (vop does not decay embeddings added to tokens), model selection on the "
                  "test set (vop selects on validation)")
for _name in DATASETS:
    _other = ("" if _name.startswith("msrvtt") else
              f"; the released code has no {_name} script: its MSR-VTT recipe, with {DATASETS[_name][5]} words")
    for _method in ("lora", "tempme"):
        AS_PUBLISHED[(_name, _method)] = ({"model": {"frames": 12}, "optim": {"lr": 6e-4, "batch_size": 128,
                                                                             "precision": "fp32"}, "seed": 42},
                                          _TEMPME_RECIPE.format(_other))


def as_published(name: str, method: str) -> str:
    cfg = config(name, method)
    overrides, why = AS_PUBLISHED[(name, method)]
    for section, values in overrides.items():
        if isinstance(values, dict):
            for k, v in values.items():
                if isinstance(v, dict):
                    cfg[section][k] = {**cfg[section][k], **v}
                else:
                    cfg[section][k] = v
        else:
            cfg[section] = values
    cfg["out_dir"] = f"runs/{name}/as-published/{method}"
    head = (f"# {method} on {name} as published (see configs/make_configs.py; the common protocol is ../{method}.yaml).\n"
            f"# Recipe: {why}.\n"
            f"# Usage: vop train --config configs/{name}/as-published/{method}.yaml data.root=/path/to/{DATASETS[name][0]} "
            f"model.backbone=/path/to/{cfg['model']['backbone']}\n")
    return head + yaml.safe_dump(cfg, sort_keys=False)


def main() -> None:
    here = Path(__file__).parent
    for name in DATASETS:
        (here / name).mkdir(exist_ok=True)
        for method in list_methods():
            (here / name / f"{method}.yaml").write_text(render(name, method))
    folder = here / ABLATION_DATASET / "ablations"
    folder.mkdir(exist_ok=True)
    for fname, text in ablation_configs().items():
        (folder / fname).write_text(text)
    for name, method in AS_PUBLISHED:
        (here / name / "as-published").mkdir(exist_ok=True)
        (here / name / "as-published" / f"{method}.yaml").write_text(as_published(name, method))
    for name in BACKBONE_DATASETS:
        for folder in BACKBONES:
            (here / name / folder).mkdir(exist_ok=True)
            for old in (here / name / folder).glob("*.yaml"):
                old.unlink()
            for method in backbone_methods(folder):
                (here / name / folder / f"{method}.yaml").write_text(render_backbone(name, method, folder))


if __name__ == "__main__":
    main()
