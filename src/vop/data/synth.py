"""The synthetic world: coloured shapes that move, grow, shrink, change colour, appear or
disappear, written as real mp4 files plus a ``collection`` annotation file; and the still-image
caption set that the tiny CLIP is pretrained on.

See docs/datasets.md ("The synthetic world") for the design. In short:

- A clip is a list of objects (shape, colour, position, size, opacity) and one or two timed
  events. Captions are generated from the events ("the red square turns blue, then the circle
  moves up"), with several paraphrase templates per event kind.
- Test split: some videos come with a **time-reversed twin** (the same frames in reverse order,
  captioned with the inverse events: a decoded frame multiset equal to the original's) or an
  **event-swapped twin** (the same two events in the other order). Their captions carry
  ``temporal_group`` (the pair id), ``temporal_kind`` (``reversed``/``swapped``) and ``twin``.
- Some attribute-event compositions (:data:`HELDOUT`) never occur in train/val; test captions
  whose video holds one are marked ``heldout: true``.
- Videos are encoded losslessly (x264, qp 0, yuv444p, one thread), so identical frames decode
  identically and the output does not depend on the machine's core count.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from vop._optional import require

__all__ = [
    "SHAPES", "COLOURS", "HELDOUT", "WorldSize", "WORLD_SIZES", "Obj", "Event", "Clip",
    "render", "render_clip", "random_clip", "reverse_clip", "swap_events", "describe",
    "write_video", "make_stills", "generate_world", "temporal_subset", "heldout_subset",
]

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 190, 60),
    "blue": (45, 90, 235),
    "yellow": (235, 210, 30),
}
BACKGROUND = (20, 20, 20)
SMALL, BIG = 0.09, 0.15  # half-size of an object, as a fraction of the canvas side
MOVE = 0.38  # distance travelled by a move event

#: (attribute, event kind) pairs that appear only in the test split
HELDOUT: tuple[tuple[str, str], ...] = (
    ("triangle", "grow"),
    ("square", "disappear"),
    ("yellow", "move_down"),
    ("blue", "move_left"),
)

KINDS = ("move_left", "move_right", "move_up", "move_down", "grow", "shrink", "turn", "appear", "disappear")
INVERSE = {"move_left": "move_right", "move_right": "move_left", "move_up": "move_down", "move_down": "move_up",
           "grow": "shrink", "shrink": "grow", "turn": "turn", "appear": "disappear", "disappear": "appear"}

# Paraphrases: verb phrases per event kind ({c}: the new colour), subjects, and two-event joins.
VERBS = {
    "move_left": ("moves left", "slides to the left", "goes left", "travels leftward"),
    "move_right": ("moves right", "slides to the right", "goes right", "travels rightward"),
    "move_up": ("moves up", "slides upward", "goes up", "rises"),
    "move_down": ("moves down", "slides downward", "goes down", "falls"),
    "grow": ("grows", "gets bigger", "expands", "becomes larger"),
    "shrink": ("shrinks", "gets smaller", "contracts", "becomes smaller"),
    "turn": ("turns {c}", "changes colour to {c}", "becomes {c}", "changes to {c}"),
    "appear": ("appears", "fades in", "shows up", "comes into view"),
    "disappear": ("disappears", "fades out", "vanishes", "goes away"),
}
SUBJECTS_ONE = ("a {colour} {shape}", "the {colour} {shape}", "a {size} {colour} {shape}")
SUBJECTS_TWO = ("the {colour} {shape}", "the {shape}")
JOINS = ("{a}, then {b}", "first {a}, then {b}", "{a} and then {b}", "{a}, after that {b}")


@dataclass(frozen=True)
class Obj:
    """An object's state; ``x``, ``y`` (centre) and ``r`` (half-size) are canvas fractions."""

    shape: str
    colour: str
    x: float
    y: float
    r: float
    alpha: float = 1.0


@dataclass(frozen=True)
class Event:
    """Object ``obj`` goes from its state at time ``t0`` to ``after`` at ``t1`` (frame times)."""

    obj: int
    after: Obj
    t0: float
    t1: float


@dataclass(frozen=True)
class Clip:
    objects: tuple[Obj, ...]  # states at time 0
    events: tuple[Event, ...]  # in time order
    frames: int


def _lerp(a: Obj, b: Obj, p: float) -> tuple[Obj, np.ndarray]:
    mix = lambda u, v: u + (v - u) * p  # noqa: E731
    rgb = np.array(COLOURS[a.colour], np.float32) * (1 - p) + np.array(COLOURS[b.colour], np.float32) * p
    return Obj(a.shape, b.colour if p >= 0.5 else a.colour, mix(a.x, b.x), mix(a.y, b.y), mix(a.r, b.r),
               mix(a.alpha, b.alpha)), rgb


def state_before(clip: Clip, event: Event) -> Obj:
    """The state of ``event.obj`` when ``event`` starts."""
    s = clip.objects[event.obj]
    for e in clip.events:
        if e is event:
            return s
        if e.obj == event.obj:
            s = e.after
    raise ValueError("event not in clip")


def _states_at(clip: Clip, t: float) -> list[tuple[Obj, np.ndarray]]:
    out = []
    for i, s in enumerate(clip.objects):
        rgb = np.array(COLOURS[s.colour], np.float32)
        for e in clip.events:
            if e.obj != i or t <= e.t0:
                continue
            p = min(1.0, (t - e.t0) / (e.t1 - e.t0))
            s, rgb = _lerp(s, e.after, p)
        out.append((s, rgb))
    return out


@lru_cache(maxsize=8)
def _axis(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float32) + 0.5) / n  # pixel centres in canvas fractions


def _mask(shape: str, X: np.ndarray, Y: np.ndarray, x: float, y: float, r: float) -> np.ndarray:
    if shape == "circle":
        m = (X - x) ** 2 + (Y - y) ** 2 <= r * r
    elif shape == "square":
        h = r * 0.86  # about the area of the circle
        m = (np.abs(X - x) <= h) & (np.abs(Y - y) <= h)
    elif shape == "triangle":  # pointing up
        top, bottom = y - r, y + 0.8 * r
        m = (Y >= top) & (Y <= bottom) & (np.abs(X - x) <= (Y - top) / (bottom - top) * r * 1.1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m.astype(np.float32)


def render(objects: Sequence[tuple[Obj, np.ndarray] | Obj], size: int = 64, ss: int = 2) -> np.ndarray:
    """Draw objects (in order, alpha-blended) on the background: ``(size, size, 3)`` uint8.

    Items are ``Obj`` or ``(Obj, rgb)`` (a colour between two named ones). Anti-aliased by
    ``ss`` x ``ss`` supersampling.
    """
    n = size * ss
    axis = _axis(n)
    img = np.empty((n, n, 3), np.float32)
    img[:] = BACKGROUND
    for item in objects:
        o, rgb = item if isinstance(item, tuple) else (item, np.array(COLOURS[item.colour], np.float32))
        if o.alpha <= 0 or o.r <= 0:
            continue
        e = 1.15 * o.r  # the shape's extent around its centre
        x0, x1 = max(0, int((o.x - e) * n)), min(n, int((o.x + e) * n) + 2)
        y0, y1 = max(0, int((o.y - e) * n)), min(n, int((o.y + e) * n) + 2)
        if x0 >= x1 or y0 >= y1:
            continue
        X, Y = np.meshgrid(axis[x0:x1], axis[y0:y1])
        a = _mask(o.shape, X, Y, o.x, o.y, o.r)[..., None] * o.alpha
        patch = img[y0:y1, x0:x1]
        patch += (rgb - patch) * a
    img = sum(img[i::ss, j::ss] for i in range(ss) for j in range(ss)) / (ss * ss)  # box filter
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_clip(clip: Clip, size: int = 64) -> np.ndarray:
    """All frames of a clip: ``(T, size, size, 3)`` uint8."""
    return np.stack([render(_states_at(clip, t), size) for t in range(clip.frames)])


# --------------------------------------------------------------------------------------------
# Clips, twins, captions


def kind_of(before: Obj, after: Obj) -> str:
    if after.colour != before.colour:
        return "turn"
    if after.alpha != before.alpha:
        return "appear" if after.alpha > before.alpha else "disappear"
    if after.r != before.r:
        return "grow" if after.r > before.r else "shrink"
    dx, dy = after.x - before.x, after.y - before.y
    if abs(dx) >= abs(dy):
        return "move_right" if dx > 0 else "move_left"
    return "move_down" if dy > 0 else "move_up"


def _event_state(rng: np.random.Generator, kind: str, shape: str, region: tuple[float, float, float, float]):
    """(before, after) states of one object for an event of ``kind`` inside ``region``
    (x0, x1, y0, y1) of the canvas."""
    colour = str(rng.choice(list(COLOURS)))
    r = BIG if kind == "shrink" else SMALL if kind == "grow" else float(rng.choice([SMALL, BIG]))
    r_end = {"grow": BIG, "shrink": SMALL}.get(kind, r)
    m = max(r, r_end) + 0.02
    x0, x1, y0, y1 = region
    dx = {"move_left": -MOVE, "move_right": MOVE}.get(kind, 0.0)
    dy = {"move_up": -MOVE, "move_down": MOVE}.get(kind, 0.0)
    if dx:  # a move may leave the object's half of the canvas along its axis
        x0, x1 = 0.0, 1.0
    if dy:
        y0, y1 = 0.0, 1.0
    x = float(rng.uniform(max(x0 + m, x0 + m - dx), min(x1 - m, x1 - m - dx)))
    y = float(rng.uniform(max(y0 + m, y0 + m - dy), min(y1 - m, y1 - m - dy)))
    before = Obj(shape, colour, round(x, 4), round(y, 4), r, 0.0 if kind == "appear" else 1.0)
    after = replace(before, x=round(x + dx, 4), y=round(y + dy, 4), r=r_end,
                    alpha=0.0 if kind == "disappear" else 1.0)
    if kind == "turn":
        after = replace(after, colour=str(rng.choice([c for c in COLOURS if c != colour])))
    return before, after


def random_clip(rng: np.random.Generator, frames: int = 16, *, two_events: bool | None = None,
                distractor_p: float = 0.3) -> Clip:
    """A random clip: one event (an optional static distractor), or two events on two objects
    of different shapes, one after the other."""
    if two_events is None:
        two_events = bool(rng.random() < 0.4)
    if not two_events:
        shape = str(rng.choice(SHAPES))
        before, after = _event_state(rng, str(rng.choice(KINDS)), shape, (0.0, 1.0, 0.0, 1.0))
        objs, ev = [before], Event(0, after, 2.0, frames - 3.0)
        if rng.random() < distractor_p:
            other = str(rng.choice([s for s in SHAPES if s != shape]))
            d = Obj(other, str(rng.choice(list(COLOURS))), float(rng.uniform(0.15, 0.85)),
                    float(rng.uniform(0.15, 0.85)), SMALL)
            objs, ev = [d, before], Event(1, after, 2.0, frames - 3.0)  # the distractor is drawn below
        return Clip(tuple(objs), (ev,), frames)
    shapes = rng.permutation(SHAPES)[:2]
    horizontal = rng.random() < 0.5  # the two objects side by side or one above the other
    halves = [(0.0, 0.5, 0.0, 1.0), (0.5, 1.0, 0.0, 1.0)] if horizontal else [(0.0, 1.0, 0.0, 0.5), (0.0, 1.0, 0.5, 1.0)]
    objs, events = [], []
    mid = frames // 2
    for i, (shape, half, (t0, t1)) in enumerate(zip(shapes, halves, [(1.0, mid - 1.0), (float(mid), frames - 2.0)])):
        before, after = _event_state(rng, str(rng.choice(KINDS)), str(shape), half)
        objs.append(before)
        events.append(Event(i, after, t0, t1))
    if rng.random() < 0.5:  # which object acts first
        events = [Event(e.obj, e.after, o.t0, o.t1) for e, o in zip(reversed(events), events)]
    return Clip(tuple(objs), tuple(events), frames)


def reverse_clip(clip: Clip) -> Clip:
    """The clip played backwards (for captions; its frames are the original's, reversed)."""
    end = list(clip.objects)
    for e in clip.events:
        end[e.obj] = e.after
    last = clip.frames - 1
    events = tuple(Event(e.obj, state_before(clip, e), last - e.t1, last - e.t0) for e in reversed(clip.events))
    return Clip(tuple(end), events, clip.frames)


def swap_events(clip: Clip) -> Clip:
    """The same two events (on different objects) in the other order."""
    if len(clip.events) != 2 or clip.events[0].obj == clip.events[1].obj:
        raise ValueError("swap_events needs two events on two different objects")
    a, b = clip.events
    return replace(clip, events=(Event(b.obj, b.after, a.t0, a.t1), Event(a.obj, a.after, b.t0, b.t1)))


def event_kinds(clip: Clip) -> list[tuple[Obj, str]]:
    """(subject state at event start, kind) of each event, in time order."""
    out = []
    for e in clip.events:
        before = state_before(clip, e)
        out.append((before, kind_of(before, e.after)))
    return out


def is_heldout(clip: Clip) -> bool:
    return any((b.shape, k) in HELDOUT or (b.colour, k) in HELDOUT for b, k in event_kinds(clip))


def describe(clip: Clip, rng: np.random.Generator) -> str:
    """One caption of the clip's events (paraphrase templates drawn from ``rng``)."""
    parts = []
    two = len(clip.events) > 1
    for e, (before, kind) in zip(clip.events, event_kinds(clip)):
        subjects = SUBJECTS_TWO if two else SUBJECTS_ONE
        subject = subjects[rng.integers(len(subjects))].format(
            colour=before.colour, shape=before.shape, size="small" if before.r < (SMALL + BIG) / 2 else "big")
        verb = VERBS[kind][rng.integers(len(VERBS[kind]))].format(c=e.after.colour)
        parts.append(f"{subject} {verb}")
    if not two:
        return parts[0]
    return JOINS[rng.integers(len(JOINS))].format(a=parts[0], b=parts[1])


def clip_summary(clip: Clip) -> str:
    """A canonical, template-free description, e.g. ``red square turn->blue; green circle move_up``."""
    out = []
    for e, (b, k) in zip(clip.events, event_kinds(clip)):
        out.append(f"{b.colour} {b.shape} {k}" + (f"->{e.after.colour}" if k == "turn" else ""))
    return "; ".join(out)


# --------------------------------------------------------------------------------------------
# Video files


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, *, codec: str = "libx264",
                lossless: bool = True, options: dict[str, str] | None = None, pix_fmt: str | None = None,
                gop: int | None = None, bframes: int | None = None) -> Path:
    """Encode ``(T, H, W, 3)`` uint8 frames with PyAV (container from the file extension).

    ``lossless`` (x264 only): qp 0 in yuv444p, so equal frames decode equal. One encoder thread,
    so the bytes do not depend on the machine. ``gop``/``bframes`` set the keyframe interval and
    B-frame count (for tests of sparse keyframes).
    """
    av = require("av", "writing video (PyAV)")
    path = Path(path)
    frames = np.asarray(frames, dtype=np.uint8)
    t, h, w, _ = frames.shape
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height = w, h
        opts = dict(options or {})
        if codec == "libx264":
            s.pix_fmt = pix_fmt or ("yuv444p" if lossless else "yuv420p")
            if lossless:
                opts.setdefault("qp", "0")
            params = ["threads=1"]
            if gop:
                params += [f"keyint={gop}", f"min-keyint={gop}", "scenecut=0"]
            if bframes is not None:
                params.append(f"bframes={bframes}")
            opts.setdefault("x264-params", ":".join(params))
        else:
            s.pix_fmt = pix_fmt or "yuv420p"
            s.codec_context.thread_count = 1
            if gop:
                s.codec_context.gop_size = gop
            if bframes is not None:
                s.codec_context.max_b_frames = bframes
        s.options = opts
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    return path


# --------------------------------------------------------------------------------------------
# Stills for pretraining the tiny CLIP

_POSITIONS = {"on the left": (0.25, 0.5), "on the right": (0.75, 0.5), "at the top": (0.5, 0.25),
              "at the bottom": (0.5, 0.75), "in the middle": (0.5, 0.5)}
_MOTION_STILL = {
    "move_left": ("moving left", "going left", "sliding to the left"),
    "move_right": ("moving right", "going right", "sliding to the right"),
    "move_up": ("moving up", "going up", "rising"),
    "move_down": ("moving down", "going down", "falling"),
    "grow": ("growing", "getting bigger"),
    "shrink": ("shrinking", "getting smaller"),
}


def _still(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    u = rng.random()
    if u < 0.4:  # a motion cue from a still: a fading trail, inner rings, an outer halo
        kind = str(rng.choice(list(_MOTION_STILL) + ["turn", "faint"]))
        r = SMALL if kind == "shrink" else BIG if kind == "grow" else float(rng.choice([SMALL, BIG]))
        x, y = (float(v) for v in rng.uniform(0.3, 0.7, 2))
        o = Obj(shape, colour, x, y, r)
        if kind.startswith("move"):
            dx = {"move_left": 1, "move_right": -1}.get(kind, 0) * 0.08
            dy = {"move_up": 1, "move_down": -1}.get(kind, 0) * 0.08
            items: list = [replace(o, x=x + dx * k, y=y + dy * k, alpha=0.5 - 0.15 * k) for k in (3, 2, 1)] + [o]
        elif kind == "grow":  # was smaller: dimmer, smaller copies inside it
            dim = (np.array(COLOURS[colour], np.float32) + np.array(BACKGROUND, np.float32)) / 2
            items = [o, (replace(o, r=r * 0.7), dim), replace(o, r=r * 0.45), (replace(o, r=r * 0.2), dim)]
        elif kind == "shrink":  # was bigger: faint larger copies around it
            items = [replace(o, r=r * f, alpha=a) for f, a in ((1.9, 0.2), (1.45, 0.4))] + [o]
        elif kind == "turn":  # turning into another colour: old colour outside, new colour inside
            new = str(rng.choice([c for c in COLOURS if c != colour]))
            items = [replace(o, r=r * 1.3), replace(o, colour=new, r=r * 0.85)]
            caption = f"a {colour} {shape} turning {new}"
        else:
            items = [replace(o, alpha=0.45)]
            caption = f"a faint {colour} {shape}"
        if kind in _MOTION_STILL:
            words = _MOTION_STILL[kind]
            caption = f"a {colour} {shape} {words[rng.integers(len(words))]}"
        return render(items, size), caption
    n = 1 if u < 0.75 else 2
    positions = rng.permutation(list(_POSITIONS))[:n]
    shapes = rng.permutation(SHAPES)[:n]
    objs, words = [], []
    for i, (pos, sh) in enumerate(zip(positions, shapes)):
        c = colour if i == 0 else str(rng.choice(list(COLOURS)))
        r = float(rng.choice([SMALL, BIG]))
        px, py = _POSITIONS[str(pos)]
        objs.append(Obj(str(sh), c, px + float(rng.uniform(-0.05, 0.05)), py + float(rng.uniform(-0.05, 0.05)), r))
        size_word = "small" if r == SMALL else "big"
        words.append(f"a {size_word} {c} {sh} {pos}" if rng.random() < 0.6 else f"a {c} {sh} {pos}")
    return render(objs, size), " and ".join(words)


def make_stills(n: int, seed: int = 0, size: int = 64, *, style: str = "basic", start: int = 0,
                return_meta: bool = False):
    """``n`` still images ``(n, size, size, 3)`` uint8 with captions of what each shows: objects,
    colours, sizes, positions ("a big red circle on the left and a blue square at the top"), and
    motion words from still cues ("a red circle moving left": a fading trail; "growing": inner
    rings; "shrinking": an outer halo; "turning blue": old colour outside, new inside; "faint").
    Deterministic given ``seed``.

    ``style="basic"`` (the default, written by :func:`generate_world`) is the set described above.
    ``style="rich"`` is the set the shipped tiny CLIP is pretrained on (:mod:`vop.engine.pretrain`):
    the same kinds of cues, plus faint objects captioned as appearing/disappearing, still cues on
    two objects at once, static distractors, and captions that also use the video captions'
    phrasing (subjects "a small red circle" / "the red circle" / "the circle", verb phrases
    "moves left", "travels leftward", "changes colour to blue", "fades in" next to "moving left").
    No rich still is a video frame either. ``start`` skips the first ``start`` stills of the
    sequence (``make_stills(n, s, start=k)`` equals items ``k..k+n-1`` of ``make_stills(k+n, s)``),
    so a long stream can be drawn in chunks. ``return_meta=True`` (rich only) also returns, per
    still, a dict ``{"scene": "static"|"cue"|"two_cues", "objects": [{shape, colour, size, kind,
    new, position, mentioned}]}`` (``kind`` is ``"static"`` or an event kind of :data:`KINDS`).
    """
    if style not in STILL_STYLES:
        raise ValueError(f"unknown still style {style!r} ({', '.join(STILL_STYLES)})")
    if return_meta and style != "rich":
        raise ValueError("return_meta needs style='rich'")
    images = np.empty((n, size, size, 3), np.uint8)
    captions, metas = [], []
    for j in range(n):
        i = start + j
        if style == "basic":
            images[j], cap = _still(np.random.default_rng([seed, 7, i]), size)
        else:
            images[j], cap, meta = _rich_still(np.random.default_rng([seed, 11, i]), size)
            metas.append(meta)
        captions.append(cap)
    return (images, captions, metas) if return_meta else (images, captions)


STILL_STYLES = ("basic", "rich")

#: still-cue verb phrases in the -ing form, one per video paraphrase of :data:`VERBS` (same order)
STILL_VERBS = {
    "move_left": ("moving left", "sliding to the left", "going left", "travelling leftward"),
    "move_right": ("moving right", "sliding to the right", "going right", "travelling rightward"),
    "move_up": ("moving up", "sliding upward", "going up", "rising"),
    "move_down": ("moving down", "sliding downward", "going down", "falling"),
    "grow": ("growing", "getting bigger", "expanding", "becoming larger"),
    "shrink": ("shrinking", "getting smaller", "contracting", "becoming smaller"),
    "turn": ("turning {c}", "changing colour to {c}", "becoming {c}", "changing to {c}"),
    "appear": ("appearing", "fading in", "showing up", "coming into view"),
    "disappear": ("disappearing", "fading out", "vanishing", "going away"),
}
_TRAIL = {"move_left": (1, 0), "move_right": (-1, 0), "move_up": (0, 1), "move_down": (0, -1)}  # trail side


def _cue_items(o: Obj, kind: str, new: str | None, rng: np.random.Generator) -> list:
    """What a still shows of an object in the middle of an event of ``kind``."""
    if kind in _TRAIL:  # a fading trail behind it
        tx, ty = _TRAIL[kind]
        step = float(rng.uniform(0.06, 0.09))
        return [replace(o, x=o.x + tx * step * k, y=o.y + ty * step * k, alpha=0.5 - 0.15 * k) for k in (3, 2, 1)] + [o]
    if kind == "grow":  # was smaller: dimmer, smaller copies inside it
        dim = (np.array(COLOURS[o.colour], np.float32) + np.array(BACKGROUND, np.float32)) / 2
        return [o, (replace(o, r=o.r * 0.7), dim), replace(o, r=o.r * 0.45), (replace(o, r=o.r * 0.2), dim)]
    if kind == "shrink":  # was bigger: faint larger copies around it
        return [replace(o, r=o.r * f, alpha=a) for f, a in ((1.9, 0.2), (1.45, 0.4))] + [o]
    if kind == "turn":  # old colour outside, new colour inside
        return [replace(o, r=o.r * 1.3), replace(o, colour=new, r=o.r * 0.85)]
    if kind in ("appear", "disappear"):  # half transparent: on its way in or out
        return [replace(o, alpha=float(rng.uniform(0.3, 0.6)))]
    return [o]


def _cue_object(rng: np.random.Generator, kind: str, shape: str, colour: str,
                region: tuple[float, float, float, float]) -> Obj:
    """An object doing ``kind`` placed inside ``region`` (x0, x1, y0, y1) with room for its cue."""
    r = BIG if kind == "grow" else SMALL if kind == "shrink" else float(rng.choice([SMALL, BIG]))
    extent = r * (1.9 if kind == "shrink" else 1.3 if kind == "turn" else 1.0) + 0.02
    tx, ty = _TRAIL.get(kind, (0, 0))
    x0, x1, y0, y1 = region
    lo_x, hi_x = x0 + extent + max(0, -tx) * 0.2, x1 - extent - max(0, tx) * 0.2
    lo_y, hi_y = y0 + extent + max(0, -ty) * 0.2, y1 - extent - max(0, ty) * 0.2
    x = float(rng.uniform(lo_x, max(lo_x, hi_x)))
    y = float(rng.uniform(lo_y, max(lo_y, hi_y)))
    return Obj(shape, colour, x, y, r)


def _subject(rng: np.random.Generator, o: Obj, kind: str, forms: tuple[str, ...]) -> str:
    size = "small" if o.r < (SMALL + BIG) / 2 else "big"
    form = forms[rng.integers(len(forms))]
    if "{size}" in form and kind in ("grow", "shrink"):  # the size is what changes: not a stable word
        form = form.replace("{size} ", "")
    return form.format(colour=o.colour, shape=o.shape, size=size)


def _verb(rng: np.random.Generator, kind: str, new: str | None, table: dict) -> str:
    if kind in ("appear", "disappear") and rng.random() < 0.25:
        return ""  # "a faint red circle"
    phrases = table[kind]
    return phrases[rng.integers(len(phrases))].format(c=new)


def _describe_cue(rng: np.random.Generator, o: Obj, kind: str, new: str | None, forms: tuple[str, ...],
                  table: dict) -> str:
    verb = _verb(rng, kind, new, table)
    subject = _subject(rng, o, kind, forms)
    if not verb:
        art, rest = subject.split(" ", 1)
        return f"{art} faint {rest}"
    return f"{subject} {verb}"


def _rich_still(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, dict]:
    u = rng.random()
    colours = list(COLOURS)
    table = VERBS if rng.random() < 0.5 else STILL_VERBS  # the video phrasing or the -ing form
    if u < 0.3:  # a static scene of 1-3 objects at named positions
        n = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
        positions = [str(p) for p in rng.permutation(list(_POSITIONS))[:n]]
        shapes = [str(s) for s in rng.permutation(SHAPES)[:n]]
        with_pos = rng.random() < 0.8
        objs, words, meta = [], [], []
        for pos, sh in zip(positions, shapes):
            c, r = str(rng.choice(colours)), float(rng.choice([SMALL, BIG]))
            px, py = _POSITIONS[pos]
            o = Obj(sh, c, px + float(rng.uniform(-0.06, 0.06)), py + float(rng.uniform(-0.06, 0.06)), r)
            objs.append(o)
            subject = _subject(rng, o, "static", ("a {size} {colour} {shape}", "a {colour} {shape}", "the {size} {colour} {shape}", "the {colour} {shape}"))
            words.append(f"{subject} {pos}" if with_pos else subject)
            meta.append(dict(shape=sh, colour=c, size="small" if r == SMALL else "big", kind="static", new=None,
                             position=pos, mentioned=True))
        return render(objs, size), " and ".join(words), {"scene": "static", "objects": meta}
    if u < 0.8:  # one object with a still cue, sometimes a static distractor
        kind = str(rng.choice(KINDS))
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(colours))
        new = str(rng.choice([c for c in colours if c != colour])) if kind == "turn" else None
        o = _cue_object(rng, kind, shape, colour, (0.0, 1.0, 0.0, 1.0))
        items = _cue_items(o, kind, new, rng)
        caption = _describe_cue(rng, o, kind, new, SUBJECTS_ONE + ("the {shape}",), table)
        meta = [dict(shape=shape, colour=colour, size="small" if o.r == SMALL else "big", kind=kind, new=new,
                     position=None, mentioned=True)]
        if rng.random() < 0.3:
            other, oc = str(rng.choice([s for s in SHAPES if s != shape])), str(rng.choice(colours))
            d = Obj(other, oc, float(rng.uniform(0.15, 0.85)), float(rng.uniform(0.15, 0.85)), SMALL)
            mention = bool(rng.random() < 0.5)
            if mention:
                caption += f" and a small {oc} {other}"
            items = [d] + items
            meta.append(dict(shape=other, colour=oc, size="small", kind="static", new=None, position=None,
                             mentioned=mention))
        return render(items, size), caption, {"scene": "cue", "objects": meta}
    # two objects with cues, in two halves of the canvas (as in a two-event clip)
    shapes = [str(s) for s in rng.permutation(SHAPES)[:2]]
    horizontal = rng.random() < 0.5
    halves = [(0.0, 0.5, 0.0, 1.0), (0.5, 1.0, 0.0, 1.0)] if horizontal else [(0.0, 1.0, 0.0, 0.5), (0.0, 1.0, 0.5, 1.0)]
    items, parts, meta = [], [], []
    for shape, half in zip(shapes, halves):
        kind, colour = str(rng.choice(KINDS)), str(rng.choice(colours))
        new = str(rng.choice([c for c in colours if c != colour])) if kind == "turn" else None
        o = _cue_object(rng, kind, shape, colour, half)
        items += _cue_items(o, kind, new, rng)
        parts.append(_describe_cue(rng, o, kind, new, SUBJECTS_TWO + ("the {size} {colour} {shape}", "a {colour} {shape}"), table))
        meta.append(dict(shape=shape, colour=colour, size="small" if o.r == SMALL else "big", kind=kind, new=new,
                         position=None, mentioned=True))
    if rng.random() < 0.5:
        parts, meta = parts[::-1], meta[::-1]
    # "and"-joins, and the video captions' joins: a still cannot show which came first, so these
    # are learned as plain connectives (a zero-shot model is blind to their order, as CLIP is)
    joins = ("{a} and {b}", "{a}, and {b}", "{a} while {b}") + JOINS
    join = joins[rng.integers(len(joins))]
    return render(items, size), join.format(a=parts[0], b=parts[1]), {"scene": "two_cues", "objects": meta}


# --------------------------------------------------------------------------------------------
# The world on disk


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


WORLD_SIZES = {
    "smoke": WorldSize(train=16, val=4, test_reversed_pairs=4, test_swapped_pairs=2, test_singles=4, stills=32),
    "small": WorldSize(train=480, val=64, test_reversed_pairs=48, test_swapped_pairs=24, test_singles=48, stills=4000),
    "full": WorldSize(train=2400, val=200, test_reversed_pairs=150, test_swapped_pairs=75, test_singles=150,
                      stills=20000),
}

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
    ``world.json`` (sizes, counts, held-out compositions). Load it with
    ``get_dataset("collection", out, split)``.
    """
    spec = WORLD_SIZES[size] if isinstance(size, str) else size
    out = Path(out)
    items = _plan(seed, spec)
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
    world = {"seed": seed, "size": size if isinstance(size, str) else "custom", "spec": spec.__dict__,
             "counts": counts, "stills": spec.stills, "shapes": list(SHAPES), "colours": list(COLOURS),
             "event_kinds": list(KINDS), "heldout_compositions": [list(h) for h in HELDOUT]}
    (out / "world.json").write_text(json.dumps(world, indent=1) + "\n", encoding="utf-8")
    return world


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
