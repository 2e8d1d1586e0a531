"""The VoP family: deep text prompts plus video prompts, composed from two choices.

- **frame-token source**: the tokens each frame gets in a per-frame layer. ``shared`` (basic VoP:
  n tokens per layer, the same for every frame), ``position`` (VoP^P: of the n, ``n_position`` are
  specific to the frame's position j in its video), ``context`` (VoP^C: ``n_context`` are generated
  from the frames' [CLS] tokens by a BiLSTM + linear layer shared across layers);
- **flow** through the image tower: ``frame`` (every layer per frame, prompts in the first ``depth``
  layers) or ``split`` (VoP^F: layers < ks per frame with the source's tokens, then a learnable frame
  position embedding and joint video layers >= ks over [F CLS, n_video video-level prompts, F*M patches]).

The six registered variants are written out at the bottom (``class VoPF`` ...), each a source and a
flow; options are declared once per group and composed. Counts on ViT-B/32, 12 frames, n = 8: VoP 122,880 (12*8*512 + 12*8*768); VoP^P 528,384;
VoP^C 14,257,152; VoP^F 122,880; VoP^{F+P} 393,216; VoP^{F+C} 14,269,440 (our reconstruction; the
paper reports 14.1M). VoP^F's frame position embedding (9,216) is trainable but, as in the paper,
reported separately (``uncounted``).

Ablations as options: ``n_video=0`` (text-only prompts), ``n_text=0`` (video-only), ``depth``
(prompted layers counted from the input, or the last ``depth`` layers with ``prompt_from="output"``),
``n_text``/``n_video`` (prompt length), ``ks``.

``semantics="modelscope"`` (basic VoP only) runs the same prompts the way the authors' released code
does (their ModelScope models load with ``vop.load_checkpoint(FOLDER)``): the first layer's video
prompts go through ``ln_pre``; the last ``n_text_suffix`` text prompts sit before the last position of
the sequence, which is zero-padded to CLIP's context; prompts take text positions; the text is read
``n_text`` positions after [EOT]. See docs/methods.md, "Loading the authors' models".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vop import limits
from vop.errors import ConfigError
from vop.methods.base import VideoTextModel, check_depth, check_prompt_tokens, check_text_prompts
from vop.methods.blocks import (ContextFrameTokens, ContextModule, FrameTokens, FrameVideoPrompts, FunctionVideoPrompts,
                                PositionFrameTokens, SharedFrameTokens, SplitTextPrompts, TextPrompts)
from vop.methods.registry import Expected, Rates, register

SEMANTICS = ("vop", "modelscope")


# ------------------------------------------------------------------------------------------------
# option groups (each field declared once)
# ------------------------------------------------------------------------------------------------
@dataclass
class PromptOptions:
    n_text: int = 8
    n_video: int = 8


@dataclass
class DepthOptions:
    depth: int | None = None  # None: every layer (the paper's best)
    prompt_from: str = "input"  # "input": the first `depth` layers are prompted; "output": the last `depth`


@dataclass
class SplitOptions:
    ks: int | None = None  # None: round(2/3 * layers) -> 8 on ViT-B
    frame_position_std: float = 0.02  # init of the frame position embedding (the ablation in docs/results.md)


@dataclass
class PositionOptions:
    n_position: int = 4


@dataclass
class ContextOptions:
    n_context: int = 4
    context_hidden: int | None = None  # None: d_v, as in the paper


@dataclass
class SemanticsOptions:
    semantics: str = "vop"  # "modelscope": as the authors' released code (see the module docstring)
    n_text_suffix: int = 0  # modelscope: of the n_text text prompts, how many sit before the last position


def compose_options(name: str, *groups: type) -> type:
    """One options dataclass with the fields of ``groups``, in order (a name in two groups is an error)."""
    fields, seen = [], set()
    for group in groups:
        for f in dataclasses.fields(group):
            if f.name in seen:
                raise TypeError(f"option {f.name!r} declared twice in {name}")
            seen.add(f.name)
            fields.append((f.name, f.type, dataclasses.field(default=f.default)))
    return dataclasses.make_dataclass(name, fields)


# ------------------------------------------------------------------------------------------------
# frame-token sources: (model, depth) -> the frame-level prompt tokens of the first ``depth`` layers
# ------------------------------------------------------------------------------------------------
class Shared:
    options: tuple[type, ...] = ()

    def __call__(self, model: VideoTextModel, depth: int) -> FrameTokens:
        return SharedFrameTokens(depth, model.opts.n_video, model.clip.tower_config("visual").width)


class Position:
    options = (PositionOptions,)

    def __call__(self, model: VideoTextModel, depth: int) -> FrameTokens:
        o = model.opts
        if not 0 <= o.n_position <= o.n_video:
            raise ConfigError(f"model.options.n_position={o.n_position} of {model.name} must be in 0..{o.n_video} "
                              f"(the position-specific part of the n_video={o.n_video} video prompts)")
        return PositionFrameTokens(depth, o.n_video - o.n_position, o.n_position, model.frames,
                                   model.clip.tower_config("visual").width)


class Context:
    options = (ContextOptions,)

    def __call__(self, model: VideoTextModel, depth: int) -> FrameTokens:
        o, width = model.opts, model.clip.tower_config("visual").width
        if not 0 < o.n_context <= o.n_video:
            raise ConfigError(f"model.options.n_context={o.n_context} of {model.name} must be in 1..{o.n_video} "
                              f"(the generated part of the n_video={o.n_video} video prompts)")
        return ContextFrameTokens(depth, o.n_video - o.n_context, ContextModule(width, o.n_context, o.context_hidden), width)


# ------------------------------------------------------------------------------------------------
# flows through the image tower: (model, source) -> the video prompt module (or None)
# ------------------------------------------------------------------------------------------------
class PerFrame:
    options = (DepthOptions,)
    uncounted: tuple[str, ...] = ()
    depth_options: tuple[str, ...] = ()  # depth is capped at the backbone's layers

    @staticmethod
    def span(model: VideoTextModel, tower: str) -> tuple[int, int]:
        """(first prompted layer, prompted layers) of ``tower``: ``depth`` layers from the input, or the
        last ``depth`` layers with ``prompt_from="output"``."""
        layers, o = model.clip.tower_config(tower).layers, model.opts
        if o.prompt_from not in ("input", "output"):
            raise ConfigError(f"model.options.prompt_from={o.prompt_from!r} of {model.name} must be input or output")
        depth = layers if o.depth is None else min(o.depth, layers)
        return (layers - depth if o.prompt_from == "output" else 0), depth

    def text_depth(self, model: VideoTextModel) -> int:
        return self.span(model, "text")[1]

    def text_start(self, model: VideoTextModel) -> int:
        return self.span(model, "text")[0]

    def __call__(self, model: VideoTextModel, source) -> nn.Module | None:
        layers = model.clip.tower_config("visual").layers
        start, depth = self.span(model, "visual")
        if not (model.opts.n_video and depth):
            return None
        tokens = source(model, depth)
        tokens.start = start
        return FrameVideoPrompts(tokens, layers)


class Split:
    options = (SplitOptions,)
    uncounted = ("frame_position",)
    depth_options = ("ks",)

    def text_depth(self, model: VideoTextModel) -> int:
        return model.clip.tower_config("text").layers

    def text_start(self, model: VideoTextModel) -> int:
        return 0

    def __call__(self, model: VideoTextModel, source) -> nn.Module | None:
        o, v = model.opts, model.clip.tower_config("visual")
        ks = round(2 * v.layers / 3) if o.ks is None else o.ks
        if not 0 <= ks <= v.layers:
            raise ConfigError(f"model.options.ks={ks} of {model.name} must be in 0..{v.layers} "
                              f"(the layers of this backbone's image tower)")
        shallow = source(model, ks) if (ks and o.n_video) else None
        return FunctionVideoPrompts(shallow, v.layers, ks, model.frames, o.n_video, v.width, o.frame_position_std)


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
class PromptedVoP(VideoTextModel):
    """Deep text prompts (first ``flow.text_depth`` layers, after [SOT]) + the flow's video prompts."""

    source: ClassVar[Shared | Position | Context] = Shared()
    flow: ClassVar[PerFrame | Split] = PerFrame()

    @classmethod
    def check_options(cls, opts, cfg, frames) -> None:
        """Every option of the family that ``opts`` has (the groups are composed per variant)."""
        name = lambda f: f"model.options.{f} of {cls.name}"  # noqa: E731
        has = lambda f: hasattr(opts, f)  # noqa: E731
        check_text_prompts(opts.n_text, cfg, name("n_text"))
        check_prompt_tokens(opts.n_video, name("n_video"))
        if has("depth"):
            check_depth(opts.depth, name("depth"))
        if has("prompt_from") and opts.prompt_from not in ("input", "output"):
            raise ConfigError(f"{name('prompt_from')}={opts.prompt_from!r} must be input or output")
        if has("frame_position_std"):
            limits.check_float(opts.frame_position_std, name("frame_position_std"), 0)
        # n_position, n_context (against n_video) and ks (against the layers) are checked by build(), before
        # their tensors exist (their messages are older than this hook)
        if has("context_hidden") and opts.context_hidden is not None:
            limits.check_int(opts.context_hidden, name("context_hidden"), 1, limits.MAX_WIDTH)

    def grad_start(self, tower):
        if tower == "text":
            tp = self.text_prompts
            return None if tp is None else getattr(tp, "start", 0)
        vp = self.video_prompts
        if vp is None:
            return None
        if isinstance(vp, FunctionVideoPrompts):  # VoP^F: frame prompts from 0, else the video prompts from ks
            return 0 if vp.shallow is not None else vp.ks
        return getattr(getattr(vp, "source", None), "start", 0)

    def build(self) -> None:
        t = self.clip.tower_config("text")
        text_depth = self.flow.text_depth(self)
        if self.opts.n_text and text_depth:
            self.text_prompts = TextPrompts(t.layers, text_depth, self.opts.n_text, t.width, start=self.flow.text_start(self))
        self.video_prompts = self.flow(self, self.source)


@register("vop", label="VoP", rates=Rates(5e-3, 1e-6, "prompt tuning recipes use 1e-3..1e-2 for prompts"),
          expected=Expected(b32=122_880, clip_at_init=False, option_sets=(({"semantics": "modelscope"}, 122_880),)))
class VoP(PromptedVoP):
    """Basic VoP, which can also run the authors' released layout (``semantics="modelscope"``)."""

    Options = compose_options("BasicVoPOptions", PromptOptions, DepthOptions, SemanticsOptions)

    @property
    def modelscope(self) -> bool:
        return self.opts.semantics == "modelscope"

    def build(self) -> None:
        o = self.opts
        if o.semantics not in SEMANTICS:
            raise ConfigError(f"option semantics must be one of {', '.join(SEMANTICS)}, got {o.semantics!r}")
        if self.modelscope:
            return self.build_modelscope()
        if o.n_text_suffix:
            raise ConfigError("option n_text_suffix needs semantics='modelscope'")
        super().build()

    def build_modelscope(self) -> None:
        """Prompts in every layer of both towers, laid out as in the authors' code."""
        o, t, v = self.opts, self.clip.tower_config("text"), self.clip.tower_config("visual")
        if o.depth is not None or o.prompt_from != "input":
            raise ConfigError("semantics='modelscope' prompts every layer (as the authors' code): leave depth unset "
                              "(and prompt_from)")
        if o.n_text_suffix > o.n_text:
            raise ConfigError(f"n_text_suffix={o.n_text_suffix} exceeds n_text={o.n_text}")
        if o.n_text:
            self.text_prompts = SplitTextPrompts(t.layers, o.n_text - o.n_text_suffix, o.n_text_suffix, t.width)
        if o.n_video:
            tokens = SharedFrameTokens(v.layers, o.n_video, v.width, first_norm=self.clip.visual.ln_pre)
            self.video_prompts = FrameVideoPrompts(tokens, v.layers)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if not (self.modelscope and self.text_prompts is not None):
            return super().encode_text(tokens)
        self.check_text_length(tokens)
        # the authors' sequences always fill CLIP's context: the suffix slot sits before its last position
        tokens = F.pad(tokens, (0, self.max_text_tokens - tokens.shape[1]))
        x = self.text_prompts(self.clip.token_embedding(tokens), self._runner("text"), self.clip.positional_embedding)
        x = self.clip.ln_final(x)
        read = tokens.argmax(dim=-1) + self.text_prompt_tokens  # n_text positions after [EOT], as their code reads
        return x[torch.arange(x.shape[0], device=x.device), read] @ self.clip.text_projection


_AS_VOP = Rates(5e-3, 1e-6, "as vop")


def variant_options(name: str, source: type, flow: type) -> type:
    """A variant's options: the prompts, then its flow's groups, then its frame-token source's."""
    return compose_options(name, PromptOptions, *flow.options, *source.options)


# The five variants: a frame-token source x a flow. Counts on ViT-B/32 in the module docstring.
@register("vop-p", label="VoP^P", rates=_AS_VOP,
          expected=Expected(b32=528_384, clip_at_init=False, frame_order=True))
class VoPP(PromptedVoP):
    """VoP^P: position frame tokens, frame flow."""

    source, flow = Position(), PerFrame()
    Options = variant_options("VoPPOptions", Position, PerFrame)
    uncounted, depth_options = PerFrame.uncounted, PerFrame.depth_options


@register("vop-c", label="VoP^C", rates=Rates(1e-3, 1e-6, "14M-parameter context module (BiLSTM + linear): a lower rate "
                                                        "than pure prompts"),
          expected=Expected(b32=14_257_152, clip_at_init=False, frame_order=True))
class VoPC(PromptedVoP):
    """VoP^C: context frame tokens, frame flow."""

    source, flow = Context(), PerFrame()
    Options = variant_options("VoPCOptions", Context, PerFrame)
    uncounted, depth_options = PerFrame.uncounted, PerFrame.depth_options


@register("vop-f", label="VoP^F", rates=_AS_VOP,
          expected=Expected(b32=122_880, b32_uncounted=9_216, clip_at_init=False, frame_order=True,
                            option_sets=(({"ks": 1}, 122_880 + 9_216),)))
class VoPF(PromptedVoP):
    """VoP^F: shared frame tokens, split flow."""

    source, flow = Shared(), Split()
    Options = variant_options("VoPFOptions", Shared, Split)
    uncounted, depth_options = Split.uncounted, Split.depth_options


@register("vop-fp", label="VoP^{F+P}", rates=_AS_VOP,
          expected=Expected(b32=393_216, b32_uncounted=9_216, clip_at_init=False, frame_order=True))
class VoPFP(PromptedVoP):
    """VoP^{F+P}: position frame tokens, split flow."""

    source, flow = Position(), Split()
    Options = variant_options("VoPFPOptions", Position, Split)
    uncounted, depth_options = Split.uncounted, Split.depth_options


@register("vop-fc", label="VoP^{F+C}", rates=Rates(1e-3, 1e-6, "as vop-c"),
          expected=Expected(b32=14_269_440, b32_uncounted=9_216, clip_at_init=False, frame_order=True))
class VoPFC(PromptedVoP):
    """VoP^{F+C}: context frame tokens, split flow."""

    source, flow = Context(), Split()
    Options = variant_options("VoPFCOptions", Context, Split)
    uncounted, depth_options = Split.uncounted, Split.depth_options
