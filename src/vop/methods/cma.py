"""Cross-Modal Adapter (Jiang, Zhang, Huang et al., arXiv 2211.09623, 2022; Pattern Recognition 2025):
rank-r bottleneck adapters after both sublayers of every block of both towers, with a slice of every
up-projection shared by the image and the text adapter at the same (layer, site), and frames pooled
per text by a parameter-free softmax ("query score").

Built from the released code (LeapLabTHU/Cross-Modal-Adapter, ``modules/module_clip_jointvt_upshare_adapter.py``
and ``modules/adapter_controller.py``) as specified in the project's build spec (later-methods.md,
section 3). Every block l of both towers, site p in {attn, mlp} (the block's ``branch`` hook, reading
``out``):

- a = Attn(ln_1(x)); x <- x + a + Ad_{l,attn}(a); h = MLP(ln_2(x)); x <- x + h + Ad_{l,mlp}(h);
- Ad(u) = [U_unique z + b_unique ; U_share z + b_share] with z = QuickGELU(W_d u + b_d), W_d r x w;
  the first w - d_s output channels are the tower's own (U_unique (w - d_s) x r), the last d_s
  channels come from U_share d_s x r (+ b_share), ONE tensor read by the image and the text adapter
  at (l, p). w = 768 image, 512 text on ViT-B.
- Initialisation: every adapter weight truncated normal with std ``init_std`` (0.01; torch's
  ``trunc_normal_`` with its default bounds +-2, as the released code: at std 0.01 no draw reaches
  them), every bias 0. The up-projection is not zero: the model is not CLIP at step 0 (``init_std=0``
  gives CLIP exactly).

The shared up-projections live in ``shared_up[l][p]`` (registered first, so ``named_parameters()``,
which lists a Parameter once under its first name, the optimiser, the counts and the checkpoints see
each one once, as ``shared_up.<l>.<p>.weight/bias``); the adapters of both towers hold the same
module as ``.share`` (``model.text_adapters[l][p].share is model.visual_adapters[l][p].share``).
``model.state_dict()`` lists it under its three names (PyTorch's tied-weight convention); loading
copies into the one tensor, so a loaded model is shared again.

Towers of different depth (ViT-L/14: 24 image, 12 text blocks; the released code supports equal
depths only): layers l < min(depth) share, aligned from the input as the released code indexes them;
the deeper tower's remaining blocks get an up-projection of their own, all w channels.

Counts on ViT-B/32 and ViT-B/16 (r = 8, d_s = 16): image 147,456 + 192 + 144,384 + 18,048, text
98,304 + 192 + 95,232 + 11,904, shared 3,072 + 384 (once): 519,168. r = 16: 1,008,000; r = 16 and
d_s = 32: 1,001,472.

Scores (``pool="qscore"``, the released command's ``--q_score --q_score_temp 5``): per text t and video
j with unnormalised frame embeddings v_{j,f}: w = softmax_f(t . v_{j,f} / tau), vbar = sum_f w_f v_{j,f},
score = cos(t, vbar). Not a dual encoder: ``encode_video`` returns the frame embeddings and the model's
``scoring`` (:class:`QScore`, kind ``"qscore"``) pools them per text (``pairwise`` is True).
``pool="mean"``: the project's pipeline (CLIP4Clip meanP, base.py), a plain dual encoder, for the
one-protocol table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vop.backbone.layers import QuickGELU
from vop import limits
from vop.errors import ConfigError
from vop.methods.base import VideoTextModel
from vop.methods.registry import Expected, Rates, register
from vop.scoring import FrameScoring, Scoring

SITES = ("attn", "mlp")
POOLS = ("qscore", "mean")


@dataclass
class CMAOptions:
    r: int = 8  # bottleneck rank of every adapter
    share_dim: int = 16  # d_s: output channels of each up-projection shared by the two towers (last d_s)
    init_std: float = 0.01  # std of the truncated-normal init of every adapter weight (biases 0)
    pool: str = "qscore"  # "qscore": text-conditioned softmax over frames (pairwise); "mean": meanP (dual encoder)
    tau: float = 5.0  # temperature of the query-score softmax


def _init_linear(layer: nn.Linear, std: float) -> None:
    if std > 0:
        nn.init.trunc_normal_(layer.weight, mean=0.0, std=std)  # default bounds +-2, as the released code
    else:
        nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


class CMAAdapter(nn.Module):
    """Ad(u) = up(QuickGELU(down(u))), the up-projection's output the concatenation of the tower's own
    ``unique`` (w - d_s channels) and the ``share``d (last d_s channels; None when d_s = 0 or the layer
    has no partner in the other tower). (..., w) -> (..., w)."""

    def __init__(self, width: int, r: int, share: nn.Linear | None, std: float):
        super().__init__()
        d_s = share.out_features if share is not None else 0
        self.width = width
        self.down = nn.Linear(width, r)
        self.act = QuickGELU()
        self.unique = nn.Linear(r, width - d_s) if width > d_s else None
        self.share = share  # registered here too: the same module (and tensors) as the other tower's
        _init_linear(self.down, std)
        if self.unique is not None:
            _init_linear(self.unique, std)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        z = self.act(F.linear(u, self.down.weight.to(u.dtype), self.down.bias.to(u.dtype)))
        parts = [F.linear(z, m.weight.to(z.dtype), m.bias.to(z.dtype)) for m in (self.unique, self.share) if m is not None]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def frame_gram(frames: torch.Tensor) -> torch.Tensor:
    """(V, F, D) frame embeddings -> (V, F, F) Gram matrices G_j = V_j V_j^T (in at least float32), the
    part of :func:`qscore_similarity` that depends on the videos alone: an index may keep them
    (F^2 = 144 values per video at F = 12) instead of recomputing them for every chunk of texts."""
    v = frames.to(torch.promote_types(frames.dtype, torch.float32))
    return v @ v.transpose(1, 2)


def qscore_similarity(text: torch.Tensor, frames: torch.Tensor, tau: float,
                      gram: torch.Tensor | None = None) -> torch.Tensor:
    """cos(t, vbar_{t,j}) for every text t (rows of ``text``, (T, D)) and video j (``frames``, (V, F, D)),
    vbar_{t,j} = sum_f w_f v_{j,f}, w = softmax_f(t . v_{j,f} / tau), on unnormalised t and v -> (T, V).

    Efficient form, never a T x V x D tensor: s_{jft} = t . v_{j,f} is one (V*F, D) x (D, T) product;
    with e_f = exp((s_f - max_f s) / tau) (the softmax before its normalisation, which cancels):
    t_hat . vbar = sum_f e_f s_f / (|t| sum_f e_f) and |vbar| = sqrt(e^T G_j e) / sum_f e_f, G_j = V_j V_j^T
    the F x F Gram matrix of video j, so cos = sum_f e_f s_f / (|t| sqrt(e^T G_j e)). Intermediates: a few
    V x F x T tensors (scores, weights, G e) and the V x F x F Gram matrices, laid out (V, F, T) so that
    the reductions over frames run along contiguous texts. Each grows linearly in each chunk dimension:
    a chunk of texts x a chunk of videos gives that block of the full matrix. Computed in at least
    float32 (float64 stays float64), autocast switched off; differentiable (the training loss uses it).
    ``gram``: the videos' :func:`frame_gram`, if kept (else computed here, V x F^2 x D multiply-adds).
    """
    if text.dim() != 2 or frames.dim() != 3 or text.shape[-1] != frames.shape[-1]:
        raise ValueError(f"qscore similarity needs text (T, D) and per-frame video embeddings (V, F, D), got "
                         f"{tuple(text.shape)} and {tuple(frames.shape)} (encode_video of a pairwise model "
                         "returns frames; do not pool or normalise them)")
    dtype = torch.promote_types(torch.promote_types(text.dtype, frames.dtype), torch.float32)
    device = text.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):  # scores / tau feed a softmax: not in half precision
            return qscore_similarity(text, frames, tau, gram)
    t, v = text.to(dtype), frames.to(dtype)
    V, Fr, D = v.shape
    s = (v.reshape(V * Fr, D) @ t.t()).view(V, Fr, t.shape[0])  # (V, F, T): t . v_{j,f}
    e = s - s.amax(dim=1, keepdim=True).detach()  # the shift cancels exactly: no gradient needed through it
    e = e.mul_(1.0 / tau).exp_()  # unnormalised softmax weights over frames
    num = (e * s).sum(dim=1)  # (V, T)
    gram = frame_gram(v) if gram is None else gram.to(dtype)  # (V, F, F)
    if gram.shape != (V, Fr, Fr):
        raise ValueError(f"gram must be (V, F, F) = {(V, Fr, Fr)}, got {tuple(gram.shape)}")
    sq = (torch.bmm(gram, e) * e).sum(dim=1)  # (V, T): e^T G e
    cos = num / (sq.clamp_min(1e-30).sqrt() * t.norm(dim=-1).clamp_min(1e-12))
    return cos.t().contiguous()


class QScore(FrameScoring):
    """Cross-Modal Adapter's query score as a :class:`~vop.scoring.Scoring`: rows are a video's raw frame
    embeddings (F, D), queries the raw text embeddings, scores :func:`qscore_similarity` (cosines, unscaled)
    with temperature ``tau``; the per-video cache is the F x F Gram matrices (:func:`frame_gram`), which a
    gallery computes once (F^2 = 144 values per video at F = 12) so that a query costs N x F x D
    multiply-adds instead of N x F x (F + 1) x D."""

    kind = "qscore"

    def __init__(self, tau: float):
        self.tau = tau

    def cache(self, rows: torch.Tensor) -> torch.Tensor:
        return frame_gram(rows)

    def score(self, queries: torch.Tensor, rows: torch.Tensor, cache: torch.Tensor | None = None) -> torch.Tensor:
        return qscore_similarity(queries, rows, self.tau, gram=cache)


@register("cma", label="Cross-Modal Adapter",
          rates=Rates(1e-5, 0.0, "Cross-Modal Adapter's README command: lr 1e-5 for the adapters (BertAdam, "
                                 "warm-up 10% + cosine, 5 epochs, global batch 128, wd 0.2 on weights); CLIP frozen"),
          demo_rates=Rates(3e-3, 0.0, "the other adapters' synthetic-world rate; not tuned for cma"),
          # the 24 shared up-projections counted once; encode_video gives the frames (pairwise scores)
          expected=Expected(b32=519_168, clip_at_init=False, mean_pooled=False, option_sets=(({"pool": "mean"}, 519_168),)))
class CrossModalAdapter(VideoTextModel):
    """Cross-Modal Adapter: see the module docstring.

    Interface with ``pool="qscore"`` (``pairwise`` True, ``scoring`` a :class:`QScore`):

    - ``encode_text(tokens)`` -> (T, D) unnormalised;
    - ``encode_video(video (B, F, 3, H, W))`` -> (B, F, D) unnormalised frame embeddings (``encode_frames``);
    - ``similarity(text_emb (T, D), video_emb (V, F, D))`` -> (T, V) cosine of each text with its own
      pooling of each video, unscaled (logits = ``logit_scale`` x similarity; the v2t logits are the
      transpose); any chunk of texts x chunk of videos gives that block (the base class's, through
      ``scoring``);
    - ``forward(video, tokens)`` -> (frames (B, F, D), text (B, D)), both raw (not normalised).

    With ``pool="mean"`` (``pairwise`` False) every one of these is the base class's (dual encoder).
    """

    Options = CMAOptions

    @classmethod
    def check_options(cls, o, cfg, frames) -> None:
        limits.check_int(o.r, "cma: r", 1, limits.MAX_WIDTH, why="model.options.r, the adapters' bottleneck rank")

    @property
    def pairwise(self) -> bool:  # type: ignore[override]
        return self.opts.pool == "qscore"

    def build(self) -> None:
        o = self.opts
        if isinstance(o.r, bool) or not isinstance(o.r, int) or o.r < 1:
            raise ConfigError(f"cma: r must be an integer >= 1, got {o.r!r}")
        ct, cv = self.clip.tower_config("text"), self.clip.tower_config("visual")
        if isinstance(o.share_dim, bool) or not isinstance(o.share_dim, int) or not 0 <= o.share_dim <= min(ct.width, cv.width):
            raise ConfigError(f"cma: share_dim must be an integer in 0..{min(ct.width, cv.width)} "
                              f"(the narrower tower's width), got {o.share_dim!r}")
        if not (isinstance(o.init_std, (int, float)) and not isinstance(o.init_std, bool)
                and math.isfinite(o.init_std) and o.init_std >= 0):
            raise ConfigError(f"cma: init_std must be a number >= 0, got {o.init_std!r}")
        if o.pool not in POOLS:
            raise ConfigError(f"cma: pool must be one of {POOLS}, got {o.pool!r}")
        if not (isinstance(o.tau, (int, float)) and not isinstance(o.tau, bool) and o.tau > 0):
            raise ConfigError(f"cma: tau must be a number > 0, got {o.tau!r}")
        shared_layers = min(ct.layers, cv.layers) if o.share_dim else 0
        # registered before the adapters: each shared tensor is named (and counted, saved) once, here
        self.shared_up = nn.ModuleList(
            nn.ModuleDict({p: nn.Linear(o.r, o.share_dim) for p in SITES}) for _ in range(shared_layers))
        for layer in self.shared_up:
            for p in SITES:
                _init_linear(layer[p], o.init_std)
        for tower, c in (("text", ct), ("visual", cv)):
            setattr(self, f"{tower}_adapters", nn.ModuleList(
                nn.ModuleDict({p: CMAAdapter(c.width, o.r, self.shared(i, p), o.init_std) for p in SITES})
                for i in range(c.layers)))

    def shared(self, i: int, site: str) -> nn.Linear | None:
        """The up-projection slice shared by both towers at block ``i``, ``site`` (None: not shared there)."""
        return self.shared_up[i][site] if i < len(self.shared_up) else None

    def adapters(self, tower: str) -> nn.ModuleList:
        return self.text_adapters if tower == "text" else self.visual_adapters

    def branch(self, tower, i):
        ad = self.adapters(tower)[i]
        return lambda site, inp, out: ad[site](out)

    # -- scores --------------------------------------------------------------------------------------
    @property
    def scoring(self) -> Scoring:
        """``pool="qscore"``: :class:`QScore` (rows: the raw frame embeddings (F, D), queries: the raw text,
        scores: :func:`qscore_similarity`, cache: the frames' Gram matrices). ``pool="mean"``: the base
        class's cosine scoring (a dual encoder)."""
        return QScore(self.opts.tau) if self.pairwise else super().scoring

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """``pool="qscore"``: (B, F, 3, H, W) -> (B, F, D) unnormalised frame embeddings, pooled per text by
        the scoring. ``pool="mean"``: meanP (B, D), as every dual-encoder method."""
        return self.encode_frames(video) if self.pairwise else super().encode_video(video)
