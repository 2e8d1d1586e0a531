"""A method never changes the CLIP it is given (issue 24): what it trains is its own.

Several models built on ONE CLIP instance, in any order, each keep their trainable tensors; the caller's
CLIP keeps its ``requires_grad`` flags, values and mode; a training step of one model changes no other
model's outputs; every checkpoint reloads bit-identically onto the shared CLIP; the frozen tensors stay
shared (one copy of the backbone's memory). Registry-driven: every method of vop with each option set its
``Expected`` declares."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vop
from vop.methods import create_model, get_method, list_methods, plugin_of
from vop.backbone.checkpoint import weights_fingerprint
from vop.methods.base import VideoTextModel

#: the methods the issue names: prompts, biases, the top block, everything, an adapter
GROUP = ("vop", "bias", "partial", "full", "adapter-attn")
VOP_METHODS = [m for m in list_methods() if plugin_of(m) is None]
#: every method of vop with its default options and each option set it declares
CASES = [(m, {}) for m in VOP_METHODS] + [(m, opts) for m in VOP_METHODS
                                         for opts, _ in (get_method(m).expected.option_sets if get_method(m).expected else ())]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is fastest (conftest restores the count after each test)."""
    torch.set_num_threads(1)


def _clip(frozen: bool = False):
    clip = vop.build_clip("tiny", seed=0).eval()
    return clip.requires_grad_(False) if frozen else clip


def _snapshot(clip):
    return {n: (p.requires_grad, p.detach().clone(), p.untyped_storage().data_ptr()) for n, p in clip.named_parameters()}


def _assert_unchanged(clip, snap, training=False):
    assert clip.training == training and all(m.training == training for m in clip.modules())
    for n, p in clip.named_parameters():
        flag, value, ptr = snap[n]
        assert p.requires_grad == flag, f"the caller's {n}: requires_grad flipped"
        assert p.dtype == value.dtype and p.untyped_storage().data_ptr() == ptr and torch.equal(p.detach(), value), \
            f"the caller's {n} changed"


def _inputs():
    g = torch.Generator().manual_seed(0)
    video = torch.randn(2, 4, 3, 32, 32, generator=g)
    tokens = vop.CLIPTokenizer(16)(["a red circle moving left", "the square turns blue"])
    return video, tokens


def _outputs(model, video, tokens):
    model.eval()
    with torch.no_grad():
        v, t = model.encode_video(video), model.encode_text(tokens)
        return torch.cat([v.flatten(), t.flatten(), (model.similarity(t, v) if model.pairwise else t @ v.t()).flatten()])


def _step(model, video, tokens) -> bool:
    """One AdamW step of the symmetric contrastive loss; False when the model trains nothing."""
    params = model.trainable_parameters()
    if not params:
        return False
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-2)
    v, t = model(video, tokens)
    logits = model.logit_scale * (model.similarity(t, v) if model.pairwise else t @ v.t())
    labels = torch.arange(len(tokens))
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2).backward()
    opt.step()
    model.eval()
    return True


def _trained_names(model):
    return sorted(n for n, _ in model.named_trainable_parameters())


def _check_shared_storage(model, clip):
    """The model's frozen CLIP tensors are the caller's storage; those it trains are its own."""
    caller = dict(clip.named_parameters())
    for n, p in model.clip.named_parameters():
        same = p.untyped_storage().data_ptr() == caller[n].untyped_storage().data_ptr()
        assert same != p.requires_grad, f"{model.name}: clip.{n} (trained: {p.requires_grad}) shares the caller's storage: {same}"


def _orders(group):
    """Every method in every position once, each pair in both orders: the rotations of the group and of its reverse."""
    out = []
    for seq in (list(group), list(reversed(group))):
        out += [tuple(seq[i:] + seq[:i]) for i in range(len(seq))]
    return out


@pytest.mark.parametrize("frozen_caller", [False, True], ids=["caller-trains", "caller-frozen"])
def test_models_on_one_clip_in_any_order_keep_their_counts_and_the_callers_clip(frozen_caller):
    clip = _clip(frozen_caller)
    snap = _snapshot(clip)
    alone = {m: create_model(m, _clip(), frames=4) for m in GROUP}
    want = {m: (a.parameter_counts(), _trained_names(a)) for m, a in alone.items()}
    assert want["vop"][0]["trainable"] < want["bias"][0]["trainable"] < want["partial"][0]["trainable"] < \
        want["full"][0]["trainable"] == want["full"][0]["backbone"]
    orders = _orders(GROUP)
    assert len(set(orders)) == 10
    for order in orders:
        models = {m: create_model(m, clip, frames=4) for m in order}
        for m in GROUP:
            assert (models[m].parameter_counts(), _trained_names(models[m])) == want[m], (order, m)
            _check_shared_storage(models[m], clip)
        _assert_unchanged(clip, snap)


@pytest.mark.parametrize("order", [GROUP, tuple(reversed(GROUP))], ids=["forward", "reversed"])
def test_a_training_step_of_one_changes_no_other_and_every_checkpoint_reloads(order, tmp_path):
    clip = _clip()
    snap = _snapshot(clip)
    video, tokens = _inputs()
    models = {m: create_model(m, clip, frames=4) for m in order}
    _assert_unchanged(clip, snap)
    start = {m: _outputs(models[m], video, tokens) for m in order}
    after = {}
    for m in order:
        assert torch.equal(_outputs(models[m], video, tokens), start[m]), f"a step of a model before {m} changed it"
        assert _step(models[m], video, tokens)
        after[m] = _outputs(models[m], video, tokens)
        assert not torch.equal(after[m], start[m]), f"{m}: the step changed nothing"
        _assert_unchanged(clip, snap)
    for m in order:
        assert torch.equal(_outputs(models[m], video, tokens), after[m]), f"a step of a model after {m} changed it"
    for m in order:
        path = vop.save_checkpoint(models[m], tmp_path / f"{m}.safetensors")
        back = vop.load_checkpoint(path, clip)
        saved = models[m].trainable_state_dict()
        loaded = back.trainable_state_dict()
        assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved), m
        assert torch.equal(_outputs(back, video, tokens), after[m]), m
        assert back.backbone_fingerprint == models[m].backbone_fingerprint == weights_fingerprint(clip)
        _check_shared_storage(back, clip)
        _assert_unchanged(clip, snap)


def test_the_reported_case_vop_then_bias(tmp_path):
    """The issue: ``bias`` built on the CLIP a ``vop`` model uses raised the vop model's trainable count and
    its checkpoint no longer reloaded ("unexpected ['clip.ln_final.bias', ...]")."""
    clip = _clip()
    prompts = create_model("vop", clip, frames=4)
    n = prompts.parameter_counts()["trainable"]
    create_model("bias", clip, frames=4)
    create_model("full", clip, frames=4)
    assert prompts.parameter_counts()["trainable"] == n == 2 * 2 * 8 * 64  # 2,048 (the issue saw 4,288: + bias's 2,240)
    assert all(k.startswith(("text_prompts.", "video_prompts.")) for k in prompts.trainable_state_dict())
    vop.load_checkpoint(vop.save_checkpoint(prompts, tmp_path / "vop.safetensors"), clip)


@pytest.mark.parametrize("method, options", CASES, ids=[f"{m}{''.join(f'-{k}={v}' for k, v in o.items())}" for m, o in CASES])
def test_every_method_owns_what_it_trains(method, options, tmp_path):
    """Registry-driven: each method (and option set) built on a CLIP that other models already use: its own
    counts, the others' unchanged, the caller's CLIP unchanged through a training step, mode and dtype
    changes, and its checkpoint reloads bit-identically onto the shared CLIP."""
    clip = _clip()
    snap = _snapshot(clip)
    video, tokens = _inputs()
    torch.manual_seed(0)
    alone = create_model(method, _clip(), frames=4, **options)
    neighbours = {m: create_model(m, clip, frames=4) for m in ("vop", "bias")}
    seen = {m: _outputs(n, video, tokens) for m, n in neighbours.items()}
    torch.manual_seed(0)
    model = create_model(method, clip, frames=4, **options)
    assert model.parameter_counts() == alone.parameter_counts() and _trained_names(model) == _trained_names(alone)
    assert torch.equal(_outputs(model, video, tokens), _outputs(alone, video, tokens))
    _check_shared_storage(model, clip)
    trains = _step(model, video, tokens)
    assert trains == bool(alone.trainable_parameters())
    for m, n in neighbours.items():
        assert torch.equal(_outputs(n, video, tokens), seen[m]), f"a step of {method} changed {m}"
    # vop: 8 tokens x 2 layers x 2 towers x width 64; bias: 2 towers x 2 blocks x (64 + 256 + 64 + 2 x 64) + 3 x 64
    assert [n.parameter_counts()["trainable"] for n in neighbours.values()] == [2 * 2 * 8 * 64, 2 * 2 * 512 + 3 * 64]
    _assert_unchanged(clip, snap)
    model.train()
    model.double()
    _assert_unchanged(clip, snap)
    model.float().eval()
    path = vop.save_checkpoint(model, tmp_path / "m.safetensors")
    back = vop.load_checkpoint(path, clip)
    assert torch.equal(_outputs(back, video, tokens), _outputs(model, video, tokens))
    _assert_unchanged(clip, snap)


def test_a_backbone_built_for_the_model_is_trained_in_place(tmp_path):
    """A name or a file is loaded for the model alone: it takes that CLIP over (no copy of what it trains)."""
    model = create_model("full", "tiny", frames=4)
    assert all(p.requires_grad for p in model.clip.parameters()) and model.parameter_counts()["trainable"] == \
        model.parameter_counts()["backbone"]
    path = vop.save_checkpoint(model, tmp_path / "full.safetensors")
    back = vop.load_checkpoint(path)  # the whole model: no backbone given
    assert all(torch.equal(a, b) for a, b in zip(model.trainable_parameters(), back.trainable_parameters()))
    # a CLIP that a model took over is the model's: another model on it views it, as any given CLIP
    other = create_model("bias", back.clip, frames=4)
    assert other.clip is not back.clip
    assert all(p.requires_grad for p in back.clip.parameters())


def test_a_method_that_unfreezes_clip_in_build_gets_its_own_copy():
    """A method written before ``trains_clip`` (requires_grad_ on CLIP tensors in build()) still leaves the
    caller's CLIP alone: what it unfroze becomes its own copy."""

    class Legacy(VideoTextModel):
        def build(self):
            self.clip.projection("text").requires_grad_(True)

    class Foreign(VideoTextModel):
        def trains_clip(self):
            return [torch.nn.Parameter(torch.zeros(2))]

    clip = _clip()
    snap = _snapshot(clip)
    model = Legacy(clip, frames=4)
    assert _trained_names(model) == ["clip.text_projection"]
    _check_shared_storage(model, clip)
    _assert_unchanged(clip, snap)
    with pytest.raises(TypeError, match=r"trains_clip\(\) gave Parameter \(2,\), which is not a Parameter of self.clip"):
        Foreign(clip, frames=4)
    _assert_unchanged(clip, snap)


def test_the_trainers_logit_scale_clamp_leaves_a_shared_scale_alone():
    """The trainer clamps ``model.clip``'s logit scale after every step (exp <= 100). OpenAI's released scale is
    4.6052 > log(100): a frozen scale, the caller's storage, is left as it is; a trained one (its own) is clamped."""
    clip = _clip()
    with torch.no_grad():
        clip.logit_scale.fill_(4.6052)
    snap = _snapshot(clip)
    prompts, full = create_model("vop", clip, frames=4), create_model("full", clip, frames=4)
    prompts.clip.clamp_logit_scale()
    full.clip.clamp_logit_scale()
    _assert_unchanged(clip, snap)
    assert prompts.clip.logit_scale.item() == clip.logit_scale.item() > 4.6052 - 1e-6
    assert full.clip.logit_scale.item() == pytest.approx(4.605170, abs=1e-6)
