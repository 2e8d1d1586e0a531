"""Peak memory of real training steps against vop.memory's estimate (CPU, Linux).

    python tests/scripts/step_memory.py METHOD ARCH SIZE BATCH FRAMES [GRAD_CHECKPOINTING 0|1]

Builds METHOD on a random ARCH backbone in this (fresh) process, runs one small warm-up step (so that
one-time allocations of the kernels are not counted), then resets the peak resident memory
(``/proc/self/clear_refs``) and runs two optimiser steps of BATCH videos x FRAMES frames at SIZE px
(AdamW, 32-token captions: the second step runs with the optimiser state of the first, as every later
step does). Prints one JSON line: the measured peak above the memory before the steps, vop.memory's
estimate of the same (its total minus the weights, which exist before) and their ratio.
tests/test_bounds.py runs it; docs of the formula: vop/memory.py.
"""
import json
import sys

import torch


def rss(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def main(method: str, arch: str, size: int, batch: int, frames: int, gc: bool) -> dict:
    import vop
    from vop.engine.optim import param_groups
    from vop.engine.trainer import _step
    from vop.memory import estimate_model_step

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = vop.create_model(method, arch, frames=frames).train().set_grad_checkpointing(gc)
    T = 32
    video = torch.randn(batch, frames, 3, size, size)
    tokens = torch.randint(1, 1000, (batch, T))
    tokens[:, -1] = 49407  # [EOT]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cpu = torch.device("cpu")
    _step(model, model, video[:2], tokens[:2], 1, None, cpu, scaler)  # warm-up: kernels' one-time buffers
    model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW(param_groups(model, 1e-3, 1e-5, 0.2))
    import ctypes
    import gc as collector

    collector.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so that reusing them counts too
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM)
    before = rss("VmRSS")
    for _ in range(2):
        _step(model, model, video, tokens, 1, None, cpu, scaler)
        opt.step()
        opt.zero_grad(set_to_none=True)
    measured = rss("VmHWM") - before
    est = estimate_model_step(model, batch=batch, frames=frames, image_size=size, text_tokens=T, grad_checkpointing=gc)
    # the video tensor existed before the window: the estimate's inputs term counts it and one copy
    estimate = est["total"] - est["weights"] - est["inputs"] / 2
    return {"method": method, "arch": arch, "size": size, "batch": batch, "frames": frames, "grad_checkpointing": gc,
            "measured": measured, "estimate": estimate, "ratio": measured / estimate}


if __name__ == "__main__":
    a = sys.argv[1:]
    print(json.dumps(main(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), len(a) > 5 and a[5] == "1")))
