"""Still images with captions, for pretraining the tiny CLIP: objects at named positions, and
still cues of motion (a fading trail, inner rings, an outer halo, two colours, faint objects)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from vop.data.synth.grammar import JOINS, STILL_VERBS, SUBJECTS_ONE, SUBJECTS_TWO, VERBS
from vop.data.synth.renderer import render
from vop.data.synth.scenes import BACKGROUND, BIG, COLOURS, KINDS, SHAPES, SMALL, Obj

__all__ = ["STILL_STYLES", "make_stills"]

STILL_STYLES = ("basic", "rich")

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

    ``style="basic"`` (the default, written by :func:`~vop.data.synth.world.generate_world`) is the
    set described above.
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
