"""Data-parallel training across processes and machines with `torch.distributed`.

`torchrun` starts one process per device and tells each its place through environment
variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). Without them
`Dist` is a no-op: one process, rank 0 of 1, and no collective ever runs.

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
import torch.distributed as tdist

from caption.config import resolve_device
from caption.errors import CaptionError


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise CaptionError(f"{name}={value!r} is not an integer; launch with torchrun") from None


@dataclass(frozen=True)
class Dist:
    """This process's place in the job, and the collectives it takes part in.

    Every collective is a no-op (or the identity) when the job is one process, so the
    training loop calls them unconditionally.

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

    @classmethod
    def from_env(cls, device_name: str, timeout_s: float = 1800.0) -> Dist:
        """Join the process group that `torchrun` describes, or run alone without one.

        The backend follows the device: NCCL on CUDA, gloo on the CPU. On CUDA each process
        takes the GPU of its local rank.

        Args:
            device_name: `trainer.device` (`auto`, `cpu`, `cuda`, `cuda:N`).
            timeout_s: how long a collective may wait for the slowest rank (validation runs
                on rank 0 while the others wait).
        """
        world_size = _env_int("WORLD_SIZE", 1)
        device = resolve_device(device_name)
        if world_size <= 1:
            return cls(device=device)
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not tdist.is_initialized():
            tdist.init_process_group(
                backend,
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
                **({"device_id": device} if device.type == "cuda" else {}),
            )
        return cls(rank, world_size, local_rank, device)

    def __enter__(self) -> Dist:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes checkpoints and validates."""
        return self.rank == 0

    def shutdown(self) -> None:
        """Leave the process group (a no-op when running alone)."""
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank, so all start from the same model."""
        if not self.enabled:
            return
        for t in [*module.parameters(), *module.buffers()]:
            tdist.broadcast(t.data, src=0)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `values` over all ranks (the tensor itself when alone)."""
        if self.enabled:
            values = values.to(self.device)
            tdist.all_reduce(values)
        return values

    def all_reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the ranks, in one flat buffer.

        Each rank's loss is already divided by the whole job's word count (see
        `Captioner.loss(totals=...)`), so the sum is the gradient of the combined batch. A
        parameter without a gradient on this rank (frozen, or unused by its batch) counts as
        zeros, so the ranks always agree on the buffer's layout.
        """
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        tdist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def average_buffers(self, module: torch.nn.Module) -> None:
        """Average floating-point buffers (the hard-attention baseline, BatchNorm statistics).

        Each rank moves its buffers with its own batch; averaging keeps them identical on
        every rank. The hard-attention baseline moves with the mean reward of a rank's sampled
        captions, so it equals the one a single process would keep when every rank sampled as
        many captions (always so with `expectation_prob=0`), and is an equal-weight average
        otherwise.
        """
        if not self.enabled:
            return
        for b in module.buffers():
            if b.is_floating_point():
                tdist.all_reduce(b.data)
                b.data.div_(self.world_size)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (a signal that reached only some)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        tdist.all_reduce(t)
        return bool(t.item() > 0)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            tdist.barrier()
