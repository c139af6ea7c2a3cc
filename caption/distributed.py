"""Data-parallel training across processes and machines with `torch.distributed`.

`torchrun` starts one process per device and tells each its place through environment
variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). Without them
this module is a no-op: one process, rank 0 of 1, and no collective ever runs.

Gradients are all-reduced by hand rather than through `DistributedDataParallel`: the
captioner trains through `Captioner.loss`, not `forward`, which DDP's hooks expect, and one
flat all-reduce per step is what DDP's bucketing does for a model of this size anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from caption.config import resolve_device
from caption.errors import CaptionError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job.

    Args:
        rank: global rank, 0 .. world_size - 1.
        world_size: the number of processes.
        local_rank: the rank on this machine (picks the GPU).
        device: this process's device.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes checkpoints and validates."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise CaptionError(f"{name}={value!r} is not an integer; launch with torchrun") from None


def init_distributed(device_name: str, timeout_s: float = 1800.0) -> Dist:
    """Join the process group that `torchrun` describes, or run alone without one.

    The backend follows the device: NCCL on CUDA, gloo on the CPU. On CUDA each process takes
    the GPU of its local rank.

    Args:
        device_name: `trainer.device` (`auto`, `cpu`, `cuda`, `cuda:N`).
        timeout_s: how long a collective may wait for the slowest rank (validation runs on
            rank 0 while the others wait).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    device = resolve_device(device_name)
    if world_size <= 1:
        return Dist(device=device)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    return Dist(rank, world_size, local_rank, device)


def shutdown(d: Dist) -> None:
    """Leave the process group (a no-op when running alone)."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_module(d: Dist, module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank, so all start from the same model."""
    if not d.enabled:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


def all_reduce_sum(d: Dist, values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `values` over all ranks (the tensor itself when alone)."""
    if d.enabled:
        values = values.to(d.device)
        dist.all_reduce(values)
    return values


def all_reduce_gradients(d: Dist, params: list[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over the ranks, in one flat buffer.

    Each rank's loss is already divided by the whole job's word count (see
    `Captioner.loss(totals=...)`), so the sum is the gradient of the combined batch. A parameter
    without a gradient on this rank (frozen, or unused by its batch) counts as zeros, so the
    ranks always agree on the buffer's layout.
    """
    if not d.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def average_buffers(d: Dist, module: torch.nn.Module) -> None:
    """Average floating-point buffers (the hard-attention baseline, BatchNorm statistics).

    Each rank moves its buffers with its own batch; averaging keeps them identical on every
    rank. The hard-attention baseline moves with the mean reward of a rank's sampled captions,
    so it equals the one a single process would keep when every rank sampled as many
    captions (always so with `expectation_prob=0`), and is an equal-weight average otherwise.
    """
    if not d.enabled:
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b.data)
            b.data.div_(d.world_size)


def any_rank(d: Dist, flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a signal that reached only some)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def broadcast_object(d: Dist, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(d: Dist, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    """Wait for every rank."""
    if d.enabled:
        dist.barrier()
