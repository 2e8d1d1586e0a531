"""Writes configs/<dataset>/<method>.yaml: the paper's setting for every dataset x method.

    python configs/make_configs.py        # regenerate (a test checks the files are up to date)

It also writes configs/msrvtt-9k/ablations/*.yaml: the paper's ablations (uni-modal prompts,
prompted depth, prompt length, VoP^F's K_s) as the same recipe as configs/msrvtt-9k/vop.yaml (or
vop-f.yaml) with one ablated option each; the rows are those of ``vop demo --ablations``
(src/vop/demo/ablations.py) on ViT-B/32's 12 layers.

Setting (paper, Sec. 4.1): CLIP ViT-B/32, 224 px, 12 frames and 32 words (64 frames and 64 words
for the paragraph datasets DiDeMo and ActivityNet), batch 32, AdamW with weight decay 0.2, cosine
decay, 5 epochs. The paper searched each method's learning rate in [1e-6, 1e-2] and did not publish
the values: ours are starting points from public recipes, NOT tuned on these datasets (which
cannot be downloaded here); each method declares them, with the reason, where it is registered
(``rates=`` in src/vop/methods/*.py). Model selection uses a validation split, never the test set: DiDeMo and
LSMDC have one; MSR-VTT and ActivityNet do not, so 5% of the training videos are held out.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from vop.methods import list_methods, method_facts

DATASETS = {
    # name: (dataset, train split, val split, test split, frames, words)
    "msrvtt-9k": ("msrvtt", "9k", None, "test", 12, 32),
    "msrvtt-7k": ("msrvtt", "7k", None, "test", 12, 32),
    "didemo": ("didemo", "train", "val", "test", 64, 64),
    "activitynet": ("activitynet", "train", None, "val_1", 64, 64),
    "lsmdc": ("lsmdc", "train", "val", "test", 12, 32),
}

def config(name: str, method: str) -> dict:
    dataset, train, val, test, frames, words = DATASETS[name]
    rates = method_facts(method).rates  # declared where the method is registered
    lr, blr = rates.lr, rates.backbone_lr
    return {
        "model": {"method": method, "backbone": "ViT-B-32.pt", "frames": frames, "image_size": 224, "options": {}},
        "data": {"dataset": dataset, "root": "", "train_split": train, "val_split": val, "test_split": test,
                 "val_fraction": 0.0 if val else 0.05, "max_words": words, "num_workers": 8, "augment": False},
        "optim": {"epochs": 0 if method == "zeroshot" else 5, "batch_size": 32, "lr": lr, "backbone_lr": blr,
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


if __name__ == "__main__":
    main()
