"""`import vop`, every method and a training step need only torch, numpy and safetensors (and pyyaml
and tqdm for the engine): the optional packages are imported where they are used, and using a
feature without its package raises one clear error naming it (issue 16: GPU images lack ftfy,
instant-clip-tokenizer and av). Each check runs in a fresh interpreter with the packages made
unimportable (``sys.modules[name] = None``), so what this process imported does not hide anything.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# every package that vop does not need for its models and training (tqdm and pyyaml are needed)
OPTIONAL = ["av", "ftfy", "instant_clip_tokenizer", "fastapi", "uvicorn", "starlette", "faiss", "pymilvus", "milvus_lite",
            "matplotlib", "tensorboard", "transformers", "typer", "rich", "click", "PIL"]


def _child(code: str, blocked: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    prelude = f"import sys\nfor _n in {blocked!r}:\n    sys.modules[_n] = None\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks"),
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


CHILD = """
    import torch

    import vop
    import vop.data, vop.engine, vop.engine.trainer, vop.retrieval, vop.retrieval.ann, vop.retrieval.web
    import _common as C, gpu_bench, port_baseline  # what benchmarks/gpu.sh runs
    from vop.engine.optim import param_groups
    from vop.engine.trainer import _step
    from vop.errors import ConfigError, MissingDependencyError, VopError

    torch.manual_seed(0)
    clip = vop.build_clip("tiny", seed=0)
    video = torch.randn(2, 4, 3, 32, 32)
    tokens = C.caption_tokens(2, 8)  # token ids: no tokenizer
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stepped = []
    for method in vop.list_methods():
        model = vop.create_model(method, clip, frames=4).train()
        v, t = model(video, tokens)
        # a pairwise model (cma's query score) returns the per-frame embeddings, scored by its similarity
        want = (2, 4, clip.cfg.embed_dim) if model.pairwise else (2, clip.cfg.embed_dim)
        assert v.shape == want and t.shape == (2, clip.cfg.embed_dim), (method, v.shape, t.shape)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            continue
        opt = torch.optim.AdamW(param_groups(model, 1e-3, 1e-5, 0.2))
        before = [p.detach().clone() for p in trainable]
        loss = _step(model, model, video, tokens, 1, None, torch.device("cpu"), scaler)
        opt.step()
        assert loss == loss and loss > 0, (method, loss)
        assert any(not torch.equal(b, p) for b, p in zip(before, trainable)), method
        stepped.append(method)
    assert len(stepped) == len(vop.list_methods()) - 1, stepped  # all but zero-shot train something

    def error_of(fn):
        try:
            fn()
        except Exception as e:
            return e
        raise AssertionError(f"{fn} raised nothing")

    # the tokenizer: a clear error naming the package, a VopError (the CLI prints one line) and an ImportError
    e = error_of(lambda: model.tokenizer()(["a dog jumps into a pool"]))
    assert isinstance(e, MissingDependencyError) and isinstance(e, VopError) and isinstance(e, ImportError), repr(e)
    assert "'ftfy'" in str(e) and "pip install ftfy instant-clip-tokenizer" in str(e) and "\\n" not in str(e), str(e)
    print("tokenizer:", e)
    if sys.argv[-1] == "have-ftfy":  # ftfy importable again: the BPE package is the next one named
        del sys.modules["ftfy"]
        e = error_of(lambda: vop.CLIPTokenizer()(["a dog"]))
        assert isinstance(e, MissingDependencyError) and "'instant-clip-tokenizer', which is not installed" in str(e), str(e)
        print("bpe:", e)
    # video decoding and writing
    e = error_of(lambda: vop.data.VideoReader("any.mp4"))
    assert isinstance(e, MissingDependencyError) and "'av'" in str(e) and "pip install av" in str(e), str(e)
    e = error_of(lambda: vop.data.synth.write_video("/nonexistent/x.mp4", torch.zeros(1, 8, 8, 3).numpy()))
    assert isinstance(e, MissingDependencyError) and "pip install av" in str(e), str(e)
    print("av:", e)
    # approximate search
    e = error_of(vop.retrieval.ann.require_faiss)
    assert isinstance(e, ConfigError) and "vop[index]" in str(e), str(e)
    # the benchmark's report of what it found
    opt = gpu_bench.optional_packages()
    assert opt["instant-clip-tokenizer"] is None and opt["av"] is None and "MissingDependencyError" in opt["tokenizer"], opt
    print("OK", len(stepped), "methods trained")
"""


def test_models_and_training_need_no_optional_package():
    import importlib.util

    have_ftfy = importlib.util.find_spec("ftfy") is not None
    proc = _child(CHILD.replace("sys.argv[-1]", repr("have-ftfy" if have_ftfy else "")), OPTIONAL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.rstrip().endswith("methods trained"), proc.stdout


def test_cli_prints_a_missing_package_as_one_line(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\0" * 64)
    proc = _child(f"""
        from vop.cli.main import main
        sys.exit(main(["data", "info", {str(video)!r}]))
    """, ["av"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pip install av" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
