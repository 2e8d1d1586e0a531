"""Helpers shared by the benchmark scripts: machine metadata, timing, JSON, the Markdown report.

Every script writes its raw numbers as JSON (default under ``docs/bench/``) and replaces its own
block of ``docs/benchmarks.md``, delimited by ``<!-- BEGIN bench:NAME -->`` / ``<!-- END bench:NAME -->``
(the block is appended at the end if the markers are missing). The prose around the blocks is
written by hand; only the tables are generated.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
BENCH_DIR = ROOT / "docs" / "bench"
SOT, EOT = 49406, 49407  # CLIP's [SOT] / [EOT] ids (tokenizer-free captions)

if str(ROOT / "src") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))


# -------------------------------------------------------------------------------------------------
# machine and versions
# -------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or None
    except Exception:
        return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_meta(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    import torch

    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git": git_revision(),
        "loadavg_start": loadavg(),
    }
    try:
        import vop

        meta["vop"] = vop.__version__
    except Exception:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
    return meta


def describe(meta: dict[str, Any]) -> str:
    """One line: date, machine, versions (for the Markdown blocks)."""
    n = meta.get("threads")
    dev = meta.get("gpu") or f"{meta.get('cpus')}-core CPU ({meta.get('cpu')}), {n} torch thread{'' if n == 1 else 's'}"
    load = meta.get("loadavg_start")
    extra = f", load average at start {load[0]:.2f}" if load else ""
    return (f"{meta['date'][:10]}, {dev}, torch {meta['torch']}, Python {meta['python']}, "
            f"vop {meta.get('vop', '?')} (git {meta.get('git') or '?'}){extra}")


# -------------------------------------------------------------------------------------------------
# inputs
# -------------------------------------------------------------------------------------------------
def caption_tokens(batch: int, length: int = 32, seed: int = 0):
    """(batch, length) token ids shaped like tokenised captions: [SOT], words, [EOT], no padding.

    Tokenizer-free so the benchmarks run where ftfy / instant-clip-tokenizer are missing; the cost of
    the text tower depends only on the length. ``length`` includes [SOT] and [EOT].
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 40000, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = SOT, EOT
    return ids


# -------------------------------------------------------------------------------------------------
# timing
# -------------------------------------------------------------------------------------------------
def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def time_calls(fns: dict[Any, Callable[[], Any]], repeats: int, warmup: int = 1,
               sync: Callable[[], None] = lambda: None) -> dict[Any, dict[str, list[float]]]:
    """Time several callables interleaved (A B C A B C ...) so that background load hits all alike.

    Returns, for each, the ``wall`` times and the ``cpu`` times (``time.process_time``: CPU seconds of
    this process, all threads) of the ``repeats`` calls after ``warmup`` untimed rounds.
    """
    out: dict[Any, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            sync()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            sync()
            t1, c1 = time.perf_counter(), time.process_time()
            if r >= warmup:
                out[k]["wall"].append(t1 - t0)
                out[k]["cpu"].append(c1 - c0)
    return out


def pick(t: dict[Any, dict[str, list[float]]], clock: str) -> dict[Any, list[float]]:
    """The ``clock`` ("wall" or "cpu") times of a ``time_calls`` result."""
    return {k: v[clock] for k, v in t.items()}


def add_timing_args(p) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: %(default)s; 0: torch's default)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="time used for the reported times and ratios: cpu = CPU seconds of the process "
                        "(robust to other jobs on a shared machine), wall = elapsed (default: %(default)s)")


def set_threads(n: int) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


# -------------------------------------------------------------------------------------------------
# output
# -------------------------------------------------------------------------------------------------
def write_json(path: str | os.PathLike | None, data: dict[str, Any]) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def update_doc(doc: str | os.PathLike | None, name: str, markdown: str) -> None:
    """Replace the block ``name`` of the Markdown file ``doc`` (append it if absent)."""
    if not doc:
        return
    doc = Path(doc)
    begin, end = f"<!-- BEGIN bench:{name} -->", f"<!-- END bench:{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    print(f"updated {doc} [{name}]")


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def human_bytes(n: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}" if n < 100 * k else f"{n / k:.0f} {unit}"
    return f"{int(n)} B"


def add_common_args(p, name: str) -> None:
    """--json / --doc / --no-doc with defaults that reproduce the committed docs."""
    p.add_argument("--json", default=str(BENCH_DIR / f"{name}.json"),
                   help="write the raw results here (default: %(default)s)")
    p.add_argument("--doc", default=str(DOC), help="Markdown file whose block is replaced (default: %(default)s)")
    p.add_argument("--no-doc", action="store_true", help="do not touch the Markdown file")


# -------------------------------------------------------------------------------------------------
# FLOPs
# -------------------------------------------------------------------------------------------------
def flop_counter():
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts PyTorch's fused CPU attention.

    FlopCounterMode knows the CUDA attention kernels (flash, memory-efficient, cuDNN) but not
    ``_scaled_dot_product_flash_attention_for_cpu`` (it counts 0 for it); the same formulas are mapped to
    the CPU kernel here. Attention backward is counted as those formulas do (the scores are recomputed).
    Causal masks are not discounted.
    """
    import torch
    from torch.utils import flop_counter as fcm

    aten = torch.ops.aten
    mapping = {}
    fwd_count = getattr(fcm, "sdpa_flop_count", None)
    bwd_count = getattr(fcm, "sdpa_backward_flop_count", None)
    if fwd_count is not None and hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *a, out_shape=None, **kw: fwd_count(q, k, v))
    if bwd_count is not None and hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda g, q, k, v, *a, out_shape=None, **kw: bwd_count(g, q, k, v))
    return fcm.FlopCounterMode(display=False, custom_mapping=mapping)


def layer_flops(width: int, tokens: int, sequences: int, mlp_ratio: float = 4.0) -> dict[str, float]:
    """Forward FLOPs (2 per multiply-add) of one pre-LN transformer block on ``sequences`` x ``tokens``.

    Projections: qkv 3d^2 + out d^2 + MLP 2 r d^2 multiply-adds per token; attention: QK^T and AV,
    2 T^2 d multiply-adds per sequence. Norms, softmax, activations and residuals are ignored.
    """
    linear = 2 * sequences * tokens * (4 + 2 * mlp_ratio) * width**2
    attention = 2 * 2 * sequences * tokens**2 * width
    return {"linear": linear, "attention": attention, "total": linear + attention}


def finish(args, name: str, markdown: str) -> None:
    """Update the script's block of the docs and, for the committed docs, the summary table."""
    if getattr(args, "no_doc", False) or not args.doc:
        return
    update_doc(args.doc, name, markdown)
    if Path(args.doc).resolve() == DOC.resolve() and args.json and Path(args.json).resolve().parent == BENCH_DIR.resolve():
        import summary

        summary.update(args.doc)
