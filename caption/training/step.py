"""The optimizer over the trainable parameters, the objective, and one optimizer step across
the ranks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from caption.data.vocab import Vocabulary
from caption.models.captioner import Captioner
from caption.speed import Precision
from caption.training.dist import Dist
from caption.training.objectives import CrossEntropy, Objective
from caption.training.scst import SelfCritical


def build_optimizer(
    cfg: DictConfig, model: Captioner
) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    """The optimizer over the decoder and the encoder's tunable blocks, in two groups.

    The encoder's top-k blocks are in the optimizer from the start, even while they wait for
    `fine_tune_from_epoch` (frozen parameters have no grad, so the optimizer skips them), so
    the groups never change and a resumed run loads the same optimizer state. They get
    `model.encoder.lr` when it is set.

    Returns:
        The optimizer, and the parameters it steps (the ones whose gradients are all-reduced).
    """
    encoder = model.encoder
    in_encoder = {id(p) for p in encoder.parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_encoder]
    tunable = encoder.tunable_parameters()
    groups = [{"params": rest}]
    if tunable:
        groups.append({"params": tunable, **({"lr": encoder.lr} if encoder.lr else {})})
    return instantiate(cfg.optimizer)(params=groups), rest + tunable


def build_objective(cfg: DictConfig, train_bank: Any, vocab: Vocabulary) -> Objective:
    """The objective `trainer.objective` names (`xe` or `scst`), set up on the train bank."""
    objectives: dict[str, Callable[[], Objective]] = {
        "xe": CrossEntropy,
        "scst": lambda: SelfCritical(train_bank, vocab, **cfg.trainer.scst),
    }
    return objectives[cfg.trainer.objective]()


def train_step(
    batch: Any,
    objective: Objective,
    model: Captioner,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[torch.nn.Parameter],
    dist: Dist,
    trainer: DictConfig,
    precision: Precision,
) -> tuple[dict[str, float], int]:
    """One optimizer step on this rank's batch, gradients summed over the ranks.

    Returns:
        The objective's terms, of the combined batch of all ranks; and the words this rank's
        loss scored.
    """
    with precision.autocast():
        step = objective.losses(model, batch, dist, trainer.channels_last)
    if step.images == 0:
        return dict.fromkeys(objective.terms, 0.0), 0  # no image read, no step
    # A rank that read no image adds zeros (loss None), but takes part in the collectives.
    precision.step(
        step.loss,
        optimizer,
        params,
        trainer.grad_clip,
        reduce=lambda: dist.all_reduce_gradients(params),
    )
    scheduler.step()
    dist.average_buffers(model)
    values = dist.all_reduce_sum(step.values).tolist()
    return dict(zip(objective.terms, values, strict=True)), step.words
