"""Building the captioner from a config, and rebuilding it from a checkpoint.

`caption.checkpoint` is the file format only; this module knows what a model config holds.
The model's modules raise plain errors about their own arguments ("window must be an integer
>= 1, got 0"); the builder builds each part under its config path, so the user reads one line
that names the key to change ("config: model.attention.window must be ...").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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
from caption.models.self_attention import AnnotationSelfAttention

# Classes that moved after checkpoints naming them were written: old `_target_` -> new.
MOVED_TARGETS = {
    f"caption.models.attention.{name}": f"caption.models.scores.{name}"
    for name in ("AdditiveScore", "DotScore", "ScaledDotScore", "GeneralScore")
}
# What a module raises for arguments it refuses (a weights file or an optional package
# included); anything else is a bug and keeps its traceback.
REFUSALS = (ValueError, TypeError, RuntimeError, ImportError)


class ModelConfigError(CaptionError):
    """A model part refused its settings; the message names the config key to change."""


def _refusal(path: str, node: Mapping[str, Any], error: BaseException) -> ModelConfigError:
    """`error`, raised while building the part at config `path`, as one line naming the key.

    A message that starts with one of the part's keys becomes `path.key ...`; any other is
    put after `path: `. A message of several lines (Hydra's, for a class it cannot import)
    is joined into one.
    """
    message = " ".join(str(error).split())[:300] or type(error).__name__
    word = re.match(r"[A-Za-z_]\w*", message)
    key = word is not None and word.group() in node and not word.group().startswith("_")
    return ModelConfigError(f"config: {path}{'.' if key else ': '}{message}")


@contextmanager
def _part(path: str, node: Mapping[str, Any]) -> Iterator[None]:
    """Build the config node at `path`: what its module refuses is reported under `path`."""
    try:
        yield
    except ModelConfigError:
        raise  # a part inside this one, already named
    except InstantiationException as e:  # Hydra wraps what a constructor raised
        cause = e.__cause__
        if isinstance(cause, ModelConfigError):
            raise cause from None
        raise _refusal(path, node, cause or e) from None
    except REFUSALS as e:
        raise _refusal(path, node, e) from None


class _Named:
    """A part's factory (a Hydra `_partial_`), called by the module that holds the part,
    whose refusals name the part's config path."""

    def __init__(self, path: str, node: DictConfig) -> None:
        self.path, self.node = path, node
        with _part(path, node):
            self.build: Callable[..., torch.nn.Module] = instantiate(node)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.nn.Module:
        with _part(self.path, self.node):
            return self.build(*args, **kwargs)


def build_model(model_cfg: DictConfig, vocab_size: int, from_checkpoint: bool = False) -> Captioner:
    """Instantiate the `model` config group.

    The parts are built in the order the captioner would build them (encoder, self-attention,
    then the decoder with its attention and score), so a seed gives the same weights.

    Args:
        model_cfg: the `model` node.
        vocab_size: V.
        from_checkpoint: weights will be loaded next, so skip fetching pretrained ones.

    Raises:
        ModelConfigError: a part refused its settings; one line that names the key.
    """
    if from_checkpoint:
        model_cfg = OmegaConf.merge(
            model_cfg, {"encoder": {"pretrained": False, "weights_path": None}}
        )
    with _part("model.encoder", model_cfg.encoder):
        encoder = instantiate(model_cfg.encoder)
    options = model_cfg.get("encoder_self_attention") or {}
    with _part("model.encoder_self_attention", options):
        self_attention = AnnotationSelfAttention(encoder.out_dim, **options)
    parts = {name: _Named(f"model.{name}", model_cfg[name]) for name in ("attention", "score")}
    with _part("model", model_cfg):
        return instantiate(
            model_cfg,
            vocab_size=vocab_size,
            encoder=encoder,
            encoder_self_attention=self_attention,
            **parts,
        )


def _retarget(node: Any) -> Any:
    """A copy of a plain config tree with moved `_target_` classes renamed."""
    if isinstance(node, dict):
        return {
            k: MOVED_TARGETS.get(v, v) if k == "_target_" else _retarget(v) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_retarget(v) for v in node]
    return node


def stored_config(ckpt: Mapping[str, Any]) -> DictConfig:
    """A checkpoint's training config in today's terms: what older files lack is filled in
    here, and only here.

    - moved classes get their new `_target_` (MOVED_TARGETS);
    - `model.encoder.image_size`, the side the model is fed, saved since format version 3,
      is taken from `data.image_size` (what training resized to) when absent.
    """
    config = _retarget(ckpt["config"])  # a copy: the checkpoint itself stays as read
    encoder = config["model"]["encoder"]
    if encoder.get("image_size") is None:
        encoder["image_size"] = config["data"]["image_size"]
    return OmegaConf.create(config)


def load_captioner(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Captioner, Vocabulary, DictConfig]:
    """Rebuild the model from a checkpoint alone, ready for inference.

    The model knows its input (`model.image_size`, `model.prepare`), so no caller needs the
    training config for it.

    Returns:
        The model in eval mode on `device`, its vocabulary and its training config (see
        `stored_config`).
    """
    ckpt = load_checkpoint(path, map_location=device)
    cfg = stored_config(ckpt)
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
