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

from caption.errors import CaptionError, first_line
from caption.files import atomic_file

FORMAT = "caption-checkpoint"
# 1: weights, optimizer, scheduler, config, vocabulary, progress, torch's RNG.
# 2: adds the position inside the epoch and its running sums, and every generator's state
#    (Python, NumPy, torch CPU and CUDA) per rank; version 1 files still load and resume.
# 3: the model config holds `encoder.image_size`, the side the model is fed; for older files
#    `caption.models.build.stored_config` takes it from `data.image_size`.
VERSION = 3


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
