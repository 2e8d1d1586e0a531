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

Modules, in the order they build on each other:

- :mod:`.scenes`: objects, events, clips; random clips and their twins; held-out compositions.
- :mod:`.renderer`: frames of objects and clips; :func:`write_video` (also used by tests).
- :mod:`.grammar`: the paraphrase tables and a clip's caption.
- :mod:`.stills`: still images with captions (:func:`make_stills`).
- :mod:`.world`: sizes (:data:`WORLD_SIZES`), :func:`generate_world`, readers of what it wrote.

Every public name of these modules is importable from ``vop.data.synth``.
"""
from vop.data.synth.grammar import JOINS, STILL_VERBS, SUBJECTS_ONE, SUBJECTS_TWO, VERBS, clip_summary, describe
from vop.data.synth.renderer import render, render_clip, write_video
from vop.data.synth.scenes import (
    BACKGROUND,
    BIG,
    COLOURS,
    HELDOUT,
    INVERSE,
    KINDS,
    MOVE,
    SHAPES,
    SMALL,
    Clip,
    Event,
    Obj,
    event_kinds,
    is_heldout,
    kind_of,
    random_clip,
    reverse_clip,
    state_before,
    swap_events,
)
from vop.data.synth.stills import STILL_STYLES, make_stills
from vop.data.synth.world import (
    GENERATOR,
    WORLD_ENTRIES,
    WORLD_SIZES,
    WorldSize,
    generate_world,
    heldout_subset,
    load_stills,
    temporal_subset,
    world_manifest,
)

__all__ = [
    "SHAPES", "COLOURS", "HELDOUT", "WorldSize", "WORLD_SIZES", "Obj", "Event", "Clip",
    "render", "render_clip", "random_clip", "reverse_clip", "swap_events", "describe",
    "write_video", "make_stills", "generate_world", "temporal_subset", "heldout_subset",
    "BACKGROUND", "SMALL", "BIG", "MOVE", "KINDS", "INVERSE", "state_before", "kind_of", "event_kinds",
    "is_heldout", "clip_summary", "VERBS", "STILL_VERBS", "SUBJECTS_ONE", "SUBJECTS_TWO", "JOINS",
    "STILL_STYLES", "load_stills", "GENERATOR", "WORLD_ENTRIES", "world_manifest",
]
