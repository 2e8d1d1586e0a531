"""Cross-Modal Adapter (``cma``): the build spec's tests (later-methods.md, section 3 (g)) plus checkpoints,
the pairwise interface and the CLI count."""
import json

import pytest
import torch
import torch.nn.functional as F

import vop
from vop.backbone import build_clip
from vop.errors import ConfigError
from vop.methods import count_parameters, create_model
from vop.methods.cma import SITES, frame_gram, qscore_similarity


def _model(**options):
    return create_model("cma", build_clip("tiny", seed=0), frames=4, **options).eval()


# -- (g)1: counts, shared tensors counted once and the same objects in both towers ----------------------
@pytest.mark.parametrize("arch", ["ViT-B/32", "ViT-B/16"])
@pytest.mark.parametrize("options, total", [({}, 519_168), ({"r": 16}, 1_008_000),
                                            ({"r": 16, "share_dim": 32}, 1_001_472)])
def test_counts(arch, options, total):
    c = count_parameters("cma", arch, frames=12, **options)
    assert c["trainable"] == c["counted"] == total and c["uncounted"] == c["inert"] == 0


def test_count_by_hand_and_shared_counted_once():
    # image: W_d, b_d, U_unique, b_unique; text: the same; shared: U_share, b_share (once)
    image = 24 * 8 * 768 + 24 * 8 + 24 * 752 * 8 + 24 * 752
    text = 24 * 8 * 512 + 24 * 8 + 24 * 496 * 8 + 24 * 496
    shared = 24 * 16 * 8 + 24 * 16
    assert (image, text, shared) == (147_456 + 192 + 144_384 + 18_048, 98_304 + 192 + 95_232 + 11_904, 3_072 + 384)
    assert image + text + shared == 519_168
    with torch.device("meta"):
        m = create_model("cma", vop.build_clip("ViT-B-32"), frames=12)
    tower_params = lambda t: {id(p): p for p in m.adapters(t).parameters()}  # noqa: E731
    ids_t, ids_v = tower_params("text"), tower_params("visual")
    both = set(ids_t) & set(ids_v)
    assert len(both) == 48 and sum(ids_t[i].numel() for i in both) == shared  # 24 blocks x (weight, bias)
    assert sum(p.numel() for p in ids_t.values()) == text + shared
    assert sum(p.numel() for p in ids_v.values()) == image + shared
    names = [n for n, _ in m.named_trainable_parameters()]
    assert len(names) == len(set(names)) and sum(n.startswith("shared_up.") for n in names) == 48


def test_shared_up_blocks_are_the_same_objects_in_both_towers():
    with torch.device("meta"):
        m = create_model("cma", vop.build_clip("ViT-B-32"), frames=12)
    blocks = [(i, p) for i in range(12) for p in SITES]
    assert len(blocks) == 24 and len(m.shared_up) == 12
    for i, p in blocks:
        t, v = m.text_adapters[i][p], m.visual_adapters[i][p]
        assert t.share is v.share is m.shared_up[i][p]
        assert t.share.weight is v.share.weight and t.share.bias is v.share.bias
        assert t.unique is not v.unique and t.down is not v.down
    assert len({id(m.shared_up[i][p]) for i, p in blocks}) == 24  # one per (layer, site), not one for all


# -- (g)5: shapes; the shared part sits on the last d_s channels ----------------------------------------
def test_adapter_shapes_on_vit_b32():
    with torch.device("meta"):
        m = create_model("cma", vop.build_clip("ViT-B-32"), frames=12)
        for tower, w, unique in (("visual", 768, 752), ("text", 512, 496)):
            for i in range(12):
                for p in SITES:
                    ad = m.adapters(tower)[i][p]
                    assert ad.down.weight.shape == (8, w) and ad.down.bias.shape == (8,)
                    assert ad.unique.weight.shape == (unique, 8) and ad.unique.bias.shape == (unique,)
                    assert ad.share.weight.shape == (16, 8) and ad.share.bias.shape == (16,)
                    assert unique + 16 == w
            n = 50 if tower == "visual" else 32
            assert m.adapters(tower)[0]["attn"](torch.empty(2, n, w)).shape == (2, n, w)


def test_shared_part_is_the_last_channels(tiny_clip):
    m = create_model("cma", tiny_clip, frames=4)
    u = torch.randn(3, 5, 64)
    for tower in ("text", "visual"):
        ad = m.adapters(tower)[1]["mlp"]
        with torch.no_grad():
            out = ad(u)
            z = ad.act(ad.down(u))
        assert out.shape == (3, 5, 64) and ad.unique.out_features == 48
        assert torch.allclose(out[..., -16:], ad.share(z), atol=0) and torch.allclose(out[..., :48], ad.unique(z), atol=0)


def test_init_is_truncated_normal_std_and_zero_biases():
    torch.manual_seed(0)
    with torch.device("meta"):
        clip = vop.build_clip("ViT-B-32")
    m = create_model("cma", clip.to_empty(device="cpu"), frames=12)  # real adapter values, random CLIP
    weights = torch.cat([p.flatten() for n, p in m.named_trainable_parameters() if n.endswith("weight")])
    biases = [p for n, p in m.named_trainable_parameters() if n.endswith("bias")]
    assert abs(weights.std().item() - 0.01) < 2e-4 and abs(weights.mean().item()) < 2e-4
    assert weights.abs().max() < 0.07  # a normal draw at std 0.01 (the +-2 bounds are never reached)
    assert all(torch.equal(b, torch.zeros_like(b)) for b in biases)


# -- (g)2: init std 0 is CLIP; tau -> infinity is mean pooling of the raw frames -------------------------
def test_init_std_zero_is_frozen_clip_exactly(tiny_clip, video_batch, token_batch):
    m = create_model("cma", tiny_clip, frames=4, init_std=0.0).eval()
    assert all(torch.equal(p, torch.zeros_like(p)) for p in m.trainable_parameters())
    with torch.no_grad():
        frames = m.encode_video(video_batch)
        ref = tiny_clip.encode_image(video_batch.flatten(0, 1)).view(3, 4, -1)
        assert frames.shape == (3, 4, 64) and torch.equal(frames, ref)
        assert torch.equal(m.encode_text(token_batch), tiny_clip.encode_text(token_batch))
    # the default init is not CLIP (non-zero up-projection by design)
    d = _model()
    with torch.no_grad():
        assert not torch.allclose(d.encode_video(video_batch), ref, atol=1e-4)


def test_qscore_with_large_tau_is_mean_of_raw_frames():
    g = torch.Generator().manual_seed(0)
    t, v = torch.randn(5, 32, generator=g, dtype=torch.float64), torch.randn(7, 6, 32, generator=g, dtype=torch.float64)
    got = qscore_similarity(t, v, tau=1e15)  # weights uniform to ~1e-14
    want = F.normalize(t, dim=-1) @ F.normalize(v.mean(1), dim=-1).t()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # and it is not meanP (normalised frames) nor the default tau
    assert not torch.allclose(got, F.normalize(t, dim=-1) @ F.normalize(F.normalize(v, dim=-1).mean(1), dim=-1).t(), atol=1e-3)
    assert not torch.allclose(got, qscore_similarity(t, v, tau=5.0), atol=1e-3)
    # through the model
    m = _model(tau=1e15)
    torch.testing.assert_close(m.similarity(t, v), want, rtol=0, atol=1e-12)


# -- (g)3: the efficient pairwise formula equals the explicit per-pair computation ------------------------
def test_efficient_formula_equals_explicit_per_pair_float64():
    g = torch.Generator().manual_seed(1)
    T, V, Fr, D, tau = 6, 9, 12, 40, 5.0
    t = torch.randn(T, D, generator=g, dtype=torch.float64) * 3
    v = torch.randn(V, Fr, D, generator=g, dtype=torch.float64) * 3
    got = qscore_similarity(t, v, tau)
    want = torch.empty(T, V, dtype=torch.float64)
    for i in range(T):
        for j in range(V):
            w = torch.softmax(v[j] @ t[i] / tau, dim=0)  # (F,)
            vbar = (w[:, None] * v[j]).sum(0)  # the pooled video, D wide
            want[i, j] = (t[i] @ vbar) / (t[i].norm() * vbar.norm())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    # any chunk of texts x chunk of videos is the block of the full matrix; kept Gram matrices give the same
    torch.testing.assert_close(qscore_similarity(t[2:5], v[3:8], tau), got[2:5, 3:8], rtol=0, atol=1e-14)
    assert torch.equal(qscore_similarity(t, v, tau, gram=frame_gram(v)), got)
    with pytest.raises(ValueError, match="gram must be"):
        qscore_similarity(t, v, tau, gram=frame_gram(v[:2]))
    # float32 inputs: computed in float32, close to the float64 answer
    torch.testing.assert_close(qscore_similarity(t.float(), v.float(), tau).double(), want, rtol=0, atol=1e-5)
    assert qscore_similarity(t.half(), v.half(), tau).dtype == torch.float32
    plain = qscore_similarity(t.float(), v.float(), tau)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not lower the scores' precision
        assert torch.equal(qscore_similarity(t.float(), v.float(), tau), plain)
    # and its gradients are the formula's (the training loss backpropagates through it)
    tg, vg = t[:3, :6].clone().requires_grad_(), v[:4, :5, :6].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: qscore_similarity(a, b, tau), (tg, vg))


class _Largest(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
        return out


def test_similarity_never_builds_a_texts_x_videos_x_dim_tensor():
    """On meta tensors (nothing allocated): 20k texts x 100k videos x 12 frames x 512; every intermediate
    is at most T x V x F (a T x V x D tensor would be 512 / 12 times larger)."""
    T, V, Fr, D = 20_000, 100_000, 12, 512
    t, v = torch.empty(T, D, device="meta"), torch.empty(V, Fr, D, device="meta")
    with _Largest() as mode:
        out = qscore_similarity(t, v, 5.0)
    assert out.shape == (T, V)
    assert mode.numel == T * V * Fr < T * V * D


# -- (g)4: cross-modal coupling ---------------------------------------------------------------------------
def test_text_only_step_changes_the_image_tower_through_the_shared_part_only(video_batch, token_batch):
    torch.manual_seed(0)
    m = create_model("cma", build_clip("tiny", seed=0), frames=4).train()
    before = {n: p.detach().clone() for n, p in m.named_trainable_parameters()}
    with torch.no_grad():
        frames_before = m.encode_video(video_batch)
    opt = torch.optim.SGD(m.trainable_parameters(), lr=1.0)
    t = m.encode_text(token_batch)  # a text-only loss: pull the three captions together
    loss = -(F.normalize(t, dim=-1) @ F.normalize(t, dim=-1).t()).sum()
    loss.backward()
    opt.step()
    changed = {n for n, p in m.named_trainable_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("text_adapters.", "shared_up.")) for n in changed), changed
    assert {n for n in changed if n.startswith("shared_up.")} == {n for n in before if n.startswith("shared_up.")}
    # of the image adapters' tensors, exactly the shared ones moved
    image_ids = {id(p) for p in m.visual_adapters.parameters()}
    moved = {n for n, p in m.named_trainable_parameters() if id(p) in image_ids and n in changed}
    assert moved == {n for n, p in m.named_trainable_parameters() if id(p) in image_ids and n.startswith("shared_up.")}
    assert all(p.grad is None for n, p in m.visual_adapters.named_parameters() if ".share." not in n)
    with torch.no_grad():
        frames_after = m.encode_video(video_batch)
    assert (frames_after - frames_before).abs().max() > 1e-4  # the image tower's output changed
    # with no shared channels the same step leaves the image tower exactly where it was
    torch.manual_seed(0)
    m0 = create_model("cma", build_clip("tiny", seed=0), frames=4, share_dim=0).train()
    with torch.no_grad():
        f0 = m0.encode_video(video_batch)
    opt0 = torch.optim.SGD(m0.trainable_parameters(), lr=1.0)
    t0 = m0.encode_text(token_batch)
    (-(F.normalize(t0, dim=-1) @ F.normalize(t0, dim=-1).t()).sum()).backward()
    opt0.step()
    with torch.no_grad():
        assert torch.equal(m0.encode_video(video_batch), f0)


# -- the pairwise interface -----------------------------------------------------------------------------
def test_pairwise_interface_shapes(tiny_clip, video_batch, token_batch):
    m = create_model("cma", tiny_clip, frames=4).eval()
    assert m.pairwise is True and vop.VideoTextModel.pairwise is False
    assert create_model("zeroshot", tiny_clip, frames=4).pairwise is False
    with torch.no_grad():
        frames, text = m(video_batch, token_batch)
        assert frames.shape == (3, 4, 64) and text.shape == (3, 64)
        assert torch.equal(frames, m.encode_video(video_batch)) and torch.equal(text, m.encode_text(token_batch))
        assert not torch.allclose(text.norm(dim=-1), torch.ones(3))  # raw, not normalised
        sim = m.similarity(text, frames)
    assert sim.shape == (3, 3) and sim.abs().max() <= 1 + 1e-6
    with pytest.raises(ValueError, match=r"\(V, F, D\)"):
        m.similarity(text, frames.mean(1))
    # the training loss: logits = logit_scale x similarity, v2t = its transpose; gradients reach every adapter
    m.train()
    frames, text = m(video_batch, token_batch)
    logits = m.logit_scale * m.similarity(text, frames)
    labels = torch.arange(3)
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2).backward()
    for n, p in m.named_trainable_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in m.clip.parameters())


def test_pool_mean_is_a_dual_encoder_with_meanP(tiny_clip, video_batch, token_batch):
    m = create_model("cma", tiny_clip, frames=4, pool="mean").eval()
    assert m.pairwise is False
    with torch.no_grad():
        frames = m.encode_frames(video_batch)
        v, t = m(video_batch, token_batch)
        assert torch.allclose(m.encode_video(video_batch), F.normalize(frames, dim=-1).mean(1), atol=1e-6)
        assert v.shape == t.shape == (3, 64) and torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert torch.allclose(m.similarity(t, v), t @ v.t(), atol=1e-6)
    # same adapters as the qscore model: only the pooling differs
    torch.manual_seed(0)
    a = create_model("cma", tiny_clip, frames=4, pool="mean")
    torch.manual_seed(0)
    b = create_model("cma", tiny_clip, frames=4)
    with torch.no_grad():
        assert torch.equal(a.encode_frames(video_batch), b.encode_video(video_batch))


def test_batch_independence_and_frame_order(tiny_clip, video_batch, token_batch):
    m = create_model("cma", tiny_clip, frames=4).eval()
    with torch.no_grad():
        f, t = m.encode_video(video_batch), m.encode_text(token_batch)
        for i in range(3):
            assert torch.allclose(m.encode_video(video_batch[i:i + 1]), f[i:i + 1], atol=1e-5)
            assert torch.allclose(m.encode_text(token_batch[i:i + 1]), t[i:i + 1], atol=1e-5)
        # frames are encoded independently and the query score is order-free
        assert torch.allclose(m.encode_video(video_batch.flip(1)), f.flip(1), atol=1e-5)
        assert torch.allclose(m.similarity(t, f.flip(1)), m.similarity(t, f), atol=1e-6)
        # any frame count works (no per-frame tensors)
        assert m.frame_bound_tensor() is None and m.encode_video(video_batch[:, :2]).shape == (3, 2, 64)


def test_options_are_checked():
    for bad, match in (({"r": 0}, "r must be"), ({"share_dim": 65}, "share_dim"), ({"pool": "max"}, "pool"),
                       ({"tau": 0.0}, "tau"), ({"init_std": -1.0}, "init_std|>= 0"), ({"rank": 4}, "no option 'rank'.*options: r, share_dim")):
        with pytest.raises(ConfigError, match=match):
            create_model("cma", "tiny", **bad)


def test_share_dim_zero_and_full_width():
    none = create_model("cma", "tiny", share_dim=0)
    assert len(none.shared_up) == 0 and none.text_adapters[0]["attn"].share is None
    assert none.parameter_counts()["trainable"] == 2 * 2 * 2 * (64 * 8 + 8 + 8 * 64 + 64)
    full = create_model("cma", "tiny", share_dim=64)  # tiny towers are both 64 wide: the whole up-projection shared
    assert full.text_adapters[0]["mlp"].unique is None
    with torch.no_grad():
        assert full.text_adapters[0]["mlp"](torch.randn(2, 3, 64)).shape == (2, 3, 64)


def test_towers_of_different_depth_share_the_common_layers():
    """ViT-L/14: 24 image and 12 text blocks; layers 0..11 share, image blocks 12..23 own all their channels."""
    c = count_parameters("cma", "ViT-L-14", frames=12)
    text = 24 * (8 * 768 + 8 + 752 * 8 + 752)
    image = 48 * (8 * 1024 + 8) + 24 * (1008 * 8 + 1008) + 24 * (1024 * 8 + 1024)
    assert c["trainable"] == text + image + 24 * (16 * 8 + 16) == 1_146_048
    with torch.device("meta"):
        m = create_model("cma", vop.build_clip("ViT-L-14"), frames=12)
    assert m.visual_adapters[11]["mlp"].share is m.text_adapters[11]["mlp"].share
    assert m.visual_adapters[12]["mlp"].share is None and m.visual_adapters[12]["mlp"].unique.out_features == 1024


# -- checkpoints and the CLI ----------------------------------------------------------------------------
def test_checkpoint_round_trip_keeps_sharing_and_scores(tmp_path, tiny_clip, video_batch, token_batch):
    m = create_model("cma", tiny_clip, frames=4, r=4, tau=3.0)
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = vop.save_checkpoint(m, tmp_path / "cma.safetensors")
    from safetensors.torch import load_file

    saved = load_file(str(path))
    assert set(saved) == set(dict(m.named_trainable_parameters()))
    assert sum(k.startswith("shared_up.") for k in saved) == 2 * 2 * 2  # 2 layers x 2 sites x (weight, bias), once
    assert sum(v.numel() for v in saved.values()) == m.parameter_counts()["trainable"]
    back = vop.load_checkpoint(path, tiny_clip)
    assert back.name == "cma" and back.opts.r == 4 and back.opts.tau == 3.0 and back.pairwise
    for i in range(2):
        for p in SITES:
            assert back.text_adapters[i][p].share is back.visual_adapters[i][p].share is back.shared_up[i][p]
            assert torch.equal(back.shared_up[i][p].weight, m.shared_up[i][p].weight)
    m.eval(), back.eval()
    with torch.no_grad():
        a = m.similarity(m.encode_text(token_batch), m.encode_video(video_batch))
        b = back.similarity(back.encode_text(token_batch), back.encode_video(video_batch))
    assert torch.equal(a, b)
    # still shared after loading: a step through the text tower moves the image tower's copy too
    with torch.no_grad():
        back.text_adapters[0]["attn"].share.weight.add_(1.0)
        assert torch.equal(back.visual_adapters[0]["attn"].share.weight, back.shared_up[0]["attn"].weight)


def test_cli_params_lists_cma(capsys):
    from vop.cli.main import main

    assert main(["params", "--backbone", "ViT-B/32", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["cma"]["trainable"] == rows["cma"]["paper_count"] == 519_168
