"""GPU benchmark of training and encoding, one command, everything into one folder.

Run through ``bash benchmarks/gpu.sh OUTDIR`` (which also saves ``nvidia-smi`` and the log), or
directly: ``python benchmarks/gpu_bench.py --out OUTDIR``. Defaults: ViT-B/32 (random weights; the
cost does not depend on the values), 224 px, 12 frames, 32-token captions, batch 32, bf16 autocast
with float32 weights and AdamW (as mixed-precision training does), TF32 allowed for float32 matmuls.

Sections, in order of priority (each is guarded: an exception, out-of-memory included, becomes an
``{"error": ...}`` entry and the run goes on; a section that would not fit the time budget becomes
``{"skipped": ...}``; the JSON is rewritten after every entry, so a killed run keeps what it measured):

1. ``device``: nvidia-smi, torch/CUDA versions, the device name and the peak dense bf16 FLOP/s used
   for MFU (see ``PEAK_BF16_TFLOPS``), and a measured 8192^3 bf16 matmul rate for reference.
2. ``train``: for ``full``, ``vop``, ``vop-f``, ``vop-fc`` at batch 32: median step time (forward,
   symmetric InfoNCE, backward, AdamW), peak memory (``torch.cuda.max_memory_allocated``: weights,
   gradients, optimiser state, activations), videos/s, FLOPs of one step counted by
   ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward as executed: a frozen backbone
   computes no weight gradients), achieved TFLOP/s and MFU = FLOPs / step time / peak.
3. ``port``: our ``vop`` against the port-style reimplementation (``port_baseline.py``: sequence-first
   layout, ``nn.MultiheadAttention`` or explicit softmax(QK^T)V, per-frame ``repeat`` + ``cat``),
   same weights and batch; outputs are checked to agree first (float32, TF32 off).
4. ``encode``: image-tower frames/s (no grad) and ``encode_video`` of ``zeroshot``, ``vop``, ``vop-f``, ``lora``
   (merged), ``tempme``.
5. ``hf``: our towers against Hugging Face ``CLIPModel`` (SDPA), forward, same weights (if
   ``transformers`` is importable).
6. ``max_batch``: for each training method, the batch doubled from 64 until it runs out of memory
   (or ``--max-batch``); the largest that fits, with its step time, videos/s and MFU (FLOPs scaled
   from batch 32: every cost is per video except the B x B logits).
7. ``backbones``: the backbones beyond CLIP against ViT-B/16 (``--backbones``, the first is the baseline;
   tiny: tiny, eva02-tiny, pe-core-tiny): image-tower frames/s of zero-shot ``encode_frames`` and a basic-VoP
   training step at the batch, each at its native size (PE-Core: 32-token context, 24-token captions).

CPU smoke test (what tests/test_benchmarks.py runs): ``--device cpu --tiny``.

    python benchmarks/gpu_bench.py --out /tmp/gpu            # on a GPU machine (~5 min)
    python benchmarks/gpu_bench.py --device cpu --tiny --out /tmp/gpu-smoke
    python benchmarks/gpu_bench.py --render OUTDIR/gpu_bench.json    # put its tables into docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

#: Peak dense (no sparsity) bf16 tensor-core TFLOP/s from NVIDIA's data sheets, matched against
#: ``torch.cuda.get_device_name()`` in this order (first match wins).
PEAK_BF16_TFLOPS: list[tuple[str, float, str]] = [
    ("H100 PCIe", 756.0, "H100 PCIe data sheet"),
    ("H100 NVL", 835.0, "H100 NVL data sheet"),
    ("GH200", 989.0, "GH200 (H100 SXM-class) data sheet"),
    ("H200", 989.0, "H200 data sheet (same tensor cores as H100 SXM)"),
    ("H100", 989.0, "H100 SXM data sheet (names like 'NVIDIA H100 80GB HBM3')"),
    ("H800", 989.0, "H800 SXM data sheet"),
    ("A100", 312.0, "A100 data sheet"),
    ("L40S", 362.0, "L40S data sheet"),
]
TRAIN_METHODS = "full,vop,vop-f,vop-fc,dgl,dgl-l,mv-adapter,cma,lora,tempme"


def peak_tflops(name: str) -> tuple[float | None, str]:
    for key, value, source in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value, source
    return None, f"unknown device {name!r}: pass --peak-tflops for MFU"


def optional_packages() -> dict[str, Any]:
    """What the run found of the packages it does not need (``import vop`` and the models need only
    torch, numpy and safetensors; captions here are token ids, no tokenizer): their versions, and
    whether CLIP's tokenizer works (it does where benchmarks/device_prep.sh's wheels were installed)."""
    from importlib import metadata

    found: dict[str, Any] = {}
    for module, dist in (("ftfy", "ftfy"), ("instant_clip_tokenizer", "instant-clip-tokenizer"), ("av", "av"),
                         ("transformers", "transformers")):
        try:
            found[dist] = metadata.version(dist) if importlib.util.find_spec(module) else None
        except (ImportError, ValueError, metadata.PackageNotFoundError):
            found[dist] = None
    try:
        import vop

        ids = vop.CLIPTokenizer(8)(["A dog jumps into a pool"])[0].tolist()
        found["tokenizer"] = f"ok: {ids}"
    except Exception as e:  # noqa: BLE001 - reported, never fatal
        found["tokenizer"] = f"{type(e).__name__}: {e}"
    return found


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.total = time.monotonic(), seconds

    def left(self) -> float:
        return self.total - (time.monotonic() - self.t0)


class Run:
    """Holds the results, guards each measurement, rewrites the JSON after each entry."""

    def __init__(self, out: Path, budget: Budget, device):
        self.out, self.budget, self.device = out, budget, device
        self.data: dict[str, Any] = {"sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        path = self.out / "gpu_bench.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, path)

    def cleanup(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def guard(self, section: str, key: str, fn: Callable[[], Any], need_s: float = 0.0) -> Any:
        entry: Any
        left = self.budget.left()
        if left < need_s:
            entry = {"skipped": f"time budget: {left:.0f} s left, this needs about {need_s:.0f} s"}
        else:
            t0 = time.monotonic()
            try:
                entry = fn()
            except Exception as e:  # noqa: BLE001 - every failure becomes an entry, the run goes on
                entry = {"error": f"{type(e).__name__}: {str(e)[:1500]}", "traceback": traceback.format_exc()[-4000:]}
            if isinstance(entry, dict):
                entry.setdefault("wall_s", round(time.monotonic() - t0, 2))
        self.cleanup()
        self.data["sections"].setdefault(section, {})[key] = entry
        self.save()
        status = "ok"
        if isinstance(entry, dict) and "error" in entry:
            status = "FAILED: " + entry["error"].splitlines()[0][:300]
        elif isinstance(entry, dict) and "skipped" in entry:
            status = "skipped: " + str(entry["skipped"])
        print(f"[{section}] {key}: {status} ({self.budget.left():.0f} s left)", flush=True)
        return entry


# -------------------------------------------------------------------------------------------------
# measurements
# -------------------------------------------------------------------------------------------------
class Ctx:
    def __init__(self, args):
        import torch

        self.args, self.torch = args, torch
        self.device = torch.device(args.device)
        self.amp = args.amp == "bf16"
        self.clip = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        return self.torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None

    def autocast(self):
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.amp)

    def inputs(self, batch: int):
        a = self.args
        video = self.torch.randn(batch, a.frames, 3, a.image_size, a.image_size, device=self.device)
        return video, C.caption_tokens(batch, a.words).to(self.device)


def train_step_fn(ctx: Ctx, model, video, tokens):
    torch = ctx.torch
    import torch.nn.functional as F

    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-5)
    labels = torch.arange(video.shape[0], device=video.device)

    def step():
        with ctx.autocast():
            v, t = model(video, tokens)
            # a pairwise method (cma) scores raw frames with its own similarity
            logits = model.logit_scale * (model.similarity(t, v) if getattr(model, "pairwise", False) else t @ v.t())
            loss = (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.float().t(), labels)) / 2
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(ctx: Ctx, step: Callable[[], None], steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    ctx.sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        ctx.sync()
        times.append(time.perf_counter() - t0)
    return times


def count_flops(step: Callable[[], None]) -> int:
    with C.flop_counter() as fc:
        step()
    return int(fc.get_total_flops())


def train_entry(ctx: Ctx, method: str, batch: int, steps: int, warmup: int, flops: bool = True) -> dict:
    import vop

    a = ctx.args
    ctx.reset_peak()
    model = vop.create_model(method, ctx.clip, frames=a.frames).train()
    video, tokens = ctx.inputs(batch)
    step = train_step_fn(ctx, model, video, tokens)
    times = time_steps(ctx, step, steps, warmup)
    r: dict[str, Any] = {"method": method, "batch": batch, "step_s": C.median(times), "step_s_all": times,
                         "peak_bytes": ctx.peak(), "trainable": model.parameter_counts()["trainable"]}
    r["videos_per_s"] = batch / r["step_s"]
    r["frames_per_s"] = batch * a.frames / r["step_s"]
    if flops:
        r["flops"] = count_flops(step)
        # forward FLOPs do not depend on grad mode; counted with grad enabled because FlopCounterMode's
        # module tracker rejects no-grad views of parameters (a module returning expanded prompt tokens)
        with ctx.autocast():
            r["flops_forward"] = count_flops(lambda: model(video, tokens))
        r.update(mfu_fields(ctx, r["flops"], r["step_s"]))
    return r


def mfu_fields(ctx: Ctx, flops: float, step_s: float) -> dict:
    achieved = flops / step_s / 1e12
    peak = ctx.args.peak_tflops
    return {"tflops_achieved": achieved, "mfu": achieved / peak if peak else None}


def device_entry(ctx: Ctx) -> dict:
    torch = ctx.torch
    d: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                         "cuda_available": torch.cuda.is_available(), "optional": optional_packages(),
                         "python": sys.version.split()[0], "device": str(ctx.device)}
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        d["nvidia_smi"] = (smi.stdout or smi.stderr)[:4000]
    except Exception as e:  # noqa: BLE001
        d["nvidia_smi"] = f"not available: {type(e).__name__}: {e}"
    if ctx.device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
        p = torch.cuda.get_device_properties(ctx.device)
        d.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_bytes=p.total_memory,
                 multiprocessors=p.multi_processor_count, cudnn=torch.backends.cudnn.version())
        if ctx.args.peak_tflops is None:
            ctx.args.peak_tflops, d["peak_source"] = peak_tflops(p.name)
        else:
            d["peak_source"] = "--peak-tflops"
        n = 8192 if not ctx.args.tiny else 1024
        x = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
        for _ in range(3):
            x @ x
        ctx.sync()
        t0 = time.perf_counter()
        for _ in range(10):
            x @ x
        ctx.sync()
        d["matmul_bf16_tflops"] = 10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12
    else:
        d.update(name=C.cpu_model(), cpus=os.cpu_count(), threads=torch.get_num_threads(),
                 peak_source="--peak-tflops" if ctx.args.peak_tflops else "none on CPU (MFU not computed)")
    d["peak_bf16_tflops"] = ctx.args.peak_tflops
    return d


def port_entry(ctx: Ctx) -> dict:
    import port_baseline as P

    import vop

    torch, a = ctx.torch, ctx.args
    ours = vop.create_model("vop", ctx.clip, frames=a.frames).train()
    ports = {f"port-{k}": P.PortVoP(ours, k).train() for k in ("mha", "math")}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        small_v, small_t = ctx.inputs(2)
        agreement = {k: P.check_agreement(ours, m, small_v, small_t) for k, m in ports.items()}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    video, tokens = ctx.inputs(a.batch)
    impls = {"ours": ours, **ports}
    steps = {k: train_step_fn(ctx, m, video, tokens) for k, m in impls.items()}
    peaks = {}
    for k, s in steps.items():  # warm-up, and each one's peak memory on its own
        ctx.reset_peak()
        s()
        s()
        ctx.sync()
        peaks[k] = ctx.peak()
    t = C.pick(C.time_calls(steps, a.steps, warmup=0, sync=ctx.sync), "wall")
    rows = {k: {"step_s": C.median(v), "step_s_all": v, "peak_bytes": peaks[k],
                "port_over_ours": C.median(v) / C.median(t["ours"])} for k, v in t.items()}
    return {"batch": a.batch, "agreement": agreement, "results": rows}


def encode_entry(ctx: Ctx) -> dict:
    import vop

    torch, a = ctx.torch, ctx.args
    out: dict[str, Any] = {"image_tower": [], "encode_video": []}
    for n in (a.batch * a.frames, 4 * a.batch * a.frames):
        images = torch.randn(n, 3, a.image_size, a.image_size, device=ctx.device)
        with torch.inference_mode(), ctx.autocast():
            t = C.time_calls({"x": lambda: ctx.clip.encode_image(images)}, a.steps, warmup=2, sync=ctx.sync)["x"]["wall"]
        out["image_tower"].append({"frames": n, "s": C.median(t), "frames_per_s": n / C.median(t)})
        del images
    video, _ = ctx.inputs(a.batch)
    # lora and tempme in eval mode: their updates merged into copies of the weights (lora: CLIP's own computation)
    models = {m: vop.create_model(m, ctx.clip, frames=a.frames).eval() for m in ("zeroshot", "vop", "vop-f", "lora", "tempme")}
    with torch.inference_mode(), ctx.autocast():
        t = C.pick(C.time_calls({m: (lambda mm=mm: mm.encode_video(video)) for m, mm in models.items()}, a.steps,
                                warmup=2, sync=ctx.sync), "wall")
    for m in models:
        out["encode_video"].append({"method": m, "batch": a.batch, "s": C.median(t[m]),
                                    "videos_per_s": a.batch / C.median(t[m]),
                                    "time_vs_vop": C.median(t[m]) / C.median(t["vop"])})
    return out


def backbone_entry(ctx: Ctx, arch: str) -> dict:
    """Zero-shot image-tower throughput and a basic-VoP training step of ``arch`` at the run's batch and frames."""
    import vop

    torch, a = ctx.torch, ctx.args
    clip = vop.build_clip(arch, seed=0).to(ctx.device)
    size = clip.cfg.vision.image_size
    video = torch.randn(a.batch, a.frames, 3, size, size, device=ctx.device)
    zs = vop.create_model("zeroshot", clip, frames=a.frames).eval()
    with torch.inference_mode(), ctx.autocast():
        t = C.time_calls({"x": lambda: zs.encode_frames(video)}, a.steps, warmup=2, sync=ctx.sync)["x"]["wall"]
    ctx.reset_peak()
    model = vop.create_model("vop", clip, frames=a.frames).train()
    # a text tower read at its last position (SigLIP) always runs on its whole context; ids inside the vocabulary
    length = model.max_text_tokens if clip.cfg.text.pool == "last" else min(a.words, model.max_text_tokens)
    tokens = (C.caption_tokens(a.batch, length) % clip.cfg.text.vocab_size).to(ctx.device)
    step = train_step_fn(ctx, model, video, tokens)
    times = time_steps(ctx, step, a.steps, a.warmup)
    return {"arch": arch, "image_size": size, "frames_per_s": a.batch * a.frames / C.median(t), "step_s": C.median(times),
            "step_s_all": times, "peak_bytes": ctx.peak(), "text_tokens": int(tokens.shape[1]),
            "backbone": sum(p.numel() for p in clip.parameters())}


def hf_entry(ctx: Ctx) -> dict:
    import bench_hf
    from transformers import CLIPModel

    import vop

    torch, a = ctx.torch, ctx.args
    hf = CLIPModel._from_config(bench_hf.hf_config(a.tiny), attn_implementation="sdpa").eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = vop.load_clip(tmp).eval().to(ctx.device)
    hf = hf.to(ctx.device)
    size = ours.cfg.vision.image_size
    images = torch.randn(a.batch * a.frames, 3, size, size, device=ctx.device)
    tokens = C.caption_tokens(a.batch, a.words).to(ctx.device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            ri = bench_hf._features(hf.get_image_features(pixel_values=images[:8]))
            rt = bench_hf._features(hf.get_text_features(input_ids=tokens[:8]))
            err = {"image_max_abs": (ours.encode_image(images[:8]) - ri).abs().max().item(),
                   "text_max_abs": (ours.encode_text(tokens[:8]) - rt).abs().max().item()}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    if max(err.values()) > 1e-3:
        raise AssertionError(f"outputs differ from Hugging Face's: {err}")
    fns = {("image", "ours"): lambda: ours.encode_image(images),
           ("image", "hf"): lambda: hf.get_image_features(pixel_values=images),
           ("text", "ours"): lambda: ours.encode_text(tokens),
           ("text", "hf"): lambda: hf.get_text_features(input_ids=tokens)}
    with torch.inference_mode(), ctx.autocast():
        t = C.pick(C.time_calls(fns, a.steps, warmup=2, sync=ctx.sync), "wall")
    rows = {tw: {"ours_s": C.median(t[(tw, "ours")]), "hf_s": C.median(t[(tw, "hf")]),
                 "ratio": C.median(t[(tw, "ours")]) / C.median(t[(tw, "hf")])} for tw in ("image", "text")}
    return {"agreement_fp32": err, "frames": images.shape[0], "captions": tokens.shape[0], "results": rows}


def max_batch_entry(ctx: Ctx, run: Run, method: str, flops_per_video: float | None) -> dict:
    torch, a = ctx.torch, ctx.args
    tries: list[dict] = []
    best = None
    b = a.batch * 2
    while b <= a.max_batch:
        if run.budget.left() < a.min_left_per_try:
            tries.append({"batch": b, "skipped": "time budget"})
            break
        try:
            r = train_entry(ctx, method, b, steps=3, warmup=1, flops=False)
            if flops_per_video:
                r["flops"] = flops_per_video * b
                r.update(mfu_fields(ctx, r["flops"], r["step_s"]))
            tries.append({"batch": b, "ok": True, "step_s": r["step_s"]})
            best = r
        except Exception as e:  # noqa: BLE001
            msg = str(e)
            if not (isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in msg.lower() or "ALLOC_FAILED" in msg):
                raise
            tries.append({"batch": b, "ok": False, "oom": msg.splitlines()[0][:300] if msg else type(e).__name__})
            break
        finally:
            run.cleanup()
        b *= 2
    return {"method": method, "tries": tries, "largest": best,
            "note": None if b <= a.max_batch else f"stopped at --max-batch {a.max_batch} without running out of memory"}


# -------------------------------------------------------------------------------------------------
# report
# -------------------------------------------------------------------------------------------------
def _fmt_mem(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def _fmt_mfu(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render(data: dict) -> str:
    """Markdown tables of a gpu_bench.json (errors and skips shown as such)."""
    S = data.get("sections", {})
    meta = data.get("meta", {})
    dev = S.get("device", {}).get("info", {})
    mm = dev.get("matmul_bf16_tflops")
    L = [f"Measured {meta.get('date', '?')[:10]} on {dev.get('name', '?')} "
         f"(peak bf16 {dev.get('peak_bf16_tflops') or '-'} TFLOP/s: {dev.get('peak_source', '?')}; measured "
         f"bf16 matmul {f'{mm:.0f}' if mm else '-'} TFLOP/s), torch {dev.get('torch')}, CUDA "
         f"{dev.get('cuda')}; {meta.get('arch')} at {meta.get('image_size')} px, {meta.get('frames')} frames, "
         f"{meta.get('words')}-token captions, {meta.get('amp')} autocast, median of {meta.get('steps')} steps. "
         f"`bash benchmarks/gpu.sh OUTDIR` (git {meta.get('git') or '?'}).", ""]

    def bad(e) -> str | None:
        if not isinstance(e, dict):
            return "missing"
        if "error" in e:
            return "error: " + e["error"].splitlines()[0][:200]
        if "skipped" in e:
            return "skipped: " + e["skipped"]
        return None

    train = S.get("train", {})
    L += [f"Training step, batch {meta.get('batch')}:", "",
          "| method | step (ms) | time / full | peak memory (GiB) | memory / full | videos/s | GFLOP/step | TFLOP/s | MFU |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    full = train.get("full") if not bad(train.get("full")) else None
    for m, r in train.items():
        if bad(r):
            L.append(f"| `{m}` | {bad(r)} | | | | | | | |")
            continue
        tr = f"{r['step_s'] / full['step_s']:.2f}" if full else "-"
        mr = f"{r['peak_bytes'] / full['peak_bytes']:.2f}" if full and r.get("peak_bytes") and full.get("peak_bytes") else "-"
        L.append(f"| `{m}` | {r['step_s'] * 1e3:.1f} | {tr} | {_fmt_mem(r.get('peak_bytes'))} | {mr} | "
                 f"{r['videos_per_s']:.1f} | {r.get('flops', 0) / 1e9:,.1f} | {r.get('tflops_achieved', 0):.1f} | "
                 f"{_fmt_mfu(r.get('mfu'))} |")
    port = S.get("port", {}).get("vop")
    L += ["", "Our `vop` against the port-style baseline (same weights, batch, prompts):", ""]
    if bad(port):
        L.append(f"- {bad(port)}")
    else:
        L += ["| implementation | step (ms) | peak memory (GiB) | time / ours |", "| --- | ---: | ---: | ---: |"]
        L += [f"| {k} | {r['step_s'] * 1e3:.1f} | {_fmt_mem(r.get('peak_bytes'))} | {r['port_over_ours']:.2f} |"
              for k, r in port["results"].items()]
    enc = S.get("encode", {}).get("throughput")
    L += ["", "Encoding (no grad):", ""]
    if bad(enc):
        L.append(f"- {bad(enc)}")
    else:
        L += ["| what | batch | time (ms) | throughput | time / vop |", "| --- | ---: | ---: | ---: | ---: |"]
        L += [f"| image tower | {r['frames']} frames | {r['s'] * 1e3:.1f} | {r['frames_per_s']:,.0f} frames/s | |"
              for r in enc["image_tower"]]
        L += [f"| encode_video `{r['method']}` | {r['batch']} videos | {r['s'] * 1e3:.1f} | {r['videos_per_s']:,.1f} videos/s "
              f"| {r['time_vs_vop']:.2f} |" for r in enc["encode_video"]]
    hf = S.get("hf", {}).get("forward")
    L += ["", "Our towers against Hugging Face `CLIPModel` (SDPA), forward:", ""]
    if bad(hf):
        L.append(f"- {bad(hf)}")
    else:
        L += ["| tower | ours (ms) | HF (ms) | ours / HF |", "| --- | ---: | ---: | ---: |"]
        L += [f"| {k} | {r['ours_s'] * 1e3:.1f} | {r['hf_s'] * 1e3:.1f} | {r['ratio']:.2f} |" for k, r in hf["results"].items()]
    mb = S.get("max_batch", {})
    L += ["", f"Largest batch (doubling from {2 * (meta.get('batch') or 0)} until out of memory):", "",
          "| method | largest batch | tries | step (ms) | peak memory (GiB) | videos/s | MFU |",
          "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for m, r in mb.items():
        if bad(r):
            L.append(f"| `{m}` | {bad(r)} | | | | | |")
            continue
        tries = ", ".join(f"{t['batch']}:{'ok' if t.get('ok') else ('OOM' if 'oom' in t else 'skip')}" for t in r["tries"])
        b = r.get("largest")
        if b is None:
            L.append(f"| `{m}` | - | {tries} | | | | |")
        else:
            L.append(f"| `{m}` | {b['batch']} | {tries} | {b['step_s'] * 1e3:.1f} | {_fmt_mem(b.get('peak_bytes'))} | "
                     f"{b['videos_per_s']:.1f} | {_fmt_mfu(b.get('mfu'))} |")
    bb = S.get("backbones", {})
    if bb:
        names = list(bb)
        base = bb[names[0]] if not bad(bb[names[0]]) else None
        L += ["", f"Backbones beyond CLIP against {names[0]} (zero-shot image tower; basic-VoP step, batch "
              f"{meta.get('batch')}; each at its native size):", "",
              "| backbone | parameters | image tower (frames/s) | x baseline | VoP step (ms) | x baseline | peak memory (GiB) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for k, r in bb.items():
            if bad(r):
                L.append(f"| `{k}` | {bad(r)} | | | | | |")
                continue
            xi = f"{r['frames_per_s'] / base['frames_per_s']:.2f}" if base else "-"
            xs = f"{r['step_s'] / base['step_s']:.2f}" if base else "-"
            L.append(f"| `{k}` | {r['backbone']:,} | {r['frames_per_s']:,.0f} | {xi} | {r['step_s'] * 1e3:.1f} | {xs} | "
                     f"{_fmt_mem(r.get('peak_bytes'))} |")
    targets = data.get("targets")
    if targets:
        L += ["", "Targets: " + "; ".join(f"{k} = {v['value']:.2f} (target {v['target']}: {'met' if v['met'] else 'missed'})"
                                          if v.get("value") is not None else f"{k}: not measured"
                                          for k, v in targets.items()) + "."]
    return "\n".join(L)


def targets(data: dict) -> dict:
    S = data["sections"]
    tr = S.get("train", {})

    def ok(e):
        return isinstance(e, dict) and "error" not in e and "skipped" not in e

    out: dict[str, dict] = {}
    full, v, vf = tr.get("full"), tr.get("vop"), tr.get("vop-f")
    if ok(full) and ok(v):
        out["vop_time_vs_full"] = {"value": v["step_s"] / full["step_s"], "target": "<= 0.85"}
        out["vop_time_vs_full"]["met"] = out["vop_time_vs_full"]["value"] <= 0.85
        if v.get("peak_bytes") and full.get("peak_bytes"):
            val = v["peak_bytes"] / full["peak_bytes"]
            out["vop_memory_vs_full"] = {"value": val, "target": "<= 0.6", "met": val <= 0.6}
    if ok(v) and ok(vf):
        val = vf["step_s"] / v["step_s"]
        out["vop_f_time_vs_vop"] = {"value": val, "target": "<= 1.3", "met": val <= 1.3}
    port = S.get("port", {}).get("vop")
    if ok(port):
        for k in ("port-mha", "port-math"):
            val = port["results"][k]["port_over_ours"]
            out[f"{k}_over_ours"] = {"value": val, "target": ">= 1.5", "met": val >= 1.5}
    if ok(v) and v.get("mfu") is not None:
        out["vop_mfu"] = {"value": v["mfu"], "target": ">= 0.40", "met": v["mfu"] >= 0.40}
    return out


# -------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-bench-out", help="output folder (default: $OUT or %(default)s)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes (CPU smoke test)")
    p.add_argument("--arch", default=None, help="default ViT-B-32 (tiny: tiny)")
    p.add_argument("--methods", default=TRAIN_METHODS, help="training methods (default: %(default)s)")
    p.add_argument("--batch", type=int, default=None, help="videos per step (default 32; tiny 2)")
    p.add_argument("--frames", type=int, default=None, help="default 12 (tiny 4)")
    p.add_argument("--image-size", type=int, default=None, help="default: the architecture's")
    p.add_argument("--words", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; tiny 1)")
    p.add_argument("--max-batch", type=int, default=None, help="stop doubling here (default 4096; tiny 8)")
    p.add_argument("--max-batch-methods", default=None, help="methods for the largest-batch search "
                   "(default: --methods; tiny: full,vop)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default: %(default)s)")
    p.add_argument("--amp", choices=("bf16", "none"), default=None, help="default bf16 on CUDA, none on CPU")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (default: from the device name)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 420; tiny 60)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: port,encode,hf,max_batch,backbones")
    p.add_argument("--backbones", default=None, help="architectures of the backbones section, the first the "
                   "baseline (default: ViT-B-16,EVA02-B-16,PE-Core-B-16,ViT-B-16-SigLIP2; tiny: tiny,eva02-tiny,pe-core-tiny,"
                   "siglip-tiny)")
    p.add_argument("--render", default=None, metavar="JSON", help="only render a gpu_bench.json into --doc and exit")
    p.add_argument("--doc", default=str(C.DOC), help="with --render: Markdown file to update (default: %(default)s)")
    args = p.parse_args()
    if args.render:
        data = json.loads(Path(args.render).read_text())
        C.update_doc(args.doc, "gpu", render(data))
        if Path(args.doc).resolve() == C.DOC.resolve():  # keep the numbers beside the docs, for the summary
            C.write_json(C.BENCH_DIR / "gpu.json", data)
            import summary

            summary.update(args.doc)
        return

    tiny = args.tiny
    for k, big, small in (("arch", "ViT-B/32", "tiny"), ("batch", 32, 2), ("frames", 12, 4), ("steps", 10, 2),
                          ("warmup", 3, 1), ("max_batch", 4096, 8), ("budget", 420.0, 60.0)):
        if getattr(args, k) is None:
            setattr(args, k, small if tiny else big)
    if args.amp is None:
        args.amp = "bf16" if args.device.startswith("cuda") else "none"
    if args.max_batch_methods is None:
        args.max_batch_methods = "full,vop" if tiny else args.methods
    args.min_left_per_try = 5.0 if tiny else 30.0

    import torch

    import vop

    budget = Budget(args.budget)
    ctx = Ctx(args)
    if ctx.device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    run = Run(Path(args.out), budget, ctx.device)
    run.data["meta"] = {**C.machine_meta(str(ctx.device)), "arch": args.arch, "batch": args.batch,
                        "frames": args.frames, "words": args.words, "steps": args.steps, "warmup": args.warmup,
                        "amp": args.amp, "budget_s": args.budget, "argv": sys.argv[1:]}
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    info = run.guard("device", "info", lambda: device_entry(ctx))
    if "error" in info:
        print("device check failed; nothing else can run", file=sys.stderr)
        sys.exit(1)
    if args.image_size is None:
        args.image_size = vop.get_arch(args.arch).vision.image_size
    run.data["meta"]["image_size"] = args.image_size
    torch.manual_seed(0)
    ctx.clip = vop.build_clip(args.arch, seed=0).to(ctx.device)
    skip = set(filter(None, args.skip.split(",")))
    methods = args.methods.split(",")

    per_method_s = 6.0 if tiny else 25.0
    for m in methods:
        run.guard("train", m, lambda m=m: train_entry(ctx, m, args.batch, args.steps, args.warmup), need_s=per_method_s)
    if "port" not in skip:
        run.guard("port", "vop", lambda: port_entry(ctx), need_s=per_method_s * 2)
    if "encode" not in skip:
        run.guard("encode", "throughput", lambda: encode_entry(ctx), need_s=per_method_s)
    if "hf" not in skip:
        if importlib.util.find_spec("transformers") is None:
            run.guard("hf", "forward", lambda: {"skipped": "transformers is not installed"})
        else:
            run.guard("hf", "forward", lambda: hf_entry(ctx), need_s=per_method_s * 1.5)
    if "max_batch" not in skip:
        for m in args.max_batch_methods.split(","):
            r = run.data["sections"].get("train", {}).get(m, {})
            fpv = r["flops"] / args.batch if isinstance(r, dict) and r.get("flops") else None
            run.guard("max_batch", m, lambda m=m, fpv=fpv: max_batch_entry(ctx, run, m, fpv), need_s=per_method_s * 2)

    if "backbones" not in skip:
        names = args.backbones or ("tiny,eva02-tiny,pe-core-tiny,siglip-tiny" if tiny
                                   else "ViT-B-16,EVA02-B-16,PE-Core-B-16,ViT-B-16-SigLIP2")
        ctx.clip = None  # the run's backbone is not needed any more: free its memory for the bigger ones
        gc.collect()
        for arch in names.split(","):
            run.guard("backbones", arch, lambda arch=arch: backbone_entry(ctx, arch), need_s=per_method_s * 1.5)
            gc.collect()
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()

    run.data["targets"] = targets(run.data)
    run.data["meta"]["total_s"] = round(budget.total - budget.left(), 1)
    run.save()
    md = render(run.data)
    (run.out / "gpu_bench.md").write_text(md + "\n")
    print(md)
    errors = [f"{s}/{k}" for s, d in run.data["sections"].items() for k, e in d.items() if isinstance(e, dict) and "error" in e]
    print(f"done in {run.data['meta']['total_s']} s; {len(errors)} failed: {', '.join(errors) or 'none'}; "
          f"results in {run.out}/gpu_bench.json and gpu_bench.md")


if __name__ == "__main__":
    main()
