"""The synthetic world: deterministic, real twins, held-out compositions, stills."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vop.data import get_dataset, heldout_subset, load_frames, load_stills, make_stills, temporal_subset
from vop.data.decode import VideoReader
from vop.data.synth import HELDOUT, WORLD_SIZES, generate_world


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    base = tmp_path_factory.mktemp("worlds")
    return [generate_world(base / name, seed=seed, size="smoke") and base / name
            for name, seed in (("a", 0), ("b", 0), ("c", 1))]


def rows(world: Path) -> list[dict]:
    return [json.loads(line) for line in (world / "captions.jsonl").read_text().splitlines()]


def all_frames(path: Path) -> np.ndarray:
    with VideoReader(path) as v:
        return v.get(range(v.num_frames))


def test_same_seed_same_world(worlds):
    a, b, c = worlds
    for name in ("captions.jsonl", "world.json", "stills/captions.jsonl", "stills/images.npy.gz"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "captions.jsonl").read_bytes() != (c / "captions.jsonl").read_bytes()
    videos = sorted({r["video"] for r in rows(a)})
    assert len(videos) == sum(v["videos"] for v in json.loads((a / "world.json").read_text())["counts"].values())
    for v in videos[::3]:
        fa, fb = all_frames(a / v), all_frames(b / v)
        assert fa.shape == (16, 64, 64, 3) and np.array_equal(fa, fb)
        assert len({f.tobytes() for f in fa}) > 1  # something happens


def test_test_split_holds_real_twins(worlds):
    world = worlds[0]
    test = [r for r in rows(world) if r["split"] == "test"]
    by_video = {r["video"]: r for r in test}
    spec = WORLD_SIZES["smoke"]
    groups: dict[str, list[dict]] = {}
    for r in test:
        if r["temporal_group"]:
            groups.setdefault(r["temporal_group"], []).append(r)
    assert len(groups) == spec.test_reversed_pairs + spec.test_swapped_pairs
    for group, (x, y) in groups.items():
        assert x["twin"] == y["video"] and y["twin"] == x["video"] and x["temporal_kind"] == y["temporal_kind"]
        assert x["caption"] != y["caption"] and by_video[x["twin"]] is y
        fx, fy = all_frames(world / x["video"]), all_frames(world / y["video"])
        same_multiset = sorted(f.tobytes() for f in fx) == sorted(f.tobytes() for f in fy)
        if x["temporal_kind"] == "reversed":
            assert same_multiset and np.array_equal(fx, fy[::-1])
            assert x["events"] != y["events"]
            for f in (8, 12):  # and the sampled frames too: a frame-averaging model sees the same set
                sx, sy = load_frames(world / x["video"], f)[0], load_frames(world / y["video"], f)[0]
                assert np.array_equal(sx, sy[::-1])
        else:  # the same two events in the other order
            ex, ey = x["events"].split("; "), y["events"].split("; ")
            assert len(ex) == 2 and ex == ey[::-1]
            assert np.array_equal(fx[0], fy[0]) and not same_multiset

    ds = get_dataset("collection", world, "test", frames=8, size=32)
    subset = temporal_subset(ds).tolist()
    assert subset == [i for i, r in enumerate(test) if r["temporal_group"]]
    assert len(subset) == 2 * len(groups)
    # a twin's video is in the gallery too
    twin_of = {ds.videos.index(r["video"]): ds.videos.index(r["twin"]) for r in test if r["twin"]}
    assert all(twin_of[twin_of[v]] == v for v in twin_of)


def test_heldout_compositions_only_in_test(worlds):
    world = worlds[0]
    meta = json.loads((world / "world.json").read_text())
    assert [tuple(h) for h in meta["heldout_compositions"]] == list(HELDOUT)
    for r in rows(world):
        events = [e.split() for e in r["events"].split("; ")]  # colour shape kind[->colour]
        has = any((shape, kind.split("->")[0]) in HELDOUT or (colour, kind.split("->")[0]) in HELDOUT
                  for colour, shape, kind in events)
        assert has == r["heldout"]
        if r["split"] != "test":
            assert not has, r
    ds = get_dataset("collection", world, "test")
    assert len(heldout_subset(ds)) >= WORLD_SIZES["smoke"].test_singles // 2
    train = get_dataset("collection", world, "train")
    assert len(train) == 3 * len(train.videos)  # several paraphrases per training video
    assert len(set(train.captions)) == len(train)


def test_stills(worlds):
    images, captions = make_stills(60, seed=5, size=32)
    again, captions2 = make_stills(60, seed=5, size=32)
    assert images.shape == (60, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and captions == captions2
    text = " ".join(captions)
    for word in ("moving", "left", "big", "small", "red", "circle", "square", "triangle", "the top"):
        assert word in text, word
    assert len({im.tobytes() for im in images}) == 60
    spec = WORLD_SIZES["smoke"]
    on_disk, caps = load_stills(worlds[0])
    expected, exp_caps = make_stills(spec.stills, 0, spec.canvas)
    assert np.array_equal(on_disk, expected) and caps == exp_caps
