"""The optimizer over the trainable parameters, and one optimizer step across the ranks."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from caption.data.dataset import CaptionBatch
from caption.data.vocab import PAD_ID
from caption.models.captioner import Captioner
from caption.speed import Precision, images_to_device
from caption.training.dist import Dist

LOSS_TERMS = ("loss", "nll", "attention_reg")


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


def train_step(
    batch: CaptionBatch,
    model: Captioner,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[torch.nn.Parameter],
    dist: Dist,
    trainer: DictConfig,
    precision: Precision,
) -> dict[str, float]:
    """One optimizer step on this rank's batch, gradients summed over the ranks.

    Returns:
        The step's loss terms, of the combined batch of all ranks.
    """
    device = dist.device
    images = images_to_device(batch.images, device, trainer.channels_last)
    captions = batch.captions.to(device, non_blocking=True)
    totals = None
    if dist.enabled:  # divide by the job's words and images, so that grads sum to the total
        words = (captions[:, 1:] != PAD_ID).sum() if len(captions) else 0
        totals = dist.all_reduce_sum(torch.tensor([float(words), float(len(images))]))
        totals = totals.to(device)
    images_in_step = len(images) if totals is None else totals[1]  # all ranks together
    if images_in_step == 0:
        return dict.fromkeys(LOSS_TERMS, 0.0)  # no image read, no step
    loss = None  # every image of this rank's batch was unreadable: it adds zeros, but takes part
    values = torch.zeros(3, device=device)
    if len(images):
        with precision.autocast():
            losses = model.loss(images, captions, totals=totals)
        loss = losses.loss
        values = torch.stack([losses.loss, losses.nll, losses.attention_reg]).detach().float()
    precision.step(
        loss,
        optimizer,
        params,
        trainer.grad_clip,
        reduce=lambda: dist.all_reduce_gradients(params),
    )
    scheduler.step()
    dist.average_buffers(model)
    values = dist.all_reduce_sum(values).tolist()
    return dict(zip(LOSS_TERMS, values, strict=True))
