"""Scenes of the synthetic world: objects (shape, colour, position, size, opacity), timed events,
clips, and how random clips and their time-reversed / event-swapped twins are drawn.

Everything here is a description; :mod:`.renderer` draws it and :mod:`.grammar` captions it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "SHAPES", "COLOURS", "BACKGROUND", "SMALL", "BIG", "MOVE", "HELDOUT", "KINDS", "INVERSE", "Obj", "Event",
    "Clip", "state_before", "kind_of", "random_clip", "reverse_clip", "swap_events", "event_kinds", "is_heldout",
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


def state_before(clip: Clip, event: Event) -> Obj:
    """The state of ``event.obj`` when ``event`` starts."""
    s = clip.objects[event.obj]
    for e in clip.events:
        if e is event:
            return s
        if e.obj == event.obj:
            s = e.after
    raise ValueError("event not in clip")



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
