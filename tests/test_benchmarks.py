"""The benchmark scripts run (tiny sizes, CPU) and measure what they claim to measure."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402
import gpu_bench  # noqa: E402
import port_baseline as P  # noqa: E402

SCRIPTS = ["bench_params.py", "bench_train_step.py", "bench_encode.py", "bench_hf.py", "bench_port.py", "gpu_bench.py",
           "bench_backbones.py", "bench_lora_tempme.py"]


def _run(args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = _run([sys.executable, str(BENCH / script), "--help"]).stdout
    assert "usage:" in out and ("--json" in out or "--out" in out)


def test_gpu_sh_cpu_tiny(tmp_path):
    """The prepared GPU script, end to end on CPU: every section measured, none failed."""
    out = tmp_path / "gpu"
    _run(["bash", str(BENCH / "gpu.sh"), str(out), "--device", "cpu", "--tiny", "--peak-tflops", "1",
          "--budget", "400"], timeout=460)  # a generous budget: a loaded machine must not skip sections
    for f in ("gpu_bench.json", "gpu_bench.md", "log.txt", "nvidia-smi.txt"):
        assert (out / f).is_file(), f
    data = json.loads((out / "gpu_bench.json").read_text())
    S = data["sections"]
    assert set(S) >= {"device", "train", "port", "encode", "hf", "max_batch"}
    # the tokenizer is installed here: the report says it works (id 49406 is [SOT])
    assert S["device"]["info"]["optional"]["tokenizer"].startswith("ok: [49406, "), S["device"]["info"]["optional"]
    errors = [(s, k, e["error"]) for s, d in S.items() for k, e in d.items() if isinstance(e, dict) and "error" in e]
    assert not errors, errors
    train = S["train"]
    assert set(train) == {"full", "vop", "vop-f", "vop-fc", "dgl", "dgl-l", "mv-adapter", "cma", "lora", "tempme"}
    for r in train.values():
        assert r["step_s"] > 0 and r["flops"] > 0 and r["mfu"] is not None
        assert r["videos_per_s"] == pytest.approx(2 / r["step_s"])
    # a step is forward + backward; a frozen backbone's backward computes input gradients only
    # (~1x forward more), full fine-tuning's also the weight gradients (~2x forward more)
    assert 2.7 < train["full"]["flops"] / train["full"]["flops_forward"] < 3.2
    for m in ("vop", "vop-f", "vop-fc"):
        assert 1.8 < train[m]["flops"] / train[m]["flops_forward"] < 2.3, m
    assert S["port"]["vop"]["agreement"]["port-mha"]["video_max_abs"] < 1e-4
    assert {r["method"] for r in S["encode"]["throughput"]["encode_video"]} == {"zeroshot", "vop", "vop-f", "lora", "tempme"}
    mb = S["max_batch"]["vop"]
    assert [t["batch"] for t in mb["tries"]] == [4, 8] and mb["largest"]["batch"] == 8
    assert set(data["targets"]) >= {"vop_time_vs_full", "vop_f_time_vs_vop", "port-mha_over_ours", "vop_mfu"}
    md = (out / "gpu_bench.md").read_text()
    assert "Training step, batch 2" in md and "| `vop` |" in md
    bb = S["backbones"]  # the families against CLIP, each at its native size
    assert list(bb) == ["tiny", "eva02-tiny", "pe-core-tiny", "siglip-tiny"] and all(r["step_s"] > 0 for r in bb.values())
    assert bb["pe-core-tiny"]["text_tokens"] == 24 and "| `pe-core-tiny` |" in md
    assert bb["siglip-tiny"]["text_tokens"] == 64  # SigLIP's text tower always runs on its whole context


def test_backbones_tiny(tmp_path):
    """bench_backbones.py on the tiny records of each family: every ratio against the first (the baseline)."""
    out = tmp_path / "b.json"
    _run([sys.executable, str(BENCH / "bench_backbones.py"), "--archs", "tiny,eva02-tiny,pe-core-tiny,siglip-tiny",
          "--frames", "2",
          "--rounds", "1", "--repeats", "1", "--steps", "1", "--no-doc", "--json", str(out)], timeout=300)
    data = json.loads(out.read_text())
    rows = {r["arch"]: r for r in data["results"]}
    assert list(rows) == ["tiny", "eva02-tiny", "pe-core-tiny", "siglip-tiny"] and rows["tiny"]["step_ratio"] == 1.0
    assert rows["pe-core-tiny"]["text_tokens"] == 24 and rows["eva02-tiny"]["text_tokens"] == 32
    assert rows["siglip-tiny"]["text_tokens"] == 64 and rows["siglip-tiny"]["vop_trainable"] == 2 * 8 * 64 * 2
    assert rows["pe-core-tiny"]["vop_trainable"] == 2 * 8 * 64 * 2 and all(r["frames_per_s"] > 0 for r in rows.values())


def test_guard_turns_failures_into_entries(tmp_path):
    run = gpu_bench.Run(tmp_path, gpu_bench.Budget(100), torch.device("cpu"))

    def boom():
        raise RuntimeError("CUDA out of memory (simulated)")

    e = run.guard("train", "vop", boom)
    assert e["error"].startswith("RuntimeError: CUDA out of memory")
    s = run.guard("train", "full", lambda: {"x": 1}, need_s=1e9)
    assert "skipped" in s
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert saved["sections"]["train"]["vop"]["error"] and saved["sections"]["train"]["full"]["skipped"]
    md = gpu_bench.render({"meta": {}, "sections": saved["sections"]})
    assert "error: RuntimeError" in md and "skipped: time budget" in md


def test_peak_table():
    assert gpu_bench.peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert gpu_bench.peak_tflops("NVIDIA H200")[0] == 989.0
    assert gpu_bench.peak_tflops("NVIDIA H100 PCIe")[0] == 756.0
    assert gpu_bench.peak_tflops("Some GPU")[0] is None


def test_flop_counter_counts_cpu_attention():
    q = torch.randn(2, 3, 40, 16, requires_grad=True)
    with C.flop_counter() as fc:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert fc.get_total_flops() == 4 * 2 * 3 * 40 * 40 * 16


def test_layer_flops_joint_vs_per_frame():
    """ViT-B/32, 12 frames: VoP^F's joint layer (608 tokens) costs about what 12 per-frame sequences
    of 58 tokens cost; only its attention part is ~9x larger."""
    per_frame = C.layer_flops(768, 58, 12)
    joint = C.layer_flops(768, 608, 1)
    assert per_frame["linear"] == 2 * 12 * 58 * 12 * 768**2
    assert joint["total"] / per_frame["total"] == pytest.approx(0.9766, abs=1e-3)
    assert joint["attention"] / per_frame["attention"] == pytest.approx(608**2 / (12 * 58**2))


def test_update_doc(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("# B\n\nintro\n\n<!-- BEGIN bench:x -->\nold\n<!-- END bench:x -->\n\nafter\n")
    C.update_doc(doc, "x", "| new |")
    C.update_doc(doc, "y", "appended")
    text = doc.read_text()
    assert "old" not in text and "| new |" in text and "after" in text and "intro" in text
    assert text.rstrip().endswith("appended\n<!-- END bench:y -->")


def test_caption_tokens():
    t = C.caption_tokens(3, 10)
    assert t.shape == (3, 10) and (t[:, 0] == C.SOT).all() and (t.argmax(-1) == 9).all()


def test_port_baseline_agrees_and_uses_its_own_prompts(tiny_clip):
    import vop

    m = vop.create_model("vop", tiny_clip, frames=4).train()
    video = torch.randn(2, 4, 3, 32, 32)
    tokens = C.caption_tokens(2, 12)
    for attention in ("mha", "math"):
        port = P.PortVoP(m, attention).train()
        a = P.check_agreement(m, port, video, tokens)
        assert a["video_max_abs"] < 1e-5 and a["grad_max_rel"] < 1e-4
        with torch.no_grad():
            # (a constant shift would be undone by the blocks' LayerNorm)
            port.visual_prompts.add_(0.5 * torch.randn_like(port.visual_prompts))
            port.text_prompts.add_(0.5 * torch.randn_like(port.text_prompts))
            v, t = port(video, tokens)
            v0, t0 = m(video, tokens)
        assert (v - v0).abs().max() > 1e-3 and (t - t0).abs().max() > 1e-3


def test_bench_params_tiny(tmp_path):
    out = tmp_path / "p.json"
    _run([sys.executable, str(BENCH / "bench_params.py"), "--archs", "tiny", "--methods", "full,vop,vop-f",
          "--no-doc", "--json", str(out)])
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["vop"]["trainable"] == 2 * 8 * 64 + 2 * 8 * 64  # text + video, 2 layers x 8 tokens x width 64
    assert rows["vop-f"]["uncounted"] == 12 * 64  # frame position embedding, 12 frames
    for r in rows.values():
        assert r["tensor_bytes"] == 4 * r["trainable"] and 0 < r["metadata_bytes"] < 16_000
    assert rows["full"]["trainable"] == rows["full"]["backbone"]


def test_train_step_tiny(tmp_path):
    out, doc = tmp_path / "t.json", tmp_path / "b.md"
    _run([sys.executable, str(BENCH / "bench_train_step.py"), "--arch", "tiny", "--frames", "4", "--image-size", "32",
          "--methods", "full,vop", "--rounds", "1", "--steps", "1", "--json", str(out), "--doc", str(doc)])
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["results"]}
    assert rows["full"]["time_ratio"] == 1.0 and rows["vop"]["trainable"] == 2048
    assert rows["vop"]["peak_bytes"] < rows["full"]["peak_bytes"]  # no weight gradients, no Adam state for CLIP
    assert "vop_time_vs_full" in data["targets"]
    assert "<!-- BEGIN bench:train_step -->" in doc.read_text()


def test_lora_tempme_tiny(tmp_path):
    """bench_lora_tempme.py: the spec's image-tower multiply-adds (52.90 vs 34.70 G on ViT-B/32), encode and
    training-step sections on the tiny backbone."""
    out, doc = tmp_path / "l.json", tmp_path / "b.md"
    _run([sys.executable, str(BENCH / "bench_lora_tempme.py"), "--arch", "tiny", "--frames", "4", "--repeats", "1",
          "--rounds", "1", "--steps", "1", "--json", str(out), "--doc", str(doc)], timeout=300)
    data = json.loads(out.read_text())
    b32 = data["macs"][0]
    assert b32["arch"] == "ViT-B/32" and round(b32["clip_macs"] / 1e9, 2) == 52.90 and round(b32["tempme_macs"] / 1e9, 2) == 34.70
    assert b32["tokens_in"] == 600 and b32["tokens_out"] == 97 and abs(b32["counted_ratio"] - 0.656) < 5e-3
    assert [r["method"] for r in data["encode"]] == ["zeroshot", "lora", "lora-unmerged", "tempme", "vop"]
    train = {r["method"]: r for r in data["train"]}
    assert set(train) == {"full", "vop", "lora", "tempme"} and train["full"]["time_vs_full"] == 1.0
    assert train["lora"]["trainable"] == 4 * 8 * 64 * 4  # 2 + 2 blocks x 4rd, r = 8, width 64
    assert "<!-- BEGIN bench:lora_tempme -->" in doc.read_text()
