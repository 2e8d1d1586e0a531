"""TempMe (``tempme``): the build spec's tests (lora-tempme.md, section 2 (g)): counts, the token schedule on
ViT-B/32 and B/16, mass conservation, exact merges of duplicate frames, merging off = ``lora``, frame order,
the FLOP ratio; plus the merge operator against a loop, autocast, checkpoints, gradient checkpointing,
accumulation and DDP through the engine, a training run and its index. Forward passes on the tiny backbones;
the ViT-B shapes on the meta device."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import vop
import vop.methods.tempme as tm
from vop.backbone import build_clip
from vop.backbone.clip import CLIP
from vop.errors import ConfigError
from vop.methods import count_parameters, create_model
from vop.methods.tempme import balanced_groups, image_tower_macs, match, merge_tokens, regroup, schedule


def _randomise(model, std=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_trainable_parameters():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


# -- (g)1: counts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["ViT-B/32", "ViT-B/16"])
def test_counts(arch):
    c = count_parameters("tempme", arch, frames=12)
    assert c["trainable"] == c["counted"] == 294_912 + 196_608 + 16_128 == 507_648
    with torch.device("meta"):
        m = create_model("tempme", CLIP(vop.get_arch(arch)), frames=12)
    assert [tuple(p.shape) for p in m.clip_pos.embedding] == [(12, 768), (6, 768), (3, 768)]
    assert m.clip_layers == [8, 9, 10] and m.groups == [2, 2, 3]
    assert m.frame_bound_tensor() == "clip position embeddings (one row per frame, then per clip)"
    assert m.no_weight_decay() == {"clip_pos.embedding.0", "clip_pos.embedding.1", "clip_pos.embedding.2"}  # vop's rule (spec (f)5)
    assert count_parameters("tempme", arch, frames=12, clip_pos=False)["trainable"] == 491_520
    assert count_parameters("tempme", arch, frames=24, clip_groups=[2, 2, 3])["trainable"] == 491_520 + (24 + 12 + 6) * 768
    assert count_parameters("tempme", arch, frames=24)["trainable"] == 491_520 + (24 + 12 + 4) * 768  # groups 2, 3, 4


def test_frame_count_is_fixed_by_the_clip_positions():
    m = create_model("tempme", "tiny", frames=4)
    with pytest.raises(ConfigError, match="clip position embeddings"):
        m.check_frames(8)
    free = create_model("tempme", "tiny", frames=4, clip_pos=False)  # groups [4]: any multiple of 4
    assert free.check_frames(8) == 8
    with pytest.raises(ConfigError, match="fuses 4 frames into one sequence"):
        free.check_frames(6)


# -- (g)3: the token schedule ------------------------------------------------------------------------------
B32 = [(12, 50, 48), (12, 48, 46), (12, 46, 44), (12, 44, 42), (12, 42, 40), (12, 40, 38), (12, 38, 36), (12, 36, 34),
       (6, 48, 44), (3, 62, 56), (1, 118, 107), (1, 107, 97)]
B16 = [(12, 197, 195), (12, 195, 193), (12, 193, 191), (12, 191, 189), (12, 189, 187), (12, 187, 185), (12, 185, 183),
       (12, 183, 181), (6, 254, 229), (3, 321, 289), (1, 607, 547), (1, 547, 493)]


@pytest.mark.parametrize("arch, want, tokens_in", [("ViT-B/32", B32, 600), ("ViT-B/16", B16, 2364)])
def test_token_schedule(arch, want, tokens_in):
    """Sequences per video x tokens at attention -> at the MLP, per layer: the schedule and the real forward
    (on the meta device: shapes only)."""
    with torch.device("meta"):
        m = create_model("tempme", CLIP(vop.get_arch(arch)), frames=12)
        sched = m.schedule()
        assert [(L.seqs // L.group, L.attn_tokens, L.mlp_tokens) for L in sched] == want
        assert [L.kind for L in sched] == ["img"] * 8 + ["clip"] * 3 + ["post"]
        assert sched[0].tokens * 12 == tokens_in and want[-1][2] < tokens_in / 4  # 97 of 600, 493 of 2,364
        seen = []
        real = tm.merge_tokens

        def spy(x, sizes, metric, r, c):
            out = real(x, sizes, metric, r, c)
            seen.append((x.shape[0] // 2, x.shape[1], out[0].shape[1]))
            return out

        tm.merge_tokens = spy
        try:
            m.encode_frames(torch.empty(2, 12, 3, 224, 224))
        finally:
            tm.merge_tokens = real
    # merges per layer: ImgMe / post after attention; ClipMe before (cross) and after (intra)
    got, k = [], 0
    for L in sched:
        if L.kind == "clip":
            assert seen[k] == (L.seqs // L.group, L.tokens * L.group, L.attn_tokens)
            k += 1
        assert seen[k] == (L.seqs // L.group, L.attn_tokens, L.mlp_tokens)
        got.append(seen[k][1:])
        k += 1
    assert k == len(seen) and got == [w[1:] for w in want]


def test_schedule_follows_the_code_arithmetic():
    from vop.methods.tempme import merged_fraction

    # the code's proportions are percents / 100; 1 - keep is rounded so that 0.7 and 0.9 give the same floats
    assert (merged_fraction(0.7), merged_fraction(0.9), merged_fraction(1.0)) == (30 / 100, 10 / 100, 0.0)
    assert 1 - 0.7 != 0.3 and merged_fraction(0.75) == 0.25
    # r_C = min(int(N g 0.3), (N - c) g // 2), r_I = min(int((N g - r_C) 0.1), ((N - c) g - r_C) // 2)
    s = schedule(50, 12, 12, [8, 9, 10], [2, 2, 3], 2, 0.7, 0.9)
    assert [(L.r_cross, L.r) for L in s[8:]] == [(20, 4), (26, 6), (50, 11), (0, 10)]
    assert [L.cls for L in s] == [1] * 9 + [2, 4, 12]
    # a group of 1: no regrouping and no cross merge, but r_I still subtracts r_C (the code's arithmetic)
    one = schedule(50, 12, 12, [8], [1], 0, 0.7, 0.9)[8]
    assert (one.group, one.r_cross, one.r, one.attn_tokens, one.mlp_tokens) == (1, 15, 3, 50, 47)
    # ImgMe's r is clamped to the a-set (the code would fail there): 5 tokens, r = 2
    assert schedule(5, 1, 3, [], [], 9, 0.7, 0.9)[0].mlp_tokens == 3


def test_defaults_follow_the_tower_and_the_frames():
    assert [balanced_groups(f, 3) for f in (12, 8, 64, 4, 24, 1)] == [[2, 2, 3], [2, 2, 2], [4, 4, 4], [1, 2, 2],
                                                                      [2, 3, 4], [1, 1, 1]]
    assert balanced_groups(12, 1) == [12] and balanced_groups(12, 0) == []
    demo = create_model("tempme", "tiny-synthetic", frames=8)  # the demo's CLIP (4 layers) and frames
    assert demo.clip_layers == [0, 1, 2] and demo.groups == [2, 2, 2]
    assert [tuple(p.shape) for p in demo.clip_pos.embedding] == [(8, 128), (4, 128), (2, 128)]
    tiny = create_model("tempme", "tiny", frames=4)  # 2 layers: one clip layer fusing all 4 frames
    assert tiny.clip_layers == [0] and tiny.groups == [4]
    assert create_model("tempme", "tiny", frames=12, clip_layers=[-1]).clip_layers == [1]


# -- (g)4: mass conservation; [CLS] never merged ------------------------------------------------------------
def test_mass_conservation_and_cls_sizes():
    clip = build_clip("tiny-4l", seed=0).eval()  # 4 layers, 16 patches at 64 px
    m = _randomise(create_model("tempme", clip, frames=8, clip_layers=[1, 2, 3], clip_groups=[2, 2, 2])).eval()
    assert [L.kind for L in m.schedule()] == ["img", "clip", "clip", "clip"]
    sizes_seen = []
    real = tm.merge_tokens

    def spy(x, sizes, metric, r, c):
        x2, s2 = real(x, sizes, metric, r, c)
        sizes_seen.append((s2, c))
        return x2, s2

    tm.merge_tokens = spy
    try:
        with torch.no_grad():
            m.encode_video(torch.randn(3, 8, 3, 64, 64))
    finally:
        tm.merge_tokens = real
    assert len(sizes_seen) == 7  # ImgMe, then cross + intra in each of the three clip layers
    for s, c in sizes_seen:
        per_video = s.view(3, -1).sum(1)
        assert torch.equal(per_video, torch.full((3,), 8.0 * 17))  # 8 frames x (1 + 16) tokens
        assert torch.equal(s[:, :c], torch.ones_like(s[:, :c]))  # the c [CLS] tokens stay size 1
        assert s.min() >= 1 and s.max() > 1


# -- the merge operator ------------------------------------------------------------------------------------
def _merge_loop(x, sizes, metric, r, c):
    """ToMe's merge written token by token (float64 reference)."""
    out_x, out_s = [], []
    for n in range(x.shape[0]):
        m = F.normalize(metric[n, c:].double(), dim=-1)
        idx = list(range(m.shape[0]))
        a, b = (idx[0::2], idx[1::2]) if c % 2 == 0 else (idx[1::2], idx[0::2])
        best = [(max(range(len(b)), key=lambda j: float(m[ia] @ m[b[j]])), float(max(m[ia] @ m[jb] for jb in b)))
                for ia in a]
        order = sorted(range(len(a)), key=lambda i: -best[i][1])
        merged, kept = set(order[:r]), sorted(order[r:])
        xs, ss = x[n, c:].double() * sizes[n, c:], sizes[n, c:].double().clone()
        bx, bs = xs[b].clone(), ss[b].clone()
        for i in merged:
            bx[best[i][0]] += xs[a[i]]
            bs[best[i][0]] += ss[a[i]]
        ux, us = xs[[a[i] for i in kept]], ss[[a[i] for i in kept]]
        allx = torch.cat([x[n, :c].double() * sizes[n, :c], ux, bx])
        alls = torch.cat([sizes[n, :c].double(), us, bs])
        out_x.append(allx / alls)
        out_s.append(alls)
    return torch.stack(out_x), torch.stack(out_s)


@pytest.mark.parametrize("c", [1, 2, 3, 4])
def test_merge_equals_a_token_loop(c):
    g = torch.Generator().manual_seed(c)
    x = torch.randn(3, c + 11, 6, generator=g, dtype=torch.float64)
    sizes = torch.randint(1, 4, (3, c + 11, 1), generator=g).double()
    sizes[:, :c] = 1
    metric = torch.randn(3, c + 11, 5, generator=g, dtype=torch.float64)
    got_x, got_s = merge_tokens(x, sizes, metric, 4, c)
    want_x, want_s = _merge_loop(x, sizes, metric, 4, c)
    assert got_x.shape == (3, c + 7, 6)
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_s, want_s.float(), rtol=0, atol=0)
    assert torch.equal(got_x[:, :c], x[:, :c])  # [CLS] first, untouched


def test_match_scores_in_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(4, 51, 64, generator=g)
    want = match(metric, 10, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = match(metric.bfloat16().float(), 10, 1)  # autocast off inside: float32 products
        assert all(torch.equal(a, b) for a, b in zip(match(metric, 10, 1), want))
    assert all(t.dtype == torch.int64 for t in got)
    m = _randomise(create_model("tempme", "tiny", frames=4)).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        v = m.encode_video(torch.randn(2, 4, 3, 32, 32))
    assert v.shape == (2, 64) and torch.isfinite(v).all()


def test_regroup_puts_cls_first_in_sequence_order():
    x = torch.arange(4 * 3).view(4, 3)[..., None]  # 4 sequences of [CLS, p, p]
    assert regroup(x, 2, 1)[..., 0].tolist() == [[0, 3, 1, 2, 4, 5], [6, 9, 7, 8, 10, 11]]


# -- (g)5: exact merges of duplicates ------------------------------------------------------------------------
def test_twins_merge_only_with_each_other_and_proportional_attention_is_plain_attention():
    g = torch.Generator().manual_seed(0)
    M, d = 9, 16  # odd M: the twins of [S; S] sit at opposite parity
    cls, S = torch.randn(1, 1, d, generator=g, dtype=torch.float64), torch.randn(1, M, d, generator=g, dtype=torch.float64)
    full = regroup(torch.cat([torch.cat([cls, S], 1)] * 2), 2, 1)  # [CLS, CLS, S, S]
    x, sizes = merge_tokens(full, None, full, 6, 2)
    assert x.shape[1] == 2 + 2 * M - 6 and sizes.sum() == 2 + 2 * M
    for t in x[0, 2:]:  # every token is one of S exactly: only twins merged
        assert any(torch.equal(t, s) for s in S[0])
    assert sorted(sizes[0, 2:, 0].tolist()) == [1.0] * (2 * M - 12) + [2.0] * 6
    wq, wk, wv = (torch.randn(d, d, generator=g, dtype=torch.float64) for _ in range(3))
    prop = F.scaled_dot_product_attention(x @ wq, x @ wk, x @ wv, attn_mask=sizes.double().log().transpose(1, 2))
    plain = F.scaled_dot_product_attention(full @ wq, full @ wk, full @ wv)
    for i, t in enumerate(x[0]):
        j = next(j for j, u in enumerate(full[0]) if torch.equal(u, t))
        torch.testing.assert_close(prop[0, i], plain[0, j], rtol=0, atol=1e-12)


def test_identical_frames_through_a_clip_merge_layer_equal_the_single_frame():
    """A video of 4 copies of one frame (9 patches), ImgMe and intra merges off, one clip layer fusing pairs
    (6 of 18 patch tokens merged across the two frames): the video embedding is the frame's, as ``lora``
    with the same updates gives it."""
    clip = build_clip("tiny", seed=0).eval()
    m = create_model("tempme", clip, frames=4, img_r=0, keep_intra=1.0, clip_layers=[0], clip_groups=[2])
    _randomise(m, std=0.1)
    with torch.no_grad():
        for p in m.clip_pos.embedding:  # P = 0 (its initialisation): the frames carry no clip position
            p.zero_()
    m.eval()
    assert m.schedule(10)[0].r_cross == 6
    lo = create_model("lora", clip, frames=1).eval()
    lo.load_state_dict({k: v for k, v in m.state_dict().items() if k.startswith("lora.")}, strict=False)
    frame = torch.randn(2, 1, 3, 24, 24)
    with torch.no_grad():
        single = lo.encode_video(frame)
        video = m.encode_video(frame.expand(-1, 4, -1, -1, -1).contiguous())
        other = m.encode_video(torch.randn(2, 4, 3, 24, 24))
    torch.testing.assert_close(video, single, rtol=0, atol=1e-6)
    assert not torch.allclose(other, single, atol=1e-3)


# -- (g)2: merging off is lora; B = 0 and merging off is CLIP --------------------------------------------------
def test_merging_off_is_lora_and_zero_B_is_clip(tiny_clip, video_batch, token_batch):
    off = dict(img_r=0, keep_cross=1.0, keep_intra=1.0, clip_groups=[1])
    m = create_model("tempme", tiny_clip, frames=4, **off)
    assert m.clip_pos is None and all(L.r == L.r_cross == 0 for L in m.schedule())
    zs = create_model("zeroshot", tiny_clip, frames=4).eval()
    m.eval()
    with torch.no_grad():
        assert torch.equal(m.encode_video(video_batch), zs.encode_video(video_batch))
        assert torch.equal(m.encode_text(token_batch), tiny_clip.encode_text(token_batch))
    _randomise(m)
    lo = create_model("lora", tiny_clip, frames=4).eval()
    lo.load_state_dict(m.state_dict())
    with torch.no_grad():
        for merged in (True, False):
            if not merged:
                m.unmerge(), lo.unmerge()
            assert torch.equal(m.encode_video(video_batch), lo.encode_video(video_batch))
            assert torch.equal(m.encode_text(token_batch), lo.encode_text(token_batch))
    # the default merges: not CLIP even with B = 0, but the text tower is
    d = create_model("tempme", tiny_clip, frames=4).eval()
    with torch.no_grad():
        assert not torch.allclose(d.encode_video(video_batch), zs.encode_video(video_batch), atol=1e-4)
        assert torch.equal(d.encode_text(token_batch), tiny_clip.encode_text(token_batch))


# -- (g)7: frame order ---------------------------------------------------------------------------------------
def test_frame_order_matters_and_lora_is_invariant(tiny_clip, video_batch):
    m = _randomise(create_model("tempme", tiny_clip, frames=4)).eval()
    lo = create_model("lora", tiny_clip, frames=4).eval()
    lo.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("clip_pos")}, strict=False)
    perm = video_batch[:, [2, 0, 3, 1]]
    with torch.no_grad():
        assert (m.encode_video(video_batch) - m.encode_video(perm)).abs().max() > 1e-3
        torch.testing.assert_close(lo.encode_video(perm), lo.encode_video(video_batch), rtol=0, atol=1e-6)
        # the frame embeddings come back in frame order
        assert m.encode_frames(video_batch).shape == (3, 4, 64)


# -- (g)6 and (d): cost -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, clip_g, tempme_g, ratio, counted", [("ViT-B/32", 52.90, 34.70, 0.656, 0.656),
                                                                    ("ViT-B/16", 210.76, 161.08, 0.764, 0.766)])
def test_macs_and_flop_ratio(arch, clip_g, tempme_g, ratio, counted):
    cfg = vop.get_arch(arch).vision
    with torch.device("meta"):
        clip = CLIP(vop.get_arch(arch))
        m = create_model("tempme", clip, frames=12)
        lo = create_model("lora", clip, frames=12)
    base, ours = image_tower_macs(cfg, 12), image_tower_macs(cfg, 12, m.schedule())
    assert round(base / 1e9, 2) == clip_g and round(ours / 1e9, 2) == tempme_g
    assert ours / base == pytest.approx(ratio, abs=5e-4)

    def flops(model):  # torch's counter on the meta device (unmerged LoRA, matching scores: as on the reference)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model.encode_frames(torch.empty(1, 12, 3, 224, 224, device="meta"))
        return fc.get_total_flops()

    assert flops(m) / flops(lo) == pytest.approx(counted, abs=5e-3)


# -- training: gradients, checkpointing, accumulation, DDP ---------------------------------------------------
def test_gradients_reach_every_tensor_and_grad_checkpointing_matches(tiny_clip, video_batch, token_batch):
    grads = []
    for ckpt in (False, True):
        m = _randomise(create_model("tempme", tiny_clip, frames=4)).train().set_grad_checkpointing(ckpt)
        v, t = m(video_batch, token_batch)
        (t @ v.t()).trace().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_trainable_parameters()})
    assert all(g.abs().max() > 0 for g in grads[0].values())
    assert "clip_pos.embedding.0" in grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=1e-6)


def test_accumulation_is_exact(tiny_clip, video_batch):
    from vop.engine.trainer import _Pair, _step

    video = torch.cat([video_batch, video_batch.flip(1)])
    grads = []
    for chunks in (1, 2, 3):
        m = _randomise(create_model("tempme", tiny_clip, frames=4)).train()
        tokens = m.tokenizer(16)([f"caption {i}" for i in range(6)])
        loss = _step(_Pair(m), m, video, tokens, chunks, None, torch.device("cpu"), torch.amp.GradScaler("cpu", enabled=False))
        grads.append((loss, {n: p.grad.clone() for n, p in m.named_trainable_parameters()}))
    for loss, g in grads[1:]:
        assert loss == pytest.approx(grads[0][0], rel=1e-6)
        for n in g:
            torch.testing.assert_close(g[n], grads[0][1][n], rtol=1e-4, atol=1e-6)


def test_two_process_gradients_equal_single_process(tmp_path):
    script = Path(__file__).parent / "scripts" / "ddp_grads.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, multi = tmp_path / "single.pt", tmp_path / "multi.pt"
    subprocess.run([sys.executable, str(script), str(single), "tempme"], check=True, env=env, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(multi), "tempme"], env=env, timeout=300, capture_output=True, text=True)
    if proc.returncode != 0 and any(s in proc.stderr for s in ("DistNetworkError", "RendezvousError", "EADDRINUSE")):
        pytest.skip("torchrun cannot start 2 gloo processes on this machine")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(single), torch.load(multi)
    assert set(a) == set(b) and "clip_pos.embedding.0" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert a["__loss"].item() == pytest.approx(b["__loss"].item(), rel=1e-5)


def test_checkpoint_round_trip_bit_identical(tmp_path, video_batch, token_batch):
    from safetensors.torch import load_file

    m = _randomise(create_model("tempme", build_clip("tiny", seed=0), frames=4, clip_groups=[2], keep_intra=0.8)).eval()
    path = vop.save_checkpoint(m, tmp_path / "tempme.safetensors")
    assert set(load_file(str(path))) == set(m.trainable_state_dict()) and "clip_pos.embedding.0" in load_file(str(path))
    m2 = vop.load_checkpoint(path, build_clip("tiny", seed=0)).eval()
    assert m2.options_dict() == m.options_dict() and m2.groups == [2]
    with torch.no_grad():
        assert torch.equal(m.encode_video(video_batch), m2.encode_video(video_batch))
        assert torch.equal(m.encode_text(token_batch), m2.encode_text(token_batch))


# -- options -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, words", [
    ({"clip_groups": [2, 3], "clip_layers": [0, 1]}, "model.options.clip_groups of tempme [2, 3] fuse 6 frames"),
    ({"clip_groups": [3]}, "does not divide model.frames=4"),
    ({"clip_groups": [2, 2], "clip_layers": [0]}, "has 2 entries for 1 clip layers"),
    ({"clip_layers": [5]}, "clip_layers of tempme entry 5 is not a layer of the 2-layer image tower"),
    ({"clip_layers": [1, 0]}, "distinct layers from the input up"),
    ({"clip_groups": [0]}, "clip_groups of tempme entry must be an integer in 1..1024"),
    ({"keep_cross": 1.5}, "keep_cross of tempme must be a finite number >= 0 and <= 1"),
    ({"targets": "qkv,v"}, "cannot be combined"),
])
def test_options_are_checked(options, words):
    with pytest.raises(ConfigError) as e:
        create_model("tempme", "tiny", frames=4, **options)
    assert words in str(e.value)


def test_frames_not_divisible_through_the_console_script(world, tmp_path):
    from test_methods_lora import _vop_script

    r = subprocess.run([_vop_script(), "train", f"data.root={world}", "data.dataset=collection", "model.backbone=tiny",
                        "model.method=tempme", "model.options.clip_groups=[3]", "model.frames=4", "model.image_size=32",
                        f"out_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    both = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in both and r.stderr.startswith("error: "), both
    assert "clip_groups of tempme [3] fuse 3 frames into one sequence, which does not divide model.frames=4" in r.stderr
    assert not (tmp_path / "run").exists()


# -- a training run, its checkpoint, its index -------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    from tiny_runs import train_tiny

    return train_tiny(world, tmp_path_factory.mktemp("tempme") / "run", "tempme", "optim.grad_checkpointing=true")


def test_training_run_its_checkpoint_and_index(world, run, tmp_path, capsys):
    from vop.cli.main import main
    from vop.data import get_dataset
    from vop.engine.evaluate import evaluate
    from vop.retrieval import VideoIndex

    out, results = run
    ckpt = out / "last.safetensors"
    model = vop.load_checkpoint(ckpt).eval()
    assert model.clip_pos.embedding[0].abs().max() > 0  # P trained
    ds = get_dataset("collection", world, "test", frames=4, size=32, train=False)
    ev = evaluate(model, ds, batch_size=16)
    assert ev.metrics["t2v"] == results["last"]["test"]["t2v"]
    ix = tmp_path / "ix"
    assert main(["index", "--videos", str(world / "captions.jsonl"), "--split", "test", "--checkpoint", str(ckpt),
                 "--out", str(ix), "--image-size", "32", "-j", "0", "-q"]) == 0
    index = VideoIndex.open(ix)
    assert torch.equal(torch.from_numpy(index.emb).float(), ev.video_emb.float())
    qfile = tmp_path / "q.txt"
    qfile.write_text("\n".join(ds.captions[:4]) + "\n")
    capsys.readouterr()
    assert main(["search", str(ix), "--queries", str(qfile), "-k", "3", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    row = {v: i for i, v in enumerate(ds.videos)}
    for i, h in enumerate(hits):
        torch.testing.assert_close(torch.tensor([x["score"] for x in h["results"]]),
                                   ev.sim[i, [row[x["id"]] for x in h["results"]]].float(), rtol=0, atol=1e-5)
        assert [x["score"] for x in h["results"]] == sorted((x["score"] for x in h["results"]), reverse=True)
