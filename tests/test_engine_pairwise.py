"""Pairwise methods (``model.pairwise``: Cross-Modal Adapter's query-score pooling) through the engine,
the evaluation and ``vop index`` / ``vop search`` / the service: exact accumulation and DDP gathering of
per-frame embeddings, chunked evaluation equal to the full similarity, a training run whose test
metrics a fresh evaluation of its checkpoint reproduces, and an index + search ranking equal to the
evaluation's similarity matrix. (Dual encoders: tests/test_engine_train.py, test_retrieval_*.py,
test_runtime.py and test_demo.py check them unchanged.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vop
from vop.engine.config import RunConfig, load_config
from vop.engine.loss import accumulated_backward, contrastive_loss
from vop.errors import ConfigError
from vop.scoring import block_sizes

TOL = 1e-6  # the metrics' tie rule (vop.engine.metrics.TIE_RTOL) on cosines <= 1


def _cfg(world, out, *extra):
    return load_config(RunConfig, None, [
        f"data.root={world}", "data.dataset=collection", "model.backbone=tiny", "model.frames=4",
        "model.image_size=32", "optim.batch_size=8", "data.num_workers=0", "eval.batch_size=8",
        f"out_dir={out}", "optim.lr=5e-3", *extra])


def _explicit_qscore(t: torch.Tensor, v: torch.Tensor, tau: float) -> torch.Tensor:
    """The per-pair definition: w = softmax_f(t . v_f / tau), vbar = sum_f w_f v_f, cos(t, vbar)."""
    t, v = t.double(), v.double()
    out = torch.empty(t.shape[0], v.shape[0], dtype=torch.float64)
    for i in range(t.shape[0]):
        for j in range(v.shape[0]):
            w = torch.softmax(v[j] @ t[i] / tau, dim=0)
            vbar = (w[:, None] * v[j]).sum(0)
            out[i, j] = t[i] @ vbar / (t[i].norm() * vbar.norm())
    return out


# ----------------------------------------------------------------------------------------------
# training: the loss is the q-score one, accumulation stays exact, DDP gathers the frames
# ----------------------------------------------------------------------------------------------
def test_accumulation_is_exact_for_cma(tiny_clip, video_batch):
    """GradCache-style accumulation (cached per-frame embeddings, then chunks backpropagated) gives the
    gradient of the whole batch, through accumulated_backward and through the trainer's _step."""
    from vop.engine.trainer import _Pair, _step

    video = torch.cat([video_batch, video_batch.flip(1)])  # 6 videos
    grads = []
    for chunks in (1, 2, 3):
        for via_step in (False, True):
            torch.manual_seed(0)
            m = vop.create_model("cma", tiny_clip, frames=4)
            assert m.pairwise
            tokens = m.tokenizer(16)([f"caption {i}" for i in range(6)])
            if via_step:
                scaler = torch.amp.GradScaler("cpu", enabled=False)
                loss = _step(_Pair(m), m, video, tokens, chunks, None, torch.device("cpu"), scaler)
            else:
                n = 6 // chunks
                embed = lambda i: m(video[i * n:(i + 1) * n], tokens[i * n:(i + 1) * n])  # noqa: E731
                if chunks == 1:
                    v, t = embed(0)
                    assert v.shape == (6, 4, 64) and t.shape == (6, 64)  # raw frames, raw text
                    loss = contrastive_loss(v, t, m.logit_scale, m.similarity)
                    loss.backward()
                    loss = loss.item()
                else:
                    loss = accumulated_backward(embed, chunks, lambda: m.logit_scale, similarity=m.similarity)
            grads.append((loss, {k: p.grad.clone() for k, p in m.named_trainable_parameters()}))
    # the loss is the symmetric cross-entropy on logit_scale x the query-score cosines (not a dot product)
    torch.manual_seed(0)
    m = vop.create_model("cma", tiny_clip, frames=4)
    with torch.no_grad():
        frames, text = m(video, m.tokenizer(16)([f"caption {i}" for i in range(6)]))
        logits = m.logit_scale.double() * _explicit_qscore(text, frames, m.opts.tau)
    labels = torch.arange(6)
    ce = torch.nn.functional.cross_entropy
    want = ((ce(logits, labels) + ce(logits.t(), labels)) / 2).item()
    assert grads[0][0] == pytest.approx(want, rel=1e-5)
    assert any(g.abs().max() > 0 for g in grads[0][1].values())
    for loss, g in grads[1:]:
        assert loss == pytest.approx(grads[0][0], rel=1e-6)
        for k in g:
            assert torch.allclose(g[k], grads[0][1][k], atol=1e-6, rtol=1e-4), k


def test_two_process_gradients_equal_single_process_for_cma(tmp_path):
    """Under torchrun (2 gloo ranks), the (B, F, D) frames are all-gathered with gradients: the averaged
    gradients are those of one process on the whole batch (tests/scripts/ddp_grads.py)."""
    script = Path(__file__).parent / "scripts" / "ddp_grads.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, multi = tmp_path / "single.pt", tmp_path / "multi.pt"
    subprocess.run([sys.executable, str(script), str(single), "cma"], check=True, env=env, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(multi), "cma"], env=env, timeout=300, capture_output=True, text=True)
    if proc.returncode != 0 and any(s in proc.stderr for s in ("DistNetworkError", "RendezvousError", "EADDRINUSE")):
        pytest.skip("torchrun cannot start 2 gloo processes on this machine")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(single), torch.load(multi)
    assert set(a) == set(b) and len(a) > 1
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-4), k
    assert a["__loss"].item() == pytest.approx(b["__loss"].item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# evaluation: chunked = full, memory bounded
# ----------------------------------------------------------------------------------------------
class _Largest3d(torch.overrides.TorchFunctionMode):
    """The largest 3-D tensor any torch function returns, other than (views of) the frame embeddings (a
    dimension D): the videos x frames x texts intermediates."""

    def __init__(self, dim: int):
        super().__init__()
        self.numel, self.dim = 0, dim

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor) and o.dim() == 3 and self.dim not in o.shape:
                self.numel = max(self.numel, o.numel())
        return out


def test_chunked_similarity_equals_the_full_one(tiny_clip):
    m = vop.create_model("cma", tiny_clip, frames=4).eval()
    g = torch.Generator().manual_seed(0)
    T, V, Fr, D = 37, 53, 4, 64
    t, v = torch.randn(T, D, generator=g) * 3, torch.randn(V, Fr, D, generator=g) * 3
    want = _explicit_qscore(t, v, m.opts.tau)
    full = m.similarity(t, v)
    budget = 4 * Fr * 5 * 7  # blocks of 5 texts x 7 videos (or 1 x 35)
    assert m.scoring.blocks(T, V, (Fr, D), budget, query_chunk=5) == (5, 7)
    with _Largest3d(D) as mode:
        chunked = m.scoring.matrix(t, v, max_bytes=budget, query_chunk=5)
    assert mode.numel <= budget // 4  # never more than one budget's worth of texts x videos x frames
    assert chunked.shape == (T, V) and chunked.dtype == torch.float32
    torch.testing.assert_close(chunked.double(), want, rtol=0, atol=2e-6)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6)
    # float64 embeddings: float64 blocks, equal to the per-pair definition to rounding
    c64 = m.scoring.matrix(t.double(), v.double(), max_bytes=budget, query_chunk=5)
    assert c64.dtype == torch.float64
    torch.testing.assert_close(c64, want, rtol=0, atol=1e-12)
    # the smallest budget: one text x one video per block
    assert block_sizes(T, V, 4 * Fr, 1) == (1, 1)
    torch.testing.assert_close(m.scoring.matrix(t.double(), v.double(), max_bytes=1), want, rtol=0, atol=1e-12)
    assert m.scoring.matrix(t[:0], v).shape == (0, V)
    with pytest.raises(ValueError, match="per-frame"):
        m.scoring.matrix(t, v.mean(1))


def test_evaluation_of_a_pairwise_model_is_chunked_and_exact(world, monkeypatch):
    """evaluate(): raw text (T, D) and frames (V, F, D) kept, the T x V matrix built in blocks equals the
    full similarity; the metrics read it; a small block budget changes nothing but the blocks."""
    import vop.scoring
    from vop.data import get_dataset
    from vop.engine.evaluate import evaluate
    from vop.engine.metrics import retrieval_metrics

    ds = get_dataset("collection", world, "test", frames=4, size=32, train=False)
    torch.manual_seed(0)
    m = vop.create_model("cma", "tiny", frames=4).eval()
    out = evaluate(m, ds, batch_size=8)
    T, V = len(ds.captions), len(ds.videos)
    assert out.text_emb.shape == (T, 64) and out.video_emb.shape == (V, 4, 64) and out.sim.shape == (T, V)
    assert not torch.allclose(out.text_emb.norm(dim=-1), torch.ones(T))  # raw: the q-score reads |t|
    want = _explicit_qscore(out.text_emb, out.video_emb, m.opts.tau)
    torch.testing.assert_close(out.sim.double(), want, rtol=0, atol=2e-6)
    m_ = retrieval_metrics(out.sim, ds.text_to_video)
    assert out.metrics["t2v"] == m_["t2v"] and out.metrics["v2t"] == m_["v2t"]
    monkeypatch.setattr(vop.scoring, "BLOCK_BYTES", 4 * 4 * 10)  # 40 texts x videos x 4 frames a block
    tc, vc = block_sizes(T, V, 4 * 4)
    assert tc * vc <= 40 and (tc, vc) != (T, V)
    small = evaluate(m, ds, batch_size=8)
    torch.testing.assert_close(small.sim, out.sim, rtol=0, atol=1e-6)
    # DSL post-processing reads the same matrix
    dsl = evaluate(m, ds, batch_size=8, postprocess="dsl")
    assert dsl.metrics["postprocess"] == "dsl" and torch.equal(dsl.sim, small.sim)


# ----------------------------------------------------------------------------------------------
# a training run of cma, its checkpoint, its index and search
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    from vop.engine.trainer import train

    out = tmp_path_factory.mktemp("cma") / "run"
    results = train(_cfg(world, out, "model.method=cma", "optim.epochs=2", "optim.accumulate=2",
                         "eval.every_epoch=false"), progress=False)
    return out, results


def test_cma_training_run_reproduces_its_test_metrics(world, run):
    from vop.data import get_dataset
    from vop.engine.evaluate import evaluate

    out, results = run
    assert results["method"] == "cma" and results["steps"] == 12
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses and all(np.isfinite(losses))
    model = vop.load_checkpoint(out / "last.safetensors").eval()
    assert model.pairwise
    torch.manual_seed(0)
    init = vop.create_model("cma", "tiny", frames=4)
    assert any(not torch.equal(p, init.trainable_state_dict()[n]) for n, p in model.trainable_state_dict().items())
    ds = get_dataset("collection", world, "test", frames=4, size=32, train=False)
    ev = evaluate(model, ds, batch_size=8)
    test = results["last"]["test"]
    assert ev.metrics["t2v"] == test["t2v"] and ev.metrics["v2t"] == test["v2t"]


def test_index_and_search_rank_as_the_evaluation(world, run, tmp_path, capsys):
    """`vop index --checkpoint <cma>` keeps the per-frame embeddings (the evaluation's, bit for bit) and
    `vop search` / the service rank every video as the evaluation's similarity matrix does."""
    from vop.cli.main import main
    from vop.data import get_dataset
    from vop.engine.evaluate import evaluate
    from vop.retrieval import SearchService, Searcher, VideoIndex

    ckpt = run[0] / "last.safetensors"
    ix = tmp_path / "ix"
    capsys.readouterr()
    assert main(["index", "--videos", str(world / "captions.jsonl"), "--split", "test", "--checkpoint", str(ckpt),
                 "--out", str(ix), "--image-size", "32", "-j", "0", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "16 videos (16 encoded" in printed and "per-frame embeddings" in printed and "no FAISS" in printed
    meta = json.loads((ix / "index.json").read_text())
    assert meta["pairwise"] is True and meta["frames_per_video"] == 4 and meta["dim"] == 64 and meta["faiss"] is None
    index = VideoIndex.open(ix)
    assert index.scoring.kind == "qscore" and not index.scoring.ann and index.emb.shape == (16, 4, 64)

    ds = get_dataset("collection", world, "test", frames=4, size=32, train=False)
    model = vop.load_checkpoint(ckpt).eval()
    ev = evaluate(model, ds, batch_size=16)  # the index's batches (16): the same frames, bit for bit
    assert [e["id"] for e in index.entries] == ds.videos
    assert torch.equal(torch.from_numpy(index.emb), ev.video_emb)

    qfile = tmp_path / "q.txt"
    qfile.write_text("\n".join(ds.captions) + "\n")
    assert main(["search", str(ix), "--queries", str(qfile), "-k", "16", "--json"]) == 0
    cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [c["query"] for c in cli] == ds.captions and all(c["search"] == "exact" for c in cli)
    row = {v: i for i, v in enumerate(ds.videos)}
    sim = ev.sim.double()

    def same_ranking(i: int, hits: list[dict], k: int = 16) -> None:
        """``hits`` rank the videos as row i of the evaluation's matrix: its scores, never increasing down
        the list, and the evaluation's order wherever scores are not tied (within the metrics' tie rule:
        a video and its time-reversed twin hold the same frames, and the q-score, blind to frame order,
        ties them up to rounding, which a batch of 1 or 16 queries orders differently)."""
        rows = [row[h["id"]] for h in hits]
        assert len(rows) == len(set(rows)) == k
        got, want = np.array([h["score"] for h in hits]), sim[i, rows].numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        assert np.all(np.diff(want) <= TOL), (i, want)
        order = sorted(range(16), key=lambda j: (-sim[i, j].item(), j))[:k]
        strict = [j for j in order if all(abs(sim[i, j] - sim[i, o]) > TOL for o in range(16) if o != j)]
        assert [j for j in rows if j in strict] == strict, (i, rows, order)

    for i, c in enumerate(cli):
        same_ranking(i, c["results"])
    # the service and Searcher (one query at a time) too; an index of a pairwise model says so
    svc = SearchService.load([str(ix)])
    assert svc.describe()["indexes"][0]["pairwise"] is True
    for i in (0, 7):
        api = svc.search(ds.captions[i], k=5)
        assert api["search"] == "exact" and api["total"] == 16
        same_ranking(i, api["results"], 5)
    s = Searcher.open(ix)
    same_ranking(3, s.search([ds.captions[3]], k=5)[0], 5)
    # the same ranking without the kept Gram matrices (model.similarity on each block) and in small blocks
    from vop.retrieval.index import top_k

    q = s.encode(ds.captions)
    a_s, _ = top_k(s.model.scoring, index.emb_tensor, q, 16, cache=index.gallery_cache(s.model))
    b_s, _ = top_k(s.model.scoring, index.emb_tensor, q, 16, max_bytes=4 * 4 * 3)
    np.testing.assert_allclose(a_s, b_s, rtol=0, atol=1e-6)
    assert index.gallery_cache(s.model).shape == (16, 4, 4)


def test_pairwise_index_refuses_faiss_and_mixing(world, run, tmp_path, caplog):
    from vop.retrieval import VideoIndex, build_index

    ckpt = run[0] / "last.safetensors"
    src = world / "captions.jsonl"
    kw = dict(split="test", image_size=32, progress=False)
    with pytest.raises(ConfigError, match="exact"):
        build_index(src, ckpt, tmp_path / "a", faiss="ivf", **kw)
    assert not (tmp_path / "a").exists()
    # a dual-encoder index (vop-fc) cannot take cma embeddings, nor be searched with a cma model
    torch.manual_seed(0)
    fc = vop.save_checkpoint(vop.create_model("vop-fc", "tiny", frames=4), tmp_path / "fc.safetensors",
                             extra={"backbone": "tiny"})
    faiss = "ivf" if _have_faiss() else None
    build_index(src, fc, tmp_path / "b", faiss=faiss, **kw)
    dual = VideoIndex.open(tmp_path / "b")
    assert dual.scoring.kind == "cosine" and dual.meta["pairwise"] is False and dual.emb.shape == (16, 64)
    cma = vop.load_checkpoint(ckpt).eval()
    with pytest.raises(ConfigError, match="cannot be mixed"):
        dual.check_model(cma)
    with pytest.raises(ConfigError, match="different settings"):
        build_index(src, ckpt, tmp_path / "b", **kw)
    # --rebuild re-encodes as per-frame embeddings and drops the FAISS index (said in the log)
    with caplog.at_level("WARNING", logger="vop.retrieval"):
        r = build_index(src, ckpt, tmp_path / "b", rebuild=True, **kw)
    assert r.scoring == "qscore" and r.faiss is None
    if faiss:
        assert "no FAISS index" in caplog.text
    ix = VideoIndex.open(tmp_path / "b")
    assert ix.scoring.kind == "qscore" and ix.emb.shape == (16, 4, 64) and ix.faiss_kind is None
    assert not list((tmp_path / "b").glob("faiss-*"))
    with pytest.raises(ConfigError, match="Searcher"):
        ix.search(np.zeros((1, 64), np.float32), 5)  # scored by the model: not without it
    fc_model = vop.load_checkpoint(fc).eval()
    with pytest.raises(ConfigError, match="cannot be mixed"):
        ix.search(np.zeros((1, 64), np.float32), 5, model=fc_model)


def _have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True
