"""Writing files so that a crash never leaves a half-written one behind, and a failed write
(a full disk, a quota, a read-only or forbidden folder) is one clear line, not a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from caption.errors import CaptionError, first_line

# What to do about a failure, by its errno; others get DEFAULT_ADVICE.
_ADVICE = {
    errno.ENOSPC: "free some space and run again",
    errno.EDQUOT: "free some space (or raise the quota) and run again",
    errno.EFBIG: "write to a file system that takes larger files",
    errno.EROFS: "write to a writable folder",
    errno.EACCES: "write to a folder you may write to",
    errno.EPERM: "write to a folder you may write to",
}
DEFAULT_ADVICE = "check the disk and run again"
# torch's zip writer (PyTorchStreamWriter) raises RuntimeError, not OSError, when a write
# under it fails; its messages name the writer or its source file.
_TORCH_WRITER = ("PytorchStreamWriter", "inline_container")


class WriteError(CaptionError):
    """A file could not be written: its path, why, and what to do.

    Attributes:
        path: the file (or folder) that could not be written.
        reason: why, e.g. `no space left on device`.
        errno: the OSError's number, when there was one.
    """

    def __init__(self, path: str | Path, reason: str, hint: str, code: int | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        self.errno = code
        super().__init__(f"{path}: cannot be written ({reason}); {hint}")

    def with_hint(self, hint: str) -> WriteError:
        """The same failure with other advice (a caller that knows how to continue)."""
        return WriteError(self.path, self.reason, hint, self.errno)


def advice(code: int | None) -> str:
    """The usual advice for a failed write with this errno."""
    return _ADVICE.get(code, DEFAULT_ADVICE) if code is not None else DEFAULT_ADVICE


def write_failure(e: BaseException, folder: Path | None = None) -> tuple[str, int | None] | None:
    """Why a write failed, as `(reason, errno)`, or None when `e` is no write failure.

    The OSError may be `e` itself, or what `e` was raised from or while handling: torch's zip
    writer raises `RuntimeError: ... unexpected pos` while the OSError of the underlying write
    is being handled. A writer's RuntimeError with no OSError behind it counts too; it is
    called a full disk when `folder` has no space left.
    """
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno is not None:
            reason = cause.strerror or os.strerror(cause.errno)
            return reason[:1].lower() + reason[1:], cause.errno
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_WRITER):
        if folder is not None and _no_space(folder):
            return os.strerror(errno.ENOSPC).lower(), errno.ENOSPC
        return f"torch's writer failed: {first_line(e, 120)}", None
    return None


def _no_space(folder: Path) -> bool:
    with contextlib.suppress(OSError):
        st = os.statvfs(folder)
        return st.f_bavail == 0
    return False


@contextlib.contextmanager
def advised(hint: Callable[[WriteError], str]) -> Iterator[None]:
    """Give a `WriteError` raised in the block the advice `hint(error)`, worked out when it
    happens: a caller that knows how to continue (the intact checkpoint, the files already
    written) says so instead of the usual advice."""
    try:
        yield
    except WriteError as e:
        raise e.with_hint(hint(e)) from e.__cause__


@contextlib.contextmanager
def reported_write(path: str | Path, hint: str | None = None) -> Iterator[None]:
    """Turn a failed write in the block into a one-line `WriteError` about `path`.

    Args:
        path: what the block writes, named in the message.
        hint: what to do; by default the usual advice for the failure (`advice`).
    """
    try:
        yield
    except CaptionError:
        raise
    except Exception as e:
        failure = write_failure(e, Path(path).parent)
        if failure is None:
            raise
        reason, code = failure
        raise WriteError(path, reason, hint or advice(code), code) from e


@contextlib.contextmanager
def atomic_file(
    path: str | Path, mode: str = "w", *, private: bool = False, hint: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path` for writing; rename it over `path` when the block
    ends, or delete it if the block raises.

    Readers see the old file or the new one, never a part: the data is flushed to disk before
    the rename, and a rename within a folder is atomic. A write that fails (ENOSPC, EDQUOT,
    EROFS, EACCES, ..., or torch's writer failing under them) raises a `WriteError` naming
    `path`; the old file stands and the temporary one is gone.

    Args:
        path: the file to write; its folder is created.
        mode: `w` (text, UTF-8) or `wb`.
        private: keep the temporary file's owner-only permissions (checkpoints); otherwise the
            file gets the usual ones, 0666 less the umask.
        hint: what the error says to do; by default the usual advice for the failure.
    """
    path = Path(path)
    with reported_write(path, hint):
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
            remove_quietly(Path(tmp))
            raise


def remove_quietly(path: Path) -> None:
    """Delete a temporary file if it is there; a failure to (a folder gone read-only) must not
    hide the error that is being reported."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


class PartialLines:
    """A file of lines written as they come, under `<path>.partial` until it is complete.

    Each `write` goes to disk at once (a long job's results so far survive a crash); the file
    gets its real name only when the block ends without error, so a reader never takes a cut
    file for a whole one. A write that fails cuts the partial file back to its last whole
    line and raises a `WriteError` saying how many lines it keeps.

    Args:
        path: the file to write in the end; an old one stays until the new one is complete.
        what: what a line holds, for the message (`captions`).
    """

    def __init__(self, path: str | Path, what: str = "lines") -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.what = what
        self.lines = 0
        self._size = 0  # bytes of whole lines on disk
        self._fd = -1

    def __enter__(self) -> PartialLines:
        with reported_write(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        return self

    def write(self, lines: list[str]) -> None:
        """Append `lines` (each ending in a newline) and hand them to the OS."""
        data = "".join(lines).encode()
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            with contextlib.suppress(OSError):  # cutting needs no space
                os.ftruncate(self._fd, self._size)
            raise WriteError(self.path, *self._failure(e)) from e
        self._size += len(data)
        self.lines += len(lines)

    def _failure(self, e: OSError) -> tuple[str, str, int | None]:
        reason, code = write_failure(e) or (str(e), None)
        if not self.lines:
            return reason, advice(code), code
        kept = f"the first {self.lines} {self.what} are in {self.partial}"
        return reason, f"{kept}: {advice(code)}", code

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        fd, self._fd = self._fd, -1
        try:
            if kind is None:
                with reported_write(self.path):
                    os.fsync(fd)
                    os.replace(self.partial, self.path)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
            if kind is not None and not self.lines:  # nothing worth keeping
                remove_quietly(self.partial)
