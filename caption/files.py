"""Writing files so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", *, private: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path` for writing; rename it over `path` when the block
    ends, or delete it if the block raises.

    Readers see the old file or the new one, never a part: the data is flushed to disk before
    the rename, and a rename within a folder is atomic.

    Args:
        path: the file to write; its folder is created.
        mode: `w` (text, UTF-8) or `wb`.
        private: keep the temporary file's owner-only permissions (checkpoints); otherwise the
            file gets the usual ones, 0666 less the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if not private:  # mkstemp makes 0600 files
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
