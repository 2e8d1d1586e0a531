"""The world on disk: sizes, the plan of every video, :func:`generate_world`, and readers of what
it wrote (stills, the temporal and held-out test subsets)."""
from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vop.data.synth.grammar import clip_summary, describe
from vop.data.synth.renderer import render_clip, write_video
from vop.data.synth.scenes import COLOURS, HELDOUT, KINDS, SHAPES, Clip, is_heldout, random_clip, reverse_clip, swap_events
from vop.data.synth.stills import make_stills

__all__ = ["WorldSize", "WORLD_SIZES", "GENERATOR", "generate_world", "world_manifest", "WORLD_ENTRIES", "load_stills",
           "temporal_subset", "heldout_subset"]

#: recorded in every ``world.json``: what wrote the world. Bump ``version`` whenever the same seed and
#: size would give other files (so that a folder holding a world of the old generator is recognised)
GENERATOR = {"name": "vop.data.synth", "version": 1}
#: the top-level entries :func:`generate_world` writes into its folder
WORLD_ENTRIES = ("videos", "captions.jsonl", "stills", "world.json")


@dataclass(frozen=True)
class WorldSize:
    train: int  # videos
    val: int
    test_reversed_pairs: int
    test_swapped_pairs: int
    test_singles: int  # half of them hold a held-out composition
    stills: int
    train_captions: int = 3  # paraphrases per training video
    frames: int = 16
    canvas: int = 64
    fps: int = 8


#: the sizes ``vop data synth --size`` accepts, by name (smallest first)
WORLD_SIZES: dict[str, WorldSize] = dict(
    smoke=WorldSize(train=16, val=4, test_reversed_pairs=4, test_swapped_pairs=2, test_singles=4, stills=32),
    small=WorldSize(train=480, val=64, test_reversed_pairs=48, test_swapped_pairs=24, test_singles=48, stills=4000),
    full=WorldSize(train=2400, val=200, test_reversed_pairs=150, test_swapped_pairs=75, test_singles=150, stills=20000),
)

_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}


def _plan(seed: int, spec: WorldSize) -> list[dict]:
    """Every video of the world: split, clip, captions, and diagnostic fields."""
    items: list[dict] = []

    def rng(split: str, i: int, what: int = 0) -> np.random.Generator:
        return np.random.default_rng([seed, _SPLIT_CODE[split], i, what])

    for split, n in (("train", spec.train), ("val", spec.val)):
        for i in range(n):
            r = rng(split, i)
            clip = random_clip(r, spec.frames)
            while is_heldout(clip):
                clip = random_clip(r, spec.frames)
            k = spec.train_captions if split == "train" else 1
            caps = _distinct_captions(clip, rng(split, i, 1), k)
            items.append(dict(split=split, name=f"{split}/{split}{i:05d}", clip=clip, captions=caps))
    j = 0
    pairs = [("reversed", spec.test_reversed_pairs), ("swapped", spec.test_swapped_pairs)]
    for kind, n in pairs:
        for p in range(n):
            r = rng("test", j)
            clip = random_clip(r, spec.frames, two_events=True if kind == "swapped" else None)
            twin = reverse_clip(clip) if kind == "reversed" else swap_events(clip)
            group = f"{kind[:3]}{p:04d}"
            names = (f"test/test{j:05d}", f"test/test{j + 1:05d}")
            for k, (c, name, other) in enumerate(((clip, names[0], names[1]), (twin, names[1], names[0]))):
                # the same template draws for both twins: their captions differ only in content
                cap = describe(c, rng("test", j, 1))
                items.append(dict(split="test", name=name, clip=c, captions=[cap], temporal_group=group,
                                  temporal_kind=kind, twin=f"videos/{other}.mp4",
                                  reverse_of=names[0] if (kind == "reversed" and k == 1) else None))
            j += 2
    for s in range(spec.test_singles):
        r = rng("test", j)
        clip = random_clip(r, spec.frames)
        if s % 2 == 0:  # half the singles hold a held-out composition
            while not is_heldout(clip):
                clip = random_clip(r, spec.frames)
        items.append(dict(split="test", name=f"test/test{j:05d}", clip=clip, captions=[describe(clip, rng("test", j, 1))]))
        j += 1
    return items


def _distinct_captions(clip: Clip, rng: np.random.Generator, k: int) -> list[str]:
    caps: list[str] = []
    for _ in range(8 * k):
        c = describe(clip, rng)
        if c not in caps:
            caps.append(c)
        if len(caps) == k:
            break
    return caps


def generate_world(out: str | os.PathLike, *, seed: int = 0, size: str | WorldSize = "small",
                   progress: bool = False) -> dict:
    """Write the synthetic world under ``out``; returns the contents of ``out/world.json``.

    Files: ``videos/{train,val,test}/*.mp4``; ``captions.jsonl`` (collection format: ``video``,
    ``caption``, ``split``, plus ``events``, ``heldout``, ``temporal_group``, ``temporal_kind``,
    ``twin``); ``stills/images.npy.gz`` (gzipped .npy, ``(N, S, S, 3)`` uint8) +
    ``stills/captions.jsonl`` (read both with :func:`load_stills`);
    ``world.json`` (the generator and its version, seed, size, counts, held-out compositions; read it
    with :func:`world_manifest`). Load it with
    ``get_dataset("collection", out, split)``.
    """
    spec = WORLD_SIZES[size] if isinstance(size, str) else size
    out = Path(out)
    items = _plan(seed, spec)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"generator": GENERATOR, "seed": seed, "size": size if isinstance(size, str) else "custom",
                "spec": spec.__dict__}
    # first the manifest of an unfinished world (what is being written, by whom), replaced by the whole
    # world.json as the last file: a folder left by an interrupted run is recognised as vop's
    (out / "world.json").write_text(json.dumps({**manifest, "incomplete": True}, indent=1) + "\n", encoding="utf-8")
    for split in ("train", "val", "test"):
        (out / "videos" / split).mkdir(parents=True, exist_ok=True)
    rendered: dict[str, np.ndarray] = {}
    it = items
    if progress:
        from tqdm import tqdm

        it = tqdm(items, desc="synth videos", unit="video")
    lines = []
    for item in it:
        if item.get("reverse_of"):
            frames = rendered.pop(item["reverse_of"])[::-1]  # exactly the original's frames, reversed
        else:
            frames = render_clip(item["clip"], spec.canvas)
            if item.get("temporal_kind") == "reversed":
                rendered[item["name"]] = frames
        video = f"videos/{item['name']}.mp4"
        write_video(out / video, frames, spec.fps)
        for cap in item["captions"]:
            row = {"video": video, "caption": cap, "split": item["split"],
                   "events": clip_summary(item["clip"]), "heldout": is_heldout(item["clip"]),
                   "temporal_group": item.get("temporal_group"), "temporal_kind": item.get("temporal_kind"),
                   "twin": item.get("twin")}
            lines.append(json.dumps(row))
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    images, captions = make_stills(spec.stills, seed, spec.canvas)
    (out / "stills").mkdir(exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, images)  # gzip with mtime 0: ~80x smaller, same bytes for the same seed
    (out / "stills" / "images.npy.gz").write_bytes(gzip.compress(buf.getvalue(), compresslevel=6, mtime=0))
    (out / "stills" / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions), encoding="utf-8")
    counts = {s: {"videos": sum(1 for i in items if i["split"] == s),
                  "captions": sum(len(i["captions"]) for i in items if i["split"] == s)} for s in _SPLIT_CODE}
    counts["test"]["temporal_videos"] = sum(1 for i in items if i.get("temporal_group"))
    counts["test"]["heldout_videos"] = sum(1 for i in items if i["split"] == "test" and is_heldout(i["clip"]))
    world = {**manifest, "counts": counts, "stills": spec.stills, "shapes": list(SHAPES), "colours": list(COLOURS),
             "event_kinds": list(KINDS), "heldout_compositions": [list(h) for h in HELDOUT]}
    (out / "world.json").write_text(json.dumps(world, indent=1) + "\n", encoding="utf-8")
    return world


def world_manifest(world_dir: str | os.PathLike) -> dict | None:
    """The ``world.json`` of a world written by :func:`generate_world` (of this or an older vop: those
    lack ``generator``), or ``None`` where there is none or it is not vop's. ``"incomplete": true``:
    its generation was interrupted."""
    try:
        meta = json.loads((Path(world_dir) / "world.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("spec"), dict) or "seed" not in meta:
        return None
    gen = meta.get("generator")
    if gen is not None and not (isinstance(gen, dict) and gen.get("name") == GENERATOR["name"]):
        return None
    if gen is None and "heldout_compositions" not in meta:  # an older vop's world.json holds these
        return None
    return meta


def load_stills(world_dir: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """The stills written by :func:`generate_world`: ``(images (N, S, S, 3) uint8, captions)``."""
    d = Path(world_dir) / "stills"
    images = np.load(io.BytesIO(gzip.decompress((d / "images.npy.gz").read_bytes())))
    captions = [json.loads(line) for line in (d / "captions.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return images, captions


def temporal_subset(dataset) -> torch.Tensor:
    """Indices of the captions (samples) of ``dataset`` in the temporal-order subset."""
    return torch.tensor([i for i, g in enumerate(dataset.meta_column("temporal_group")) if g], dtype=torch.long)


def heldout_subset(dataset) -> torch.Tensor:
    """Indices of the captions whose video holds a held-out attribute-event composition."""
    return torch.tensor([i for i, h in enumerate(dataset.meta_column("heldout", False)) if h], dtype=torch.long)
