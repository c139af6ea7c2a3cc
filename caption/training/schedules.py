"""Learning-rate schedules, chosen with `scheduler=<name>` (conf/scheduler/).

Each takes the optimizer and the run's length in optimizer steps, so that `caption-train`
builds any of them the same way: `instantiate(cfg.scheduler)(optimizer, total_steps=...)`.
"""

from __future__ import annotations

import math

import torch


def cosine_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 100,
    final_lr_ratio: float = 0.05,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to `final_lr_ratio` of the base lr at `total_steps`.

    Args:
        optimizer: whose learning rates to scale.
        total_steps: the run's length in optimizer steps.
        warmup_steps: steps of linear warm-up from 0.
        final_lr_ratio: the lr at the end, as a fraction of the base lr.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def constant_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The base learning rate throughout."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
