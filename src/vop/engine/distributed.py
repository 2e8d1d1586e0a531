"""Distributed training with the engine PyTorch users already have: torchrun + DDP.

Nothing happens at import. ``DistEnv.from_env()`` reads torchrun's variables; ``setup()`` creates
the process group only when WORLD_SIZE > 1, so the same code runs as a single CPU process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "DistEnv":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, prefer: str = "auto") -> torch.device:
        """This process's device for a ``device`` setting (auto, cpu, cuda): the CPU, or the GPU of its
        local rank (:func:`vop.runtime.resolve_device`; a ConfigError for anything else)."""
        from vop.runtime import resolve_device

        return resolve_device(prefer, local_rank=self.local_rank, what="device")

    def setup(self, device: torch.device) -> None:
        if not self.enabled or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.barrier()

    def teardown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.barrier()  # every rank leaves its collectives before the group goes (gloo aborts otherwise)
            dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 (sizes may differ: a batch loses unreadable videos) whose backward
    sums every rank's gradient for this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
        sizes = [int(s.item()) for s in sizes]
        pad = max(sizes)
        padded = torch.zeros((pad, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.sizes, ctx.rank, ctx.pad = sizes, rank, pad
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # gloo has no reduce_scatter: reduce everything, keep our rows
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order), with gradients."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()
