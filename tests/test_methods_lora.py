"""LoRA (``lora``): the build spec's tests (lora-tempme.md, section 1 (g)) plus merged inference (a copy of
the weights, CLIP's cost, the shared backbone untouched), checkpoints, the option checks through the
console script, a training run and its index. Forward passes on the tiny backbone (width 64, 2 layers)."""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import vop
from vop.backbone import build_clip
from vop.backbone.checkpoint import weights_fingerprint
from vop.errors import ConfigError
from vop.methods import count_parameters, create_model
from vop.methods.lora import ALL, parse_targets

TARGETS = ["qkv", "q,v", "q,k,v", "qkv,out", "q,k,v,out", "all"]


def _randomise(model, std=0.05, seed=1):
    """Move every update off its initialisation (B = 0): random A and B."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_trainable_parameters():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _lora(clip, **options):
    return create_model("lora", clip, frames=4, **options)


# -- (g)3: counts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["ViT-B/32", "ViT-B/16"])
@pytest.mark.parametrize("targets, image, text", [
    ("qkv", 294_912, 196_608),  # 4rd per block: A (8 x d) shared by q, k, v + B (3d x 8)
    ("q,v", 294_912, 196_608),  # 2 x 2rd
    ("q,k,v", 442_368, 294_912),  # 6rd
    ("qkv,out", 442_368, 294_912),  # 4rd + 2rd
    ("q,k,v,out", 589_824, 393_216),  # 8rd
    ("all", 1_327_104, 884_736),  # 8rd + c_fc 5rd + c_proj 5rd = 18rd
])
def test_counts(arch, targets, image, text):
    c = count_parameters("lora", arch, frames=12, targets=targets)
    assert c["trainable"] == c["counted"] == image + text and c["uncounted"] == c["inert"] == 0
    assert {"qkv": 491_520, "q,v": 491_520, "q,k,v": 737_280, "qkv,out": 737_280, "q,k,v,out": 983_040,
            "all": 2_211_840}[targets] == image + text
    assert count_parameters("lora", arch, frames=12, targets=targets, towers="visual")["trainable"] == image
    assert count_parameters("lora", arch, frames=12, targets=targets, towers="text")["trainable"] == text
    assert count_parameters("lora", arch, frames=12, targets=targets, rank=16)["trainable"] == 2 * (image + text)


def test_shapes_one_shared_A_per_block_and_names():
    with torch.device("meta"):
        m = create_model("lora", vop.build_clip("ViT-B/32"), frames=12)
    for tower, d in (("visual", 768), ("text", 512)):
        assert len(m.lora[tower]) == 12
        for upd in m.lora[tower]:
            assert list(upd.updates) == ["qkv"]
            assert upd.updates["qkv"].A.shape == (8, d) and upd.updates["qkv"].B.shape == (3 * d, 8)
    names = [n for n, _ in m.named_trainable_parameters()]
    assert names[:2] == ["lora.visual.0.updates.qkv.A", "lora.visual.0.updates.qkv.B"] and len(names) == 48
    assert not m.no_weight_decay()  # A and B are weight matrices: decayed (the reference's wd 0.2)
    assert parse_targets("all") == ALL == ("q", "k", "v", "out", "c_fc", "c_proj")
    assert parse_targets(" v, q ") == ("q", "v")


def test_init_A_kaiming_uniform_B_zero():
    torch.manual_seed(0)
    m = create_model("lora", "tiny", frames=4)
    A = torch.cat([u.updates["qkv"].A.flatten() for t in ("visual", "text") for u in m.lora[t]])
    B = [u.updates["qkv"].B for t in ("visual", "text") for u in m.lora[t]]
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt 5) on fan_in 64: U(-1/sqrt(64), 1/sqrt(64))
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound and abs(A.mean()) < 0.01
    assert all(torch.equal(b, torch.zeros_like(b)) for b in B)


# -- (g)1: B = 0 is frozen CLIP, bit for bit, merged or not ---------------------------------------------------
@pytest.mark.parametrize("targets", TARGETS)
def test_zero_B_is_frozen_clip_bit_identical(targets, tiny_clip, video_batch, token_batch):
    m = _lora(tiny_clip, targets=targets).eval()
    assert m.merged
    zs = create_model("zeroshot", tiny_clip, frames=4).eval()
    with torch.no_grad():
        frames = tiny_clip.encode_image(video_batch.flatten(0, 1)).view(3, 4, -1)
        text = tiny_clip.encode_text(token_batch)
        for merged in (True, False):
            if not merged:
                m.unmerge()
            assert torch.equal(m.encode_frames(video_batch), frames)
            assert torch.equal(m.encode_video(video_batch), zs.encode_video(video_batch))
            assert torch.equal(m.encode_text(token_batch), text)


# -- (g)2: the update is W + s B A; merged == unmerged --------------------------------------------------------
def _clip_with_merged_weights(clip, model):
    """A deep copy of ``clip`` with every targeted weight replaced by W + s B A, written by hand (independent of
    the merge code): q/k/v rows of in_proj_weight, out_proj, c_fc, c_proj."""
    out = copy.deepcopy(clip)
    with torch.no_grad():
        for tower in model.lora:
            for upd, blk in zip(model.lora[tower], out.blocks(tower)):
                d = blk.attn.in_proj_weight.shape[1]
                for site, u in upd.updates.items():
                    delta = u.scale * (u.B @ u.A)
                    if site == "qkv":
                        blk.attn.in_proj_weight += delta
                    elif site in ("q", "k", "v"):
                        j = "qkv".index(site)
                        blk.attn.in_proj_weight[j * d:(j + 1) * d] += delta
                    elif site == "out":
                        blk.attn.out_proj.weight += delta
                    else:
                        getattr(blk.mlp, site).weight += delta
    return out


@pytest.mark.parametrize("targets", TARGETS)
def test_unmerged_and_merged_equal_clip_with_updated_weights_float64(targets, video_batch, token_batch):
    clip = build_clip("tiny", seed=0).double().eval()
    m = _randomise(_lora(clip, targets=targets, alpha=4.0).double(), std=0.2)  # s = 1/2
    assert m.lora["visual"][0].updates[m.targets[0]].scale == 0.5
    ref = _clip_with_merged_weights(clip, m)
    video, tokens = video_batch.double(), token_batch
    with torch.no_grad():
        want_f = ref.encode_image(video.flatten(0, 1)).view(3, 4, -1)
        want_t = ref.encode_text(tokens)
        m.eval()
        assert m.merged
        merged_f, merged_t = m.encode_frames(video), m.encode_text(tokens)
        m.unmerge()
        plain_f, plain_t = m.encode_frames(video), m.encode_text(tokens)
    assert (want_f - tiny_zero_clip_frames(clip, video)).abs().max() > 1e-2  # the update matters
    for got in (merged_f, plain_f):
        torch.testing.assert_close(got, want_f, rtol=0, atol=1e-10)
    for got in (merged_t, plain_t):
        torch.testing.assert_close(got, want_t, rtol=0, atol=1e-10)


def tiny_zero_clip_frames(clip, video):
    with torch.no_grad():
        return clip.encode_image(video.flatten(0, 1)).view(video.shape[0], video.shape[1], -1)


def test_merged_equals_unmerged_float32_normalised(tiny_clip, video_batch, token_batch):
    m = _randomise(_lora(tiny_clip, targets="all"), std=0.1).eval()
    with torch.no_grad():
        a_v, a_t = F.normalize(m.encode_video(video_batch), dim=-1), F.normalize(m.encode_text(token_batch), dim=-1)
        m.unmerge()
        b_v, b_t = F.normalize(m.encode_video(video_batch), dim=-1), F.normalize(m.encode_text(token_batch), dim=-1)
    assert not torch.equal(a_v, b_v)  # two computations ...
    torch.testing.assert_close(a_v, b_v, rtol=0, atol=1e-6)  # ... equal to float32 rounding
    torch.testing.assert_close(a_t, b_t, rtol=0, atol=1e-6)


# -- merged inference: a copy, the backbone untouched, CLIP's cost ---------------------------------------------
def test_merge_writes_a_copy_and_leaves_the_backbone_untouched(video_batch):
    clip = build_clip("tiny", seed=0)
    before = weights_fingerprint(clip)
    weights = {n: p.detach().clone() for n, p in clip.named_parameters()}
    m = _randomise(_lora(clip, targets="all"), std=0.1).eval()
    assert m.merged
    with torch.no_grad():
        m.encode_video(video_batch)
    assert weights_fingerprint(clip) == before == m.backbone_fingerprint
    assert all(torch.equal(p, weights[n]) for n, p in clip.named_parameters())
    upd, blk = m.lora["visual"][0], clip.blocks("visual")[0]
    assert upd.merged_qkv.data_ptr() != blk.attn.in_proj_weight.data_ptr()
    assert not torch.equal(upd.merged_qkv, blk.attn.in_proj_weight)
    # never saved: the checkpoint holds A and B only
    assert set(m.state_dict()) - {f"clip.{n}" for n in clip.state_dict()} == set(m.trainable_state_dict())
    assert not any("merged" in n for n in m.state_dict())
    m.train()
    assert not m.merged and upd.merged_qkv is None


def test_merged_model_costs_exactly_clip(video_batch, token_batch):
    """A merged model runs CLIP's computation with other weights: the same FLOPs as zero-shot, to the op."""
    clip = build_clip("tiny", seed=0).eval()
    zs = create_model("zeroshot", clip, frames=4).eval()
    m = _randomise(_lora(clip)).eval()

    def flops(model):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model.encode_video(video_batch)
            model.encode_text(token_batch)
        return fc.get_total_flops()

    base = flops(zs)
    assert flops(m) == base
    m.unmerge()
    assert flops(m) > base


def test_stale_merge_is_redone_and_gradients_use_the_update(tiny_clip, video_batch):
    m = _lora(tiny_clip).eval()
    with torch.no_grad():
        zero = m.encode_video(video_batch)
        _randomise(m)  # in place, after the merge (as loading a checkpoint into an eval-mode model)
        after = m.encode_video(video_batch)
        m.unmerge()
        want = m.encode_video(video_batch)
    assert not torch.allclose(zero, after, atol=1e-4)
    torch.testing.assert_close(after, want, rtol=0, atol=1e-6)
    # eval mode with autograd recording: the unmerged path, so that A and B get their gradients
    m.merge()
    m.encode_video(video_batch).sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for n, p in m.named_trainable_parameters() if "visual" in n)


def test_merge_is_refused_in_train_mode(tiny_clip):
    m = _lora(tiny_clip).train()
    with pytest.raises(RuntimeError, match="train mode"):
        m.merge()
    m.merge_on_eval = False
    m.eval()
    assert not m.merged
    m.merge()
    assert m.merged


# -- (g)4: the first backward at initialisation -----------------------------------------------------------------
def test_first_backward_A_grad_zero_B_grad_nonzero(tiny_clip, video_batch, token_batch):
    m = _lora(tiny_clip).train()
    v, t = m(video_batch, token_batch)
    (t @ v.t()).diagonal().sum().backward()
    for tower in ("visual", "text"):
        for upd in m.lora[tower]:
            u = upd.updates["qkv"]
            assert torch.equal(u.A.grad, torch.zeros_like(u.A))  # multiplied by B = 0
            assert u.B.grad.abs().max() > 0


# -- (g)5: dropout ---------------------------------------------------------------------------------------------
def test_dropout_stochastic_in_training_deterministic_in_eval(tiny_clip, video_batch):
    m = _randomise(_lora(tiny_clip, dropout=0.5), std=0.3).train()
    with torch.no_grad():
        a, b = m.encode_video(video_batch), m.encode_video(video_batch)
        assert not torch.allclose(a, b, atol=1e-4)
        m.eval()
        c, d = m.encode_video(video_batch), m.encode_video(video_batch)
        m.unmerge()
        e = m.encode_video(video_batch)
    assert torch.equal(c, d)
    torch.testing.assert_close(c, e, rtol=0, atol=1e-6)


# -- (g)6: checkpoints -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"targets": "all", "alpha": 16.0, "towers": "visual"}])
def test_checkpoint_round_trip_bit_identical(options, tmp_path, video_batch, token_batch):
    from safetensors.torch import load_file

    clip = build_clip("tiny", seed=0)
    m = _randomise(_lora(clip, **options)).eval()
    path = vop.save_checkpoint(m, tmp_path / "lora.safetensors")
    meta = vop.read_checkpoint_meta(path)
    assert meta["method"] == "lora" and meta["frames"] == 4
    assert set(load_file(str(path))) == set(m.trainable_state_dict())
    m2 = vop.load_checkpoint(path, build_clip("tiny", seed=0)).eval()
    assert m2.merged and m2.options_dict() == m.options_dict()
    with torch.no_grad():
        assert torch.equal(m.encode_video(video_batch), m2.encode_video(video_batch))
        assert torch.equal(m.encode_text(token_batch), m2.encode_text(token_batch))
        m.unmerge(), m2.unmerge()
        assert torch.equal(m.encode_video(video_batch), m2.encode_video(video_batch))


def test_grad_checkpointing_same_gradients(tiny_clip, video_batch, token_batch):
    grads = []
    for ckpt in (False, True):
        m = _randomise(_lora(tiny_clip, targets="all", dropout=0.1)).train().set_grad_checkpointing(ckpt)
        torch.manual_seed(0)
        v, t = m(video_batch, token_batch)
        (t @ v.t()).trace().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_trainable_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=1e-6)


def test_visual_only_keeps_the_text_tower_and_frames_are_free(tiny_clip, video_batch, token_batch):
    m = _randomise(_lora(tiny_clip, towers="visual")).eval()
    assert m.grad_start("text") is None and m.grad_start("visual") == 0
    with torch.no_grad():
        assert torch.equal(m.encode_text(token_batch), tiny_clip.encode_text(token_batch))
        # any frame count; frame order does not matter (meanP of per-frame embeddings)
        assert m.check_frames(7) == 7
        v = m.encode_video(video_batch)
        torch.testing.assert_close(m.encode_video(video_batch.flip(1)), v, rtol=0, atol=1e-6)


# -- options ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, words", [
    ({"targets": "qk"}, "model.options.targets of lora names 'qk'"),
    ({"targets": "qkv,q"}, "'qkv' (the fused projection, one A shared by q, k, v) cannot be combined"),
    ({"targets": "q,q"}, "names a site twice"),
    ({"targets": ""}, "names nothing"),
    ({"rank": 0}, "model.options.rank of lora must be an integer in 1..16384"),
    ({"dropout": 1.0}, "must be below 1"),
    ({"alpha": float("inf")}, "lora option alpha must be a finite number"),
    ({"towers": "image"}, "model.options.towers of lora must be one of both, visual, text"),
])
def test_options_are_checked(options, words):
    with pytest.raises(ConfigError) as e:
        create_model("lora", "tiny", frames=4, **options)
    assert words in str(e.value)


def _vop_script() -> str:
    exe = shutil.which("vop", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert exe, "the `vop` console script is not installed (pip install -e .)"
    return exe


def test_bad_option_through_the_console_script(world, tmp_path):
    r = subprocess.run([_vop_script(), "train", f"data.root={world}", "data.dataset=collection", "model.backbone=tiny",
                        "model.method=lora", "model.options.targets=q,kv", "model.frames=2", "model.image_size=32",
                        f"out_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    both = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in both and r.stderr.startswith("error: "), both
    assert "model.options.targets of lora names 'kv'" in r.stderr
    assert not (tmp_path / "run").exists()


def test_params_command_lists_lora_and_tempme():
    r = subprocess.run([_vop_script(), "params", "--backbone", "ViT-B/32", "--json"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {row["method"]: row for row in json.loads(r.stdout)}
    assert rows["lora"]["trainable"] == rows["lora"]["paper_count"] == 491_520
    assert rows["tempme"]["trainable"] == rows["tempme"]["paper_count"] == 507_648


# -- a training run, its checkpoint and its index (merged) -----------------------------------------------------
@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    from tiny_runs import train_tiny

    return train_tiny(world, tmp_path_factory.mktemp("lora") / "run", "lora")


def test_training_run_reproduces_its_test_metrics_and_index_ranks_as_unmerged(world, run, tmp_path, capsys):
    from vop.cli.main import main
    from vop.data import get_dataset
    from vop.engine.evaluate import evaluate
    from vop.retrieval import VideoIndex

    out, results = run
    ckpt = out / "last.safetensors"
    model = vop.load_checkpoint(ckpt).eval()
    assert model.merged and any(p.abs().max() > 0 for n, p in model.named_trainable_parameters() if n.endswith(".B"))
    ds = get_dataset("collection", world, "test", frames=4, size=32, train=False)
    merged = evaluate(model, ds, batch_size=16)
    assert merged.metrics["t2v"] == results["last"]["test"]["t2v"]
    model.merge_on_eval = False
    model.unmerge()
    plain = evaluate(model, ds, batch_size=16)
    assert not model.merged
    torch.testing.assert_close(merged.video_emb, plain.video_emb, rtol=0, atol=1e-6)

    ix = tmp_path / "ix"
    capsys.readouterr()
    assert main(["index", "--videos", str(world / "captions.jsonl"), "--split", "test", "--checkpoint", str(ckpt),
                 "--out", str(ix), "--image-size", "32", "-j", "0", "-q"]) == 0
    index = VideoIndex.open(ix)
    assert [e["id"] for e in index.entries] == ds.videos
    assert torch.equal(torch.from_numpy(index.emb).float(), merged.video_emb.float())  # the merged model indexed
    qfile = tmp_path / "q.txt"
    qfile.write_text("\n".join(ds.captions) + "\n")
    capsys.readouterr()
    assert main(["search", str(ix), "--queries", str(qfile), "-k", "16", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    row = {v: i for i, v in enumerate(ds.videos)}
    for i, h in enumerate(hits):
        scores, ids = [x["score"] for x in h["results"]], [x["id"] for x in h["results"]]
        assert len(ids) == 16 and all(a >= b - 1e-6 for a, b in zip(scores, scores[1:]))
        # the unmerged model's scores of the same videos, in the same order (up to float32 rounding)
        want = plain.sim[i, [row[v] for v in ids]]
        torch.testing.assert_close(torch.tensor(scores), want.float(), rtol=0, atol=1e-5)


# -- every backbone family: RoPE (PE-Core, EVA02), EVA02's sub-LN, SwiGLU and missing key bias ------------------
@pytest.mark.parametrize("arch", ["pe-core-tiny", "eva02-tiny"])
@pytest.mark.parametrize("targets", ["qkv", "all"])
def test_lora_on_rope_towers_equals_the_folded_backbone(arch, targets):
    from vop.backbone import build_clip

    clip = build_clip(arch, seed=0).eval()
    model = _randomise(create_model("lora", clip, frames=3, targets=targets)).train()
    ref = create_model("zeroshot", _clip_with_merged_weights(clip, model), frames=3).eval()
    s = clip.cfg.vision.image_size
    video = torch.randn(2, 3, 3, s, s, generator=torch.Generator().manual_seed(0))
    tokens = ref.tokenizer()(["a red circle moving left", "the square turns blue"])[:, : model.max_text_tokens]
    with torch.no_grad():
        unmerged_v, unmerged_t = model.encode_frames(video), model.encode_text(tokens)  # train mode: never merged
        model.eval()
        assert model.merged
        merged_v, merged_t = model.encode_frames(video), model.encode_text(tokens)
        want_v, want_t = ref.encode_frames(video), ref.encode_text(tokens)
    assert not torch.allclose(want_v, create_model("zeroshot", clip, frames=3).eval().encode_frames(video), atol=1e-3)
    for got in (unmerged_v, merged_v):
        torch.testing.assert_close(got, want_v, rtol=0, atol=2e-5)
    for got in (unmerged_t, merged_t):
        torch.testing.assert_close(got, want_t, rtol=0, atol=2e-5)
    assert all(torch.equal(a, b) for a, b in zip(clip.state_dict().values(), build_clip(arch, seed=0).state_dict().values()))
