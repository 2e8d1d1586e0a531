"""One scoring abstraction (``model.scoring``, vop/scoring.py) is the only path from a model to its scores.

A toy method defined here, in one plugin file, with a third kind of scores (max over frames: late
interaction, neither a dual encoder's cosine nor cma's query score), trains through the real trainer,
evaluates, is indexed and searched by the `vop` console script, its scores equal to an explicit
computation at every step: no engine, runtime or retrieval code knows it. Plus the source checks that
no ``pairwise`` branch is left outside the scoring implementation. Run in subprocesses so that the
registry of this test session stays vop's own (as tests/test_adding_a_method.py)."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vop"

PLUGIN = textwrap.dedent('''
    """A toy method scoring each text by its best frame of each video (late interaction)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from vop.methods import Rates, VideoTextModel, register
    from vop.scoring import FrameScoring


    class MaxSim(FrameScoring):
        kind = "maxsim"
        no_ann = "takes each query's best frame of every video (late interaction), so search is exact"

        def rows(self, video):
            return F.normalize(super().rows(video), dim=-1)

        def queries(self, text):
            return F.normalize(text, dim=-1)

        def score(self, queries, rows, cache=None):
            dtype = torch.promote_types(torch.promote_types(queries.dtype, rows.dtype), torch.float32)
            q, r = queries.to(dtype), rows.to(dtype)
            n, f, d = r.shape
            return (r.reshape(n * f, d) @ q.t()).view(n, f, q.shape[0]).amax(dim=1).t()


    @register("toy-maxsim", label="max-over-frames toy", rates=Rates(5e-3, 0.0, "a test"))
    class ToyMaxSim(VideoTextModel):
        def build(self):
            d = self.clip.cfg.embed_dim
            self.text_proj = nn.Linear(d, d)
            with torch.no_grad():
                self.text_proj.weight.copy_(torch.eye(d) + 0.01 * torch.randn(d, d))
                self.text_proj.bias.zero_()
            self.frame_gain = nn.Parameter(1 + 0.1 * torch.randn(d))  # per channel, on every frame embedding

        def encode_text(self, tokens):
            return self.text_proj(super().encode_text(tokens))

        def encode_frames(self, video):
            return super().encode_frames(video) * self.frame_gain

        def encode_video(self, video):
            return self.encode_frames(video)

        @property
        def scoring(self):
            return MaxSim()
''')

SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    import torch
    import torch.nn.functional as F
    import toy_maxsim  # registers "toy-maxsim"
    import vop
    from vop.data import build_loader, get_dataset, to_model_input
    from vop.engine.config import RunConfig, load_config
    from vop.engine.evaluate import evaluate
    from vop.engine.trainer import _Pair, _step, train

    world, out = sys.argv[1], sys.argv[2]
    res = {}

    def explicit(t, frames):
        """max over frames of cos(text, frame), per pair, float64."""
        t, v = F.normalize(t.double(), dim=-1), F.normalize(frames.double(), dim=-1)
        s = torch.empty(t.shape[0], v.shape[0], dtype=torch.float64)
        for i in range(t.shape[0]):
            for j in range(v.shape[0]):
                s[i, j] = (v[j] @ t[i]).max()
        return s

    # one training step through the trainer's step, whole batch and in 2 exact micro-batches
    clip = vop.build_clip("tiny", seed=0)
    video = torch.randn(6, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for chunks in (1, 2):
        torch.manual_seed(0)
        m = vop.create_model("toy-maxsim", clip, frames=4)
        tokens = m.tokenizer(16)([f"caption {i}" for i in range(6)])
        loss = _step(_Pair(m), m, video, tokens, chunks, None, torch.device("cpu"), torch.amp.GradScaler("cpu", enabled=False))
        grads.append((loss, {k: p.grad.clone() for k, p in m.named_trainable_parameters()}))
    torch.manual_seed(0)
    m = vop.create_model("toy-maxsim", clip, frames=4)
    with torch.no_grad():
        logits = m.logit_scale.double() * explicit(m.encode_text(tokens), m.encode_frames(video))
    labels = torch.arange(6)
    res["loss"], res["loss_explicit"] = grads[0][0], ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2).item()
    res["loss_chunks2"] = grads[1][0]
    res["grad_nonzero"] = sorted(k for k, g in grads[0][1].items() if g.abs().max() > 0)
    res["grad_chunks_diff"] = max((grads[0][1][k] - grads[1][1][k]).abs().max().item() for k in grads[0][1])

    # a real training run, its checkpoint, a fresh evaluation equal to the explicit scores
    cfg = load_config(RunConfig, None, [f"data.root={world}", "data.dataset=collection", "model.backbone=tiny",
        "model.method=toy-maxsim", "model.frames=4", "model.image_size=32", "optim.batch_size=8", "optim.epochs=1",
        "data.num_workers=0", "eval.batch_size=16", f"out_dir={out}/run", "optim.lr=5e-3"])
    results = train(cfg, progress=False)
    res["steps"] = results["steps"]
    model = vop.load_checkpoint(f"{out}/run/last.safetensors").eval()
    res["trained"] = any(not torch.equal(p, m.trainable_state_dict()[n]) for n, p in model.trainable_state_dict().items())
    ds = get_dataset("collection", world, "test", frames=4, size=32, train=False)
    ev = evaluate(model, ds, batch_size=16)
    res["metrics_equal"] = ev.metrics["t2v"] == results["last"]["test"]["t2v"] and ev.metrics["v2t"] == results["last"]["test"]["v2t"]
    with torch.no_grad():
        frames = {}
        for batch in build_loader(ds.video_dataset(), 16, shuffle=False, num_workers=0, drop_last=False):
            for vid, f in zip(batch["video_id"], model.encode_frames(to_model_input(batch["video"]))):
                frames[vid] = f
        raw_frames = torch.stack([frames[v] for v in ds.videos])
        raw_text = model.encode_text(model.tokenizer(32)(ds.captions))
    want = explicit(raw_text, raw_frames)
    res["shapes"] = [list(ev.text_emb.shape), list(ev.video_emb.shape), list(ev.sim.shape)]
    res["eval_vs_explicit"] = (ev.sim.double() - want).abs().max().item()
    np.save(f"{out}/explicit.npy", want.numpy())
    np.save(f"{out}/eval_rows.npy", ev.video_emb.numpy())
    (open(f"{out}/captions.txt", "w")).write("\\n".join(ds.captions) + "\\n")
    json.dump(ds.videos, open(f"{out}/videos.json", "w"))
    # a dual encoder's checkpoint, to be refused by the index of max-over-frames rows
    torch.manual_seed(0)
    vop.save_checkpoint(vop.create_model("vop-fc", "tiny", frames=4), f"{out}/fc.safetensors", extra={"backbone": "tiny"})
    print(json.dumps(res))
''')


def _plugin_env(tmp_path: Path) -> dict[str, str]:
    """``toy_maxsim`` importable and declared as a vop.methods plugin (the `vop` script finds it)."""
    (tmp_path / "toy_maxsim.py").write_text(PLUGIN)
    dist = tmp_path / "toy_maxsim-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-maxsim\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vop.methods]\ntoy-maxsim = toy_maxsim\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    return env


def _vop(*args, env) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which("vop", path=path)
    assert exe, "the `vop` console script is not installed (pip install -e .)"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def test_a_third_kind_of_scores_trains_evaluates_indexes_and_searches(world, tmp_path):
    env = _plugin_env(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(world), str(out)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # training: the loss is the symmetric cross-entropy on logit_scale x max-over-frames cosines; accumulation exact
    assert res["loss"] == pytest.approx(res["loss_explicit"], rel=1e-5)
    assert res["loss_chunks2"] == pytest.approx(res["loss"], rel=1e-6) and res["grad_chunks_diff"] < 1e-6
    assert res["grad_nonzero"] == ["frame_gain", "text_proj.bias", "text_proj.weight"]
    assert res["steps"] == 6 and res["trained"]
    # evaluation: normalised text (T, D) and per-frame rows (V, F, D), the explicit scores, the run's metrics
    T = len((out / "captions.txt").read_text().splitlines())
    assert res["shapes"] == [[T, 64], [16, 4, 64], [T, 16]]
    assert res["eval_vs_explicit"] < 2e-6
    assert res["metrics_equal"]

    # `vop index`: the rows as the evaluation made them, the kind recorded, no FAISS (the scoring says why)
    ckpt, ix = out / "run" / "last.safetensors", tmp_path / "ix"
    src = world / "captions.jsonl"
    r = _vop("index", "--videos", src, "--split", "test", "--checkpoint", ckpt, "--out", ix, "--image-size", "32",
             "-j", "0", "-q", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "16 videos (16 encoded" in r.stdout
    assert "per-frame embeddings: the model takes each query's best frame of every video (late interaction), so search " \
           "is exact (no FAISS index)" in r.stdout
    meta = json.loads((ix / "index.json").read_text())
    assert meta["scoring"] == {"kind": "maxsim", "row_shape": [4, 64], "ann": False}
    assert meta["pairwise"] is True and meta["frames_per_video"] == 4 and meta["faiss"] is None  # for older readers
    rows = np.load(ix / meta["files"]["embeddings"])
    assert np.array_equal(rows, np.load(out / "eval_rows.npy"))  # bit for bit the evaluation's
    r = _vop("index", "--videos", src, "--split", "test", "--checkpoint", ckpt, "--out", tmp_path / "ix2",
             "--image-size", "32", "-j", "0", "-q", "--faiss", "ivf", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert "error: --faiss ivf" in r.stderr and "search is exact" in r.stderr and not (tmp_path / "ix2").exists()

    # `vop search`: every video scored by the model's scoring, the explicit scores, best first
    want = np.load(out / "explicit.npy")
    videos = json.loads((out / "videos.json").read_text())
    row = {v: i for i, v in enumerate(videos)}
    r = _vop("search", ix, "--queries", out / "captions.txt", "-k", "16", "--json", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == T and all(x["search"] == "exact" for x in lines)
    for i, x in enumerate(lines):
        got = np.array([h["score"] for h in x["results"]])
        cols = [row[h["id"]] for h in x["results"]]
        assert sorted(cols) == list(range(16))
        np.testing.assert_allclose(got, want[i, cols], rtol=0, atol=2e-6)
        assert np.all(np.diff(got) <= 0)
    # a dual encoder's checkpoint is refused for this index, naming both kinds
    r = _vop("search", ix, "a red circle", "--checkpoint", out / "fc.safetensors", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith(f"error: {ix}: a pairwise index") and "maxsim" in err
    assert "(vop-fc) is a dual-encoder model" in err and "cannot be mixed" in err


# ----------------------------------------------------------------------------------------------
# no pairwise branch left: only the scoring implementation, cma and the index format's legacy field
# ----------------------------------------------------------------------------------------------
ALLOWED = {"scoring.py", "methods/base.py", "methods/cma.py", "retrieval/format.py"}


def _sources():
    return sorted(p for p in SRC.rglob("*.py"))


def test_no_pairwise_flag_is_read_outside_the_scoring():
    mentions = {str(p.relative_to(SRC)) for p in _sources() if "pairwise" in p.read_text(encoding="utf-8")}
    assert mentions <= ALLOWED, sorted(mentions - ALLOWED)
    reads, getattrs = [], []
    for p in _sources():
        text = p.read_text(encoding="utf-8")
        getattrs += [f"{p.relative_to(SRC)}: {m.group(0)}" for m in re.finditer(r"getattr\([^)]*[\"']pairwise[\"']", text)]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Attribute) and node.attr == "pairwise" and p.relative_to(SRC).as_posix() != "methods/cma.py":
                reads.append(f"{p.relative_to(SRC)}:{node.lineno}")
    assert not getattrs, getattrs
    assert not reads, reads  # the model's ``pairwise`` attribute is cma's business (informational elsewhere)


def test_engine_runtime_retrieval_and_cli_know_no_particular_scoring():
    """They hold a model's ``scoring`` and call it: no scoring class or kind is named in their code, no
    model's ``similarity`` / ``gallery_cache`` is called (the index format reads legacy index.json files,
    whose ``pairwise: true`` meant cma's query score)."""
    layers = [SRC / "runtime.py", *(SRC / "engine").glob("*.py"), *(SRC / "retrieval").glob("*.py"), *(SRC / "cli").glob("*.py")]
    bad = []
    for p in layers:
        tree = ast.parse(p.read_text(encoding="utf-8"))
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body and isinstance(n.body[0], ast.Expr)}
        for n in ast.walk(tree):
            where = f"{p.relative_to(SRC)}:{getattr(n, 'lineno', 0)}"
            if isinstance(n, (ast.Name, ast.alias)) and (getattr(n, "id", None) or getattr(n, "name", None)) in ("FrameScoring", "QScore"):
                bad.append(f"{where}: names a scoring class")
            elif (isinstance(n, ast.Constant) and isinstance(n.value, str) and "qscore" in n.value and id(n) not in docs
                  and p.name != "format.py"):
                bad.append(f"{where}: names a scoring kind")
            elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("similarity", "gallery_cache")
                  and not (isinstance(n.func.value, ast.Name) and n.func.value.id == "self")):
                bad.append(f"{where}: calls a model's {n.func.attr}")
    assert not bad, bad


# ----------------------------------------------------------------------------------------------
# index.json: the scoring is recorded; an index.json of the previous format reads and ranks as before
# ----------------------------------------------------------------------------------------------
def test_an_index_json_without_scoring_opens_and_ranks_as_before(world, tmp_path):
    import torch

    import vop
    from vop.errors import DataError
    from vop.retrieval import Searcher, VideoIndex, build_index
    from vop.retrieval.format import StoredScoring

    queries = ["a red circle moves left", "the square turns blue", "x"]
    kinds = {"vop-f": StoredScoring("cosine", (64,), True), "cma": StoredScoring("qscore", (4, 64), False)}
    for method, stored in kinds.items():
        torch.manual_seed(0)
        ck = vop.save_checkpoint(vop.create_model(method, "tiny", frames=4), tmp_path / f"{method}.safetensors",
                                 extra={"backbone": "tiny"})
        ix = tmp_path / method
        build_index(world / "videos" / "test", ck, ix, image_size=32, progress=False)
        meta = json.loads((ix / "index.json").read_text())
        assert meta["scoring"] == {"kind": stored.kind, "row_shape": list(stored.row_shape), "ann": stored.ann}
        assert meta["pairwise"] is (method == "cma") and meta.get("frames_per_video") == (4 if method == "cma" else None)
        before = Searcher.open(ix).search(queries, k=16)
        # as the previous vop wrote it: no "scoring", the kind read from "pairwise" (+ "frames_per_video")
        (ix / "index.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "scoring"}))
        assert VideoIndex.open(ix).scoring == stored
        assert Searcher.open(ix).search(queries, k=16) == before
        # a damaged record is named, never guessed
        for change, field in ((lambda sc: sc.update(row_shape=[4, 63]), "scoring.row_shape"),
                              (lambda sc: sc.update(ann="yes"), "scoring.ann"),
                              (lambda sc: sc.update(kind=""), "scoring.kind")):
            sc = dict(meta["scoring"])
            change(sc)
            (ix / "index.json").write_text(json.dumps({**meta, "scoring": sc}))
            with pytest.raises(DataError, match=f"field '{field}' is .* the index is damaged: rebuild it: vop index"):
                VideoIndex.open(ix)
    # FAISS only where the scoring has one vector per video
    meta = json.loads((tmp_path / "cma" / "index.json").read_text())
    (tmp_path / "cma" / "index.json").write_text(json.dumps({**meta, "scoring": {"kind": "qscore", "row_shape": [4, 64],
                                                                                 "ann": True}}))
    with pytest.raises(DataError, match="field 'scoring.ann'"):
        VideoIndex.open(tmp_path / "cma")
