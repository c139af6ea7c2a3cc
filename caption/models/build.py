"""Building the captioner from a config, and rebuilding it from a checkpoint.

`caption.checkpoint` is the file format only; this module knows what a model config holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from caption.checkpoint import load_checkpoint
from caption.data.vocab import Vocabulary
from caption.errors import CaptionError, first_line
from caption.models.captioner import Captioner

# Classes that moved after checkpoints naming them were written: old `_target_` -> new.
MOVED_TARGETS = {
    f"caption.models.attention.{name}": f"caption.models.scores.{name}"
    for name in ("AdditiveScore", "DotScore", "ScaledDotScore", "GeneralScore")
}


def build_model(model_cfg: DictConfig, vocab_size: int, from_checkpoint: bool = False) -> Captioner:
    """Instantiate the `model` config group.

    Args:
        model_cfg: the `model` node.
        vocab_size: V.
        from_checkpoint: weights will be loaded next, so skip fetching pretrained ones.
    """
    if from_checkpoint:
        model_cfg = OmegaConf.merge(
            model_cfg, {"encoder": {"pretrained": False, "weights_path": None}}
        )
    try:
        return instantiate(model_cfg, vocab_size=vocab_size)
    except InstantiationException as e:
        # Hydra wraps what a constructor raised; report the cause, not the wrapper.
        cause = e.__cause__
        if isinstance(cause, CaptionError):
            raise cause from None
        reason = first_line(cause or e)
        raise CaptionError(f"config: model cannot be built from this config ({reason})") from None


def _retarget(node: Any) -> Any:
    """A copy of a plain config tree with moved `_target_` classes renamed."""
    if isinstance(node, dict):
        return {
            k: MOVED_TARGETS.get(v, v) if k == "_target_" else _retarget(v) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_retarget(v) for v in node]
    return node


def load_captioner(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Captioner, Vocabulary, DictConfig]:
    """Rebuild the model from a checkpoint alone, ready for inference.

    Returns:
        The model in eval mode on `device`, its vocabulary and its training config.
    """
    ckpt = load_checkpoint(path, map_location=device)
    cfg = OmegaConf.create(_retarget(ckpt["config"]))  # older checkpoints name moved classes
    vocab = Vocabulary(ckpt["vocab"])
    model = build_model(cfg.model, len(vocab), from_checkpoint=True)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CaptionError(
            f"checkpoint: {path}: weights do not fit the model its config "
            f"describes ({first_line(e)})"
        ) from None
    return model.to(device).eval(), vocab, cfg
