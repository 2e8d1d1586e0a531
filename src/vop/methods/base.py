"""The shared video-text model: frozen CLIP, mean-pooled frame embeddings, optional prompt modules.

Every method is a subclass that adds trainable pieces in ``build`` (prompt modules, adapters) and/or
names the CLIP tensors it trains in ``trains_clip``, registered with its facts
(vop.methods.registry.MethodFacts: label, what it trains of CLIP, learning rates). Methods reach the
backbone through its tower API (``clip.blocks``, ``clip.tower_config``, ``clip.head_parameters``, a
block's ``branch`` hook), never through its module tree. The pipeline itself is the paper's and is the
same for all:

- video (B, F, 3, H, W): every frame through the image tower, its final tokens read out by the tower
  (``clip.visual.readout``: [CLS] -> ln_post -> proj, or PE-Core's attention pool over every token ->
  proj), each frame embedding L2-normalised, then the mean over F (CLIP4Clip's meanP, as in the
  authors' code and DGL);
- text (B, T) token ids: the text tower, read at [EOT] (``clip.text_head``; SigLIP: at its last position, the
  sequence always filling its 64-token context), projected;
- score: cosine similarity times CLIP's logit scale (:attr:`VideoTextModel.scoring`, vop.scoring: a method that
  scores otherwise, e.g. cma's query score over frames, returns its own scoring).

A method never changes the CLIP it is given (its ``requires_grad`` flags, values, device, mode): the model
holds a *view* of it (:func:`clip_view`), the same module tree whose frozen tensors are new Parameters on
the caller's storage (no memory copied: several prompt sets share one backbone) and whose trained tensors
(``trains_clip``) are the model's own copies.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vop import limits
from vop.backbone.clip import CLIP, Tower
from vop.backbone.config import CLIPConfig
from vop.backbone.layers import Branch, RopeTable
from vop.backbone.tokenizer import CLIPTokenizer
from vop.errors import ConfigError
from vop.methods.blocks import Run, TextPrompts
from vop.methods.registry import MethodFacts, Rates, check_option_types
from vop.scoring import CosineScoring, Scoring


def pool_frames(frames: torch.Tensor) -> torch.Tensor:
    """(..., F, D) per-frame embeddings -> (..., D): the field's meanP (CLIP4Clip, the authors' port,
    DGL): every frame embedding L2-normalised, then averaged over frames."""
    return F.normalize(frames, dim=-1).mean(dim=-2)


@dataclasses.dataclass
class NoOptions:
    pass


def check_text_prompts(n: Any, cfg: CLIPConfig, name: str) -> int:
    """Text prompt tokens per layer: they and a caption of at least 3 tokens ([SOT], a word, [EOT]) must fit
    CLIP's text context (77 positions: at most 74 prompts)."""
    most = cfg.text.context_length - limits.MIN_CAPTION
    return limits.check_int(n, name, 0, most, why=f"the prompts and a caption of at least {limits.MIN_CAPTION} tokens "
                            f"must fit the backbone's {cfg.text.context_length}-token text context")


def check_prompt_tokens(n: Any, name: str) -> int:
    """Prompt tokens of one kind per frame, video or layer: 0..vop.limits.MAX_PROMPT_TOKENS."""
    return limits.check_int(n, name, 0, limits.MAX_PROMPT_TOKENS)


def check_depth(depth: Any, name: str) -> int | None:
    """A prompted depth: None (every layer) or 0..vop.limits.MAX_LAYERS (more than a tower has: all of it)."""
    return None if depth is None else limits.check_int(depth, name, 0, limits.MAX_LAYERS)


def check_frames_value(frames: Any, name: str) -> int:
    """Frames per video: an integer in 1..vop.limits.MAX_FRAMES (a ConfigError naming ``name``)."""
    return limits.check_int(frames, name, 1, limits.MAX_FRAMES,
                            why=f"vop samples at most {limits.MAX_FRAMES} frames per video")


#: set on a CLIP that vop built for one model alone (create_model / load_checkpoint resolved it from a name or
#: a file): that model takes it over instead of viewing it (no copy of the tensors it trains)
_PRIVATE = "_vop_built_for_one_model"


def private_backbone(clip: CLIP) -> CLIP:
    """Mark ``clip`` as built for the next model alone (nothing else holds it): the model takes it over."""
    clip.__dict__[_PRIVATE] = True
    return clip


def is_private_backbone(clip: CLIP) -> bool:
    """Whether ``clip`` is marked as built for the next model alone (:func:`private_backbone`)."""
    return _PRIVATE in clip.__dict__


def clip_view(clip: CLIP) -> CLIP:
    """The same module tree as ``clip`` (new module objects) whose every Parameter is a new frozen Parameter
    on the same storage (``requires_grad=False``; no memory copied); buffers and other attributes are shared,
    the containers holding them (parameters, buffers, submodules, hooks) are the view's own. Changing the
    view's flags, modes, devices, dtypes or Parameters leaves ``clip`` as it was (an in-place write to a frozen
    tensor's values would reach it: nothing in vop writes to frozen tensors)."""
    params: dict[int, nn.Parameter] = {}
    modules: dict[int, nn.Module] = {}

    def view(m: nn.Module) -> nn.Module:
        if id(m) in modules:  # a module registered twice stays one module
            return modules[id(m)]
        new = modules[id(m)] = m.__class__.__new__(m.__class__)
        state = {}
        for k, v in m.__dict__.items():
            if k == "_parameters":
                v = v.__class__((n, None if p is None else params.setdefault(id(p), nn.Parameter(p.detach(), requires_grad=False)))
                                for n, p in v.items())
            elif k == "_modules":
                v = v.__class__((n, None if c is None else view(c)) for n, c in v.items())
            elif isinstance(v, (dict, set, list)):
                v = copy.copy(v)
            state[k] = v
        state.pop(_PRIVATE, None)
        new.__dict__.update(state)
        return new

    return view(clip)


class VideoTextModel(nn.Module):
    name: ClassVar[str] = "base"
    #: declared by ``@register(...)``; what checkpoints, optimiser, demo and configs read
    facts: ClassVar[MethodFacts] = MethodFacts(label="base", rates=Rates(1e-3, 0.0))
    Options: ClassVar[type] = NoOptions
    #: options whose valid values depend on the backbone's depth (VoP^F's ks, MV-Adapter's cmt_layers):
    #: a run config naming a weights file is checked for them once the file is read, not before
    depth_options: ClassVar[tuple[str, ...]] = ()
    #: names of trainable tensors the paper does not count (reported separately)
    uncounted: ClassVar[tuple[str, ...]] = ()
    #: names (suffixes) of trainable tensors that provably never influence the output (DGL-linear's postfix
    #: projection, whose tokens sit after [EOT] under the causal mask): counted, and reported as "inert"
    inert: ClassVar[tuple[str, ...]] = ()
    #: informational (the code reads :attr:`scoring`): True where the scores need the text because a video
    #: is kept as its per-frame embeddings (Cross-Modal Adapter's query score). A method that scores
    #: differently overrides :attr:`scoring`, not this.
    pairwise: bool = False

    def __init__(self, clip: CLIP, frames: int = 12, options: Any = None):
        super().__init__()
        check_frames_value(frames, "frames (model.frames)")
        opts = options if options is not None else self.Options()
        # types and ranges of every option, against this backbone, before build() allocates anything
        check_option_types(self.name, opts)
        type(self).check_options(opts, clip.cfg, frames)
        why = type(self).unsupported_backbone(clip.cfg)
        if why is not None:
            raise ConfigError(f"method {self.name!r} cannot run on this backbone: {why}")
        # the caller's CLIP is never changed: the model holds a frozen view of it (shared storage) ...
        private = bool(clip.__dict__.pop(_PRIVATE, False))
        self.clip = clip.requires_grad_(False) if private else clip_view(clip)
        own: set[int] = set()  # ids of the CLIP Parameters the model owns (trains)
        self._frames = frames
        self.opts = opts
        self.text_prompts: TextPrompts | None = None
        self.video_prompts: nn.Module | None = None  # forward(x, run, B, F) -> (B*F, T, d) final tokens
        self.grad_checkpointing = False
        self.backbone_fingerprint: str | None = None
        # ... and its own copy of each tensor it trains, made before build() (whose modules may refer to them)
        self._take_clip_tensors(self.trains_clip(), "trains_clip()", own, private)
        self.build()
        # a build() that unfroze CLIP tensors itself (requires_grad_): those become the model's own too
        self._take_clip_tensors([p for p in self.clip.parameters() if p.requires_grad and id(p) not in own], "build()",
                                own, private)

    def _take_clip_tensors(self, params: Iterable[nn.Parameter], source: str, own: set[int], private: bool) -> None:
        """Make each of ``params`` (Parameters of ``self.clip``) a trained tensor the model owns (its id added to
        ``own``): a copy of the caller's values, or, for a CLIP built for this model alone (``private``), the
        tensor itself."""
        params = list(params)
        if not params:
            return
        where: dict[int, list[tuple[nn.Module, str]]] = {}
        for m in self.clip.modules():
            for k, p in m._parameters.items():
                if p is not None:
                    where.setdefault(id(p), []).append((m, k))
        for p in params:
            if id(p) in own:
                continue
            if not isinstance(p, nn.Parameter) or id(p) not in where:
                raise TypeError(f"method {self.name!r}: {source} gave {type(p).__name__} {tuple(getattr(p, 'shape', ()))}, "
                                "which is not a Parameter of self.clip (give self.clip's own, e.g. "
                                "self.clip.projection('text') or a block of self.clip.blocks(tower))")
            if private:
                mine = p.requires_grad_(True)
            else:
                mine = nn.Parameter(p.detach().clone(), requires_grad=True)
                for m, k in where[id(p)]:
                    m._parameters[k] = mine
            own.add(id(mine))

    # -- what a method defines ---------------------------------------------------------------------
    @classmethod
    def check_options(cls, opts: Any, cfg: CLIPConfig, frames: int) -> None:
        """Ranges of the options on a backbone of architecture ``cfg`` with ``frames`` frames per video, run
        before :meth:`build` (whose sizes they fix) and so before anything is allocated: a ConfigError naming
        the option. The types are already checked against the options' annotations (registry.parse_options:
        ints, finite floats, lists ...). Token counts must leave room in the text context, depths and widths
        stay within vop.limits, layer indices within the towers."""

    #: the method reads the image tower at one token, [CLS], by construction (its read-out or its modules
    #: treat [CLS] as the frame's embedding token): it refuses a tower read out otherwise (PE-Core's attention
    #: pool) or without [CLS] (:meth:`unsupported_backbone`)
    reads_cls: ClassVar[bool] = False

    @classmethod
    def unsupported_backbone(cls, cfg: CLIPConfig) -> str | None:
        """Why the method cannot run on a backbone of architecture ``cfg`` (None: it can); checked before
        anything is built. Default: a method that :attr:`reads_cls` needs an image tower read out at [CLS]."""
        if cls.reads_cls and cfg.vision.pool != "token":
            tower = ("has no [CLS] token and is read out by an attention pool over its patches" if not cfg.vision.class_token
                     else "is read out by an attention pool over all its tokens")
            return (f"it reads the image tower at its [CLS] token by construction, and this image tower {tower} "
                    f"({cfg.family}); it runs on towers read out at [CLS] (OpenAI's CLIP, EVA02-CLIP)")
        return None

    def trains_clip(self) -> Iterable[nn.Parameter]:
        """The CLIP tensors this method trains, as Parameters of ``self.clip`` (reached through its tower API:
        ``self.clip.projection(tower)``, ``self.clip.blocks(tower)``, ``self.clip.head_parameters(tower)``, or
        ``self.clip.named_parameters()`` by name); ``self.opts`` is set. Called once, before :meth:`build`.
        Each becomes the model's own copy with ``requires_grad=True`` (stored in its checkpoints); the rest of
        CLIP stays frozen and shared with the caller, whose CLIP is never changed. Default: none."""
        return ()

    def build(self) -> None:
        """Create the method's trainable modules (prompts, adapters ...); CLIP is frozen, except the tensors
        :meth:`trains_clip` named (already the model's own)."""

    @classmethod
    def config_options(cls, words: int, frames: int) -> dict[str, Any]:
        """Options the shipped configs (configs/make_configs.py) give this method on a dataset of captions of
        ``words`` tokens and ``frames`` frames per video (MV-Adapter: a text position per caption token).
        Default: none (the method's defaults)."""
        return {}

    def branch(self, tower: Tower, i: int) -> Branch | None:
        """A term added next to block ``i``'s sublayers (vop.backbone.layers.Branch); adapters return one."""
        return None

    def block(self, tower: Tower, i: int, blk: nn.Module, x: torch.Tensor, causal: bool,
              rope: RopeTable | None = None) -> torch.Tensor:
        """Run block ``i`` of ``tower`` ("text" or "visual"), with the method's branch if it has one.
        ``rope``: the rotation of this sequence's tokens (``clip.rope``; None without RoPE). A method that
        changes the block itself (not only adds to it) overrides this."""
        branch = self.branch(tower, i)
        if branch is None:
            return blk(x, causal=causal) if rope is None else blk(x, causal=causal, rope=rope)
        return blk(x, causal=causal, branch=branch, rope=rope)

    # -- memory estimate (vop.memory) -------------------------------------------------------------------
    def grad_start(self, tower: Tower) -> int | None:
        """The first block of ``tower`` whose activations the method's own trainable tensors (prompts,
        adapters ...) need in the backward pass; None: they do not reach that tower. For the memory estimate
        of a training step (vop.memory.kept_blocks; CLIP's own trainable blocks are found there). Default: 0
        when the method has trainable tensors outside CLIP, else None; a method whose modules enter later
        (prompts of the last layers only) or in one tower says so."""
        own = any(p.requires_grad for n, p in self.named_parameters() if not n.startswith("clip."))
        return 0 if own else None

    @property
    def video_prompt_tokens(self) -> int:
        """Prompt tokens each frame carries through the image tower (for the memory estimate)."""
        n = getattr(self.opts, "n_video", 0)
        return n if self.video_prompts is not None and isinstance(n, int) else 0

    # -- frames ----------------------------------------------------------------------------------------
    @property
    def frames(self) -> int:
        """Frames per video the model was built with (read-only: tensors may be sized by it)."""
        return self._frames

    def frame_bound_tensor(self) -> str | None:
        """What fixes the number of frames per video, if anything: a submodule whose ``frame_bound()``
        names a learned tensor per frame position (VoP^P's position-specific prompts, VoP^F's frame
        position embedding). None: any count works."""
        for m in self.modules():
            bound = m.frame_bound() if m is not self and callable(getattr(m, "frame_bound", None)) else None
            if bound:
                return bound
        return None

    def check_frames(self, frames: int | None, source: str = "this model") -> int:
        """The frame count to run with (``None``: the model's); a clear ConfigError, before any video is
        decoded, when the model cannot take ``frames``."""
        if frames is None:
            return self.frames
        check_frames_value(frames, "--frames")
        bound = self.frame_bound_tensor()
        if frames != self.frames and bound is not None:
            raise ConfigError(
                f"{source}: this {self.name} model was trained with {self.frames} frames per video and its {bound} "
                f"(one learned tensor per frame position) fixes that count, so --frames {frames} is not possible: "
                f"leave --frames out (or give {self.frames}), or train with model.frames={frames}")
        return frames

    # -- derived sizes -------------------------------------------------------------------------------
    @property
    def text_prompt_tokens(self) -> int:
        return self.text_prompts.n if self.text_prompts is not None and self.text_prompts.depth else 0

    @property
    def max_text_tokens(self) -> int:
        """Caption budget including [SOT]/[EOT]: CLIP's context minus the text prompt tokens. A text tower read at
        its last position (SigLIP) keeps its whole context whatever the prompts (its sequences always fill it:
        the prompt slot comes on top, docs/methods.md, SigLIP)."""
        t = self.clip.cfg.text
        return t.context_length if t.pool == "last" else t.context_length - self.text_prompt_tokens

    def tokenizer(self, max_words: int | None = None) -> CLIPTokenizer:
        """The backbone's tokenizer (``clip.tokenizer``) with the caption budget: its context (77 for CLIP and
        EVA02, 32 for PE-Core) minus the text prompt tokens, or ``max_words`` if smaller. SigLIP's always gives its
        64 positions (padded), the caption capped at the budget within them."""
        n = self.max_text_tokens if max_words is None else min(max_words, self.max_text_tokens)
        return self.clip.tokenizer(n)

    @property
    def preprocess(self):
        """How frames become this model's input (the backbone's: ``clip.preprocess``)."""
        return self.clip.preprocess

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.opts)

    # -- forward -------------------------------------------------------------------------------------
    def _runner(self, tower: str) -> Run:
        """``run(i, x, tiles=1)``: block ``i`` of ``tower`` on ``x``. In the image tower, the last ``tiles`` * M
        tokens of ``x`` are the patches of ``tiles`` frames and every token before them ([CLS], prompts) gets
        the identity rotation (vop.backbone.layers.Rope: one table row per patch)."""
        blocks = self.clip.blocks(tower)
        causal = tower == "text" and self.clip.cfg.text.causal
        clip = self.clip

        def run(i: int, x: torch.Tensor, tiles: int = 1) -> torch.Tensor:
            rope = clip.rope(tower, x.shape[1], tiles)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                return checkpoint(self.block, tower, i, blocks[i], x, causal, rope, use_reentrant=False)
            return self.block(tower, i, blocks[i], x, causal, rope)

        return run

    def check_text_length(self, tokens: torch.Tensor) -> None:
        if tokens.shape[1] > self.max_text_tokens:
            raise ValueError(
                f"{tokens.shape[1]} text tokens but this model takes at most {self.max_text_tokens} "
                f"({self.text_prompt_tokens} of CLIP's context are prompts): use model.tokenizer()"
            )

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids, T <= ``max_text_tokens`` -> (B, D) unnormalised embeddings."""
        self.check_text_length(tokens)
        x = self.clip.embed_text(tokens)
        run = self._runner("text")
        if self.text_prompts is not None:
            x = self.text_prompts(x, run)
        else:
            for i in range(len(self.clip.blocks("text"))):
                x = run(i, x)
        return self.clip.text_head(x, tokens)

    def encode_frames(self, video: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) -> (B, F, D) per-frame embeddings (before mean pooling)."""
        if video.dim() != 5:
            raise ValueError(f"videos must be B x F x 3 x H x W, got shape {tuple(video.shape)}")
        B, F = video.shape[:2]
        x = self.clip.visual.embed(video.flatten(0, 1))
        run = self._runner("visual")
        if self.video_prompts is not None:
            x = self.video_prompts(x, run, B, F)  # each frame's final tokens, prompts removed
        else:
            for i in range(len(self.clip.blocks("visual"))):
                x = run(i, x)
        return self.clip.visual.readout(x).view(B, F, -1)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) -> (B, D): meanP, the mean of the L2-normalised frame embeddings.

        The result is not unit length (normalise it, or use :meth:`similarity`, for the cosine)."""
        return pool_frames(self.encode_frames(video))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    @property
    def scoring(self) -> Scoring:
        """How this model scores texts against videos (:mod:`vop.scoring`): what a video's row is, how an
        ``encode_video`` / ``encode_text`` batch becomes rows / queries, the scores. The base class's is
        the dual encoder's :class:`~vop.scoring.CosineScoring`; a method that scores differently (cma's
        query score) returns its own. Training, evaluation, indexing and search all read it."""
        return CosineScoring()

    def similarity(self, text_emb: torch.Tensor, video_emb: torch.Tensor, cache: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (texts x videos), unscaled, of raw ``encode_text`` and ``encode_video`` outputs: this model's
        :attr:`scoring` (the base class: cosine similarity, at least float32). ``cache``: this model's
        :meth:`gallery_cache` of ``video_emb`` (rows aligned with the videos), if the caller keeps one; the
        same scores."""
        s = self.scoring
        return s.score(s.queries(text_emb), s.rows(video_emb), cache)

    def gallery_cache(self, video_emb: torch.Tensor) -> torch.Tensor | None:
        """Work on the videos alone that :meth:`similarity` can reuse across queries (one row per video, so
        an index slices it with the videos), or None: its :attr:`scoring`'s ``cache`` (cma: the frame Gram
        matrices)."""
        return self.scoring.cache(video_emb)

    def forward(self, video: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(video rows, text queries) as :attr:`scoring` scores them: L2-normalised (video_emb, text_emb) for
        a dual encoder (cma's query score: the raw frames (B, F, D) and text (B, D))."""
        s = self.scoring
        return s.rows(self.encode_video(video)), s.queries(self.encode_text(tokens))

    # -- trainable state -----------------------------------------------------------------------------
    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_trainable_parameters()}

    def no_weight_decay(self) -> set[str]:
        """Names of trainable tensors that get no weight decay: every tensor of fewer than 2 dimensions
        (biases, LayerNorms, the logit scale) and every tensor a submodule lists in its own
        ``no_weight_decay()`` (prompt tokens, embeddings added to tokens), as open_clip asks its towers.
        A new module with tokens among its parameters declares them there."""
        declared: set[str] = set()
        for prefix, m in self.named_modules():
            if m is not self and callable(getattr(m, "no_weight_decay", None)):
                declared |= {f"{prefix}.{n}" for n in m.no_weight_decay()}
        return {n for n, p in self.named_trainable_parameters() if p.ndim < 2 or n in declared}

    def set_grad_checkpointing(self, enabled: bool = True) -> "VideoTextModel":
        self.grad_checkpointing = enabled
        return self

    def parameter_counts(self) -> dict[str, int]:
        """trainable (everything the optimiser updates), counted (the paper's way), uncounted, inert (trainable
        tensors that never influence the output; part of trainable and counted), backbone."""
        trainable = sum(p.numel() for _, p in self.named_trainable_parameters())
        uncounted = sum(p.numel() for n, p in self.named_trainable_parameters() if self.uncounted and n.endswith(self.uncounted))
        inert = sum(p.numel() for n, p in self.named_trainable_parameters() if self.inert and n.endswith(self.inert))
        backbone = sum(p.numel() for p in self.clip.parameters())
        return {"trainable": trainable, "counted": trainable - uncounted, "uncounted": uncounted, "inert": inert,
                "backbone": backbone}

    def __repr__(self) -> str:  # short: the full module tree of CLIP is not useful here
        c = self.parameter_counts()
        return f"{type(self).__name__}(method={self.name!r}, frames={self.frames}, options={self.options_dict()}, trainable={c['trainable']:,})"
