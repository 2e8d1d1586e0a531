"""Captions: the paraphrase tables and the caption of a clip's events.

``VERBS`` are the video captions' verb phrases per event kind; ``STILL_VERBS`` the same phrases in
the -ing form that still images are captioned with (:mod:`.stills`).
"""
from __future__ import annotations

import numpy as np

from vop.data.synth.scenes import BIG, SMALL, Clip, event_kinds

__all__ = ["VERBS", "STILL_VERBS", "SUBJECTS_ONE", "SUBJECTS_TWO", "JOINS", "describe", "clip_summary"]

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
