"""Checks on config values that Hydra cannot type-check, each failing with one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from caption.errors import CaptionError
from caption.models.decoding import STRATEGIES

# The repository's conf/ (the package is installed in editable mode, beside it).
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# Keys that are gone, with what to write instead: an old command line or config file that
# still sets one is answered in one line (Hydra alone would say only that the key is unknown).
REPLACED_KEYS = {"trainer.resume": "resume=auto (or resume=<run dir or checkpoint>)"}


def replaced_key_message(key: str) -> str | None:
    """The one-line answer to a key of `REPLACED_KEYS`; None for any other key."""
    if key not in REPLACED_KEYS:
        return None
    return f"config: {key} is gone; use {REPLACED_KEYS[key]}"


def _fail(key: str, value: Any, expected: str) -> None:
    raise CaptionError(
        f"config: {key} must be {expected}, got {value!r}; override it with {key}=<value>"
    )


def check_int(cfg: DictConfig, key: str, minimum: int = 0, optional: bool = False) -> None:
    """`cfg[key]` is an int >= minimum (or None when optional)."""
    value = cfg[key.split(".")[-1]]
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(key, value, f"an integer >= {minimum}" + (" or null" if optional else ""))


def check_float(cfg: DictConfig, key: str, minimum: float = 0.0, optional: bool = False) -> None:
    """`cfg[key]` is a number >= minimum (or None when optional)."""
    value = cfg[key.split(".")[-1]]
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        _fail(key, value, f"a number >= {minimum}" + (" or null" if optional else ""))


def check_bool(cfg: DictConfig, key: str) -> None:
    """`cfg[key]` is true or false."""
    value = cfg[key.split(".")[-1]]
    if not isinstance(value, bool):
        _fail(key, value, "true or false")


def check_choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> None:
    """`cfg[key]` is one of `choices`."""
    value = cfg[key.split(".")[-1]]
    if value not in choices:
        _fail(key, value, f"one of {', '.join(choices)}")


def check_decoding(cfg: DictConfig, prefix: str = "") -> None:
    """The decoding options shared by training validation, generate, evaluate and visualize."""
    check_choice(cfg, f"{prefix}strategy", STRATEGIES)
    check_int(cfg, f"{prefix}beam_size", 1)
    check_int(cfg, f"{prefix}max_len", 1)
    check_int(cfg, f"{prefix}batch_size", 1)
    check_bool(cfg, f"{prefix}allow_unk")
    check_float(cfg, f"{prefix}length_penalty", 0.0)
    check_bool(cfg, f"{prefix}block_trigrams")


def decoding_options(cfg: DictConfig) -> dict[str, Any]:
    """The decoding options `check_decoding` checked, as keywords of the decoders."""
    keys = ("strategy", "beam_size", "max_len", "allow_unk", "length_penalty", "block_trigrams")
    return {key: cfg[key] for key in keys}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; anything else must be a device torch knows and has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CaptionError(
            f"config: device {name!r} is not a torch device; use auto, cpu or cuda[:N]"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaptionError(
            f"config: device {name!r} asked for, but CUDA is not available here; "
            "use device=cpu or device=auto"
        )
    return device


def check_train_config(cfg: DictConfig) -> None:
    """Fail early, before any data is read, on values that would fail late."""
    t, d = cfg.trainer, cfg.data
    check_int(t, "trainer.max_epochs", 1)
    check_int(t, "trainer.max_steps", 1, optional=True)
    check_int(t, "trainer.seed", 0)
    check_float(t, "trainer.grad_clip", 0.0, optional=True)
    check_int(t, "trainer.patience", 1, optional=True)
    check_int(t, "trainer.val_max_images", 1, optional=True)
    check_int(t, "trainer.checkpoint_every", 1, optional=True)
    check_bool(t, "trainer.deterministic")
    check_float(t, "trainer.dist_timeout_s", 1.0)
    check_decoding(t.val, "trainer.val.")
    _check_objective(cfg)
    check_int(d, "data.image_size", 16)
    check_int(d, "data.batch_size", 1)
    check_int(d, "data.min_count", 1)
    check_int(d, "data.vocab_size", 5, optional=True)
    check_int(d, "data.max_caption_len", 1, optional=True)
    check_int(d, "data.num_workers", 0)
    check_int(d, "data.max_image_pixels", 1, optional=True)
    check_bool(d, "data.strict_images")
    check_bool(d, "data.preload")
    check_bool(d, "data.feature_cache")
    check_bool(t, "trainer.features_only")
    if t.features_only and not d.feature_cache:
        raise CaptionError(
            "config: trainer.features_only=true builds the feature cache; "
            "add data.feature_cache=true"
        )
    if cfg.resume is not None and not isinstance(cfg.resume, str):
        _fail("resume", cfg.resume, "auto, a run dir or a checkpoint file")
    for key in REPLACED_KEYS:  # set in a config file (the command line is checked before)
        if OmegaConf.select(cfg, key) is not None:
            raise CaptionError(replaced_key_message(key))
    check_float(cfg.model, "model.dropout", 0.0)
    if cfg.model.dropout >= 1:
        _fail("model.dropout", cfg.model.dropout, "in [0, 1)")
    check_float(cfg.model, "model.doubly_stochastic", 0.0)
    check_choice(cfg.model, "model.deep_output_activation", ("none", "tanh"))
    side = cfg.model.encoder.get("image_size", d.image_size)
    if side != d.image_size:  # training resizes to data.image_size: the model must say the same
        raise CaptionError(
            f"config: model.encoder.image_size={side} differs from data.image_size="
            f"{d.image_size}, the side training resizes images to; set data.image_size, "
            "which the model's follows"
        )


OBJECTIVES = ("xe", "scst")
MONITORS = ("bleu4", "cider")
SCST_BASELINES = ("greedy", "mean")


def _check_objective(cfg: DictConfig) -> None:
    """`trainer.objective`, its `trainer.scst` options, `trainer.monitor` and `init_from`."""
    t = cfg.trainer
    check_choice(t, "trainer.objective", OBJECTIVES)
    check_choice(t, "trainer.monitor", MONITORS)
    check_int(t.scst, "trainer.scst.samples", 1)
    check_int(t.scst, "trainer.scst.max_len", 1)
    check_choice(t.scst, "trainer.scst.baseline", SCST_BASELINES)
    if t.scst.baseline == "mean" and t.scst.samples < 2:
        raise CaptionError(
            "config: trainer.scst.baseline=mean averages the other samples of an image; "
            "set trainer.scst.samples to 2 or more"
        )
    init_from = cfg.get("init_from")
    if init_from is not None and not isinstance(init_from, str):
        _fail("init_from", init_from, "a checkpoint file")
    if t.objective == "scst" and init_from is None and cfg.resume is None:
        raise CaptionError(
            "config: trainer.objective=scst fine-tunes a trained model; "
            "add init_from=<checkpoint> (e.g. a cross-entropy run's checkpoints/best.pt)"
        )
