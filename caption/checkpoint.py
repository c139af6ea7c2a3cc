"""Checkpoints: written atomically, read with `weights_only=True`, enough to caption alone.

A checkpoint is a plain dict of tensors and primitives: the weights, the optimizer state,
the resolved config and the vocabulary, plus training progress. Nothing is pickled as code,
so loading a file from elsewhere cannot run anything.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from caption.data.vocab import Vocabulary
from caption.errors import CaptionError, first_line
from caption.files import atomic_file
from caption.models.captioner import Captioner

FORMAT = "caption-checkpoint"
# 1: weights, optimizer, scheduler, config, vocabulary, progress, torch's RNG.
# 2: adds the position inside the epoch and its running sums, and every generator's state
#    (Python, NumPy, torch CPU and CUDA) per rank; version 1 files still load and resume.
VERSION = 2

# Classes that moved after checkpoints naming them were written: old `_target_` -> new.
MOVED_TARGETS = {
    f"caption.models.attention.{name}": f"caption.models.scores.{name}"
    for name in ("AdditiveScore", "DotScore", "ScaledDotScore", "GeneralScore")
}


def save_checkpoint(path: str | Path, **content: Any) -> None:
    """Write `content` plus the format marker to `path` atomically.

    The file is written beside its destination and renamed over it, so a crash mid-write
    leaves the previous checkpoint intact rather than a truncated one.
    """
    with atomic_file(path, "wb", private=True) as f:
        torch.save({"format": FORMAT, "version": VERSION, **content}, f)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely and check that it is one of ours.

    Raises:
        CaptionError: the file is missing, unreadable, or not a caption checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionError(
            f"checkpoint: {path} does not exist; pass checkpoint=<run dir>/checkpoints/best.pt"
        )
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for foreign or corrupt files
        reason = _load_failure(e)
        raise CaptionError(
            f"checkpoint: {path} is not a caption checkpoint and cannot be read "
            f"safely ({reason}); pass a file written by caption-train"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CaptionError(
            f"checkpoint: {path} is not a caption checkpoint (no '{FORMAT}' "
            "marker); pass a file written by caption-train"
        )
    version = ckpt.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CaptionError(
            f"checkpoint: {path} has no valid format version ({version!r}); pass a file "
            "written by caption-train"
        )
    if version > VERSION:
        raise CaptionError(
            f"checkpoint: {path} has format version {version}, newer "
            f"than this caption ({VERSION}); upgrade caption to read it"
        )
    return ckpt


def _load_failure(e: Exception) -> str:
    """One line on why `torch.load(weights_only=True)` refused a file."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "WeightsUnpickler error:" in text:
        # The pickle asks for something other than tensors and plain data: code could run.
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0]
        return f"it holds pickled objects, not just tensors, refused unexecuted: {detail[:100]}"
    return first_line(e, 160)


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
