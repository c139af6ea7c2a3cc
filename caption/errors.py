"""One error type for bad input, and the guard that turns it into one clear line."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any


class CaptionError(Exception):
    """Bad input from the user: a path, a file, a config value or a checkpoint.

    The message is one line that names the thing and says what to do. The command-line
    tools print it without a traceback and exit with status 2.
    """


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), cut to
    `limit` characters, for a one-line error."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line[:limit]


def cli_guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command's body and report a `CaptionError` as `error: <message>` on stderr."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CaptionError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            # SystemExit is not an Exception, so Hydra's error reporter lets it through.
            sys.exit(2)

    return wrapper
