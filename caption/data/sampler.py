"""The training order: one seeded permutation per epoch, sharded over ranks, resumable.

The order of epoch e is a function of (seed, e) alone, not of any generator's history, so a
resumed run rebuilds it from the checkpoint's epoch and continues from the checkpoint's
position inside it: the samples the interrupted run already used are skipped without being
loaded.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Indices of this rank's share of epoch `epoch`, from global position `start` on.

    The epoch's permutation is cut after `start` samples; the rest is dealt out round-robin,
    so rank r gets rest[r], rest[r + W], ... and step k of every rank together covers
    rest[k·B·W : (k+1)·B·W]: the batch that one process with batch size B·W would take.
    When W does not divide the rest, it is padded from its own beginning so that every rank
    runs the same number of steps (a collective waits for all of them).

    Args:
        n: the dataset's length.
        seed: the run's seed.
        rank: this process's rank.
        world_size: the number of processes W.
        shuffle: permute (training) or keep the dataset's order.
    """

    def __init__(
        self, n: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        self.n, self.seed, self.rank, self.world_size, self.shuffle = (
            n,
            seed,
            rank,
            world_size,
            shuffle,
        )
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Serve epoch `epoch` (1-based), skipping the first `start` samples of its order."""
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        """The whole epoch's permutation, the same on every rank."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def _share(self) -> torch.Tensor:
        rest = self.order()[self.start :]
        pad = -len(rest) % self.world_size
        if pad and len(rest):
            rest = torch.cat([rest, rest.repeat(pad // len(rest) + 1)[:pad]])
        return rest[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._share().tolist())

    def __len__(self) -> int:
        rest = max(0, self.n - self.start)
        return -(-rest // self.world_size)
