"""The command line, checked before Hydra composes it, so that a typo costs one clear line.

Hydra refuses an unknown config-group option or key too, but over several lines that end in
its `HYDRA_FULL_ERROR` hint. Every command runs `check_overrides` first: an option that does
not exist is answered with the valid ones, a key that does not exist with the key that was
probably meant. `hydra_command` wires that check, Hydra and `cli_guard` into a command's `main`.
"""

from __future__ import annotations

import difflib
import functools
import sys
from argparse import Namespace
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override, OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from caption.config import CONF_DIR, replaced_key_message
from caption.errors import CaptionError, cli_guard

_MISSING = object()


def check_group_overrides(args: list[str], conf_dir: str | Path = CONF_DIR) -> None:
    """Refuse `group=option` overrides that name no option, listing the valid ones on one line.

    Sweeps (`a,b`) are checked option by option; sweep functions are left to Hydra, as is a
    command line it cannot parse.

    Raises:
        CaptionError: an option of a config group does not exist.
    """
    parsed = _parse(args)
    if parsed is not None:
        _check_options(parsed[1], Path(conf_dir))


def _parse(argv: list[str]) -> tuple[Namespace, list[Override]] | None:
    """Hydra's reading of a command line: its flags and its overrides; None for `--help` or
    syntax that Hydra will report itself."""
    try:
        args = get_args_parser().parse_args(argv)
        return args, OverridesParser.create().parse_overrides(args.overrides)
    except (SystemExit, HydraException):
        return None


def group_options(folder: Path) -> list[str]:
    """The options of a config group, sorted: its YAML files but the `_`-named ones, which
    the options extend (`data/_base.yaml`) and which are no choice by themselves."""
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


def _check_options(overrides: list[Override], root: Path) -> None:
    """Every `group=option` (each option of a plain `a,b` sweep) names a file of its group."""
    for override in overrides:
        key, value = override.key_or_group, override.value()
        folder = root / key
        if key.startswith("hydra") or not folder.is_dir():
            continue
        if isinstance(value, ChoiceSweep) and value.simple_form:
            choices = list(override.sweep_string_iterator())
        elif isinstance(value, str):
            choices = [value]
        else:  # null, or a sweep function such as choice(...) or glob(...)
            continue
        options = group_options(folder)
        for option in choices:
            if option not in options and option not in ("null", ""):
                raise CaptionError(
                    f"config: {key}={option} is not an option of {key}; valid: {', '.join(options)}"
                )


def check_overrides(
    command: str, config_name: str, argv: list[str], conf_dir: str | Path = CONF_DIR
) -> None:
    """Refuse unknown group options and unknown keys of `command`'s config in one line each.

    The config is composed once with the command line's group choices (the first option of a
    sweep), and every `key=value` (or `~key`) override must then name a key it has. `+key` and
    `++key` add keys on purpose and are left alone, as is anything Hydra cannot parse: Hydra's
    own report of it follows.

    Args:
        command: the command's name, for the message (`caption-train`).
        config_name: its primary config in `conf_dir` (`train`).
        argv: the command line after the program name.
        conf_dir: the config folder.

    Raises:
        CaptionError: an option or a key does not exist.
    """
    parsed = _parse(argv)
    if parsed is None:
        return
    args, overrides = parsed
    root = Path(conf_dir)
    _check_options(overrides, root)
    groups = [o for o in overrides if _is_group(o, root)]
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(
                args.config_name or config_name,
                overrides=[_first_choice(o) for o in groups],
                return_hydra_config=True,
            )
    except HydraException:  # e.g. a missing experiment file: Hydra says so itself
        return
    tree = OmegaConf.to_container(cfg, resolve=False)
    for override in overrides:
        if override in groups or override.type in (OverrideType.ADD, OverrideType.FORCE_ADD):
            continue
        key = override.key_or_group
        if _lookup(tree, key) is not _MISSING:
            continue
        group = key.split(".")[0]
        if group not in tree and (root / group).is_dir():  # a group left unchosen (`data: null`)
            options = "|".join(group_options(root / group))
            raise CaptionError(
                f"config: {key} needs a {group} config, and {command} has none by default; "
                f"choose one with {group}=<{options}>"
            )
        raise CaptionError(_unknown_key_message(command, key, list(_paths(tree))))


def _is_group(override: Override, root: Path) -> bool:
    """A config-group choice (`model/attention=hard`, `data=coco`), not a value."""
    key = override.key_or_group
    return "/" in key or (root / key).is_dir() or key.startswith("hydra/")


def _first_choice(override: Override) -> str:
    """The override as `compose` takes it: a sweep stands for its first option."""
    prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++", OverrideType.DEL: "~"}
    value = next(iter(override.sweep_string_iterator())) if override.is_sweep_override() else None
    if value is None:
        return override.input_line
    package = f"@{override.package}" if override.package else ""
    return f"{prefix.get(override.type, '')}{override.key_or_group}{package}={value}"


def _lookup(tree: Any, key: str) -> Any:
    """The value at dotted `key` in a plain container tree, or `_MISSING`."""
    node = tree
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _paths(tree: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a plain container tree, inner nodes included."""
    if not isinstance(tree, dict):
        return
    for name, value in tree.items():
        path = f"{prefix}{name}"
        yield path
        yield from _paths(value, f"{path}.")


def _unknown_key_message(command: str, key: str, paths: list[str]) -> str:
    """`key` is not in the config; what replaced it, or the nearest existing key if one is close.

    Nearest means, in this order: a key beside it with a similar name (`trainer.max_epoch`),
    the same name elsewhere (`max_epochs` for `trainer.max_epochs`), a similar full path.
    """
    replaced = replaced_key_message(key)
    if replaced:
        return replaced
    parent, _, leaf = key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    siblings = {p[len(prefix) :]: p for p in paths if p.startswith(prefix) and p != parent}
    siblings = {name: p for name, p in siblings.items() if "." not in name}
    close = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)]
    others = [p for p in paths if not key.startswith(f"{p}.") and not p.startswith("hydra.")]
    close = close or [p for p in others if p.rpartition(".")[2] == leaf]
    close = close or difflib.get_close_matches(key, others, n=1, cutoff=0.8)
    hint = f"did you mean {close[0]}?" if close else f"see its keys with `{command} --cfg job`"
    return f"config: {key} is not a key of {command}'s config; {hint}"


def hydra_command(command: str, config_name: str) -> Callable[[Callable[[DictConfig], Any]], Any]:
    """Make a command's `main()` from its body `fn(cfg)`: check the command line, then run
    `fn` under Hydra, every `CaptionError` reported in one line.

    Args:
        command: the console script's name, for messages.
        config_name: its primary config in `conf/`.
    """

    def decorate(fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        hydra_main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(
            cli_guard(fn)
        )

        @cli_guard
        @functools.wraps(fn)
        def main() -> Any:
            check_overrides(command, config_name, sys.argv[1:])
            return hydra_main()

        return main

    return decorate
