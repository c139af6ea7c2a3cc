"""The run's log file (`<run dir>/<job>.log`), which a full disk must not turn into tracebacks."""

from __future__ import annotations

import contextlib
import logging
import sys

from caption.files import write_failure


class RunLogFile(logging.FileHandler):
    """A `logging.FileHandler` that gives up in one line when its file cannot be written.

    The stock handler prints a traceback to stderr for each record it fails to write: on a
    full disk, one per log line, burying the error that matters. This one says once that the
    file stopped, then writes no more to it; the console handler still shows every line.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        e = sys.exc_info()[1]
        failure = write_failure(e) if isinstance(e, Exception) else None
        if failure is None:  # a bad format string, say: the usual report
            super().handleError(record)
            return
        self.failed = True
        print(
            f"warning: {self.baseFilename}: cannot be written ({failure[0]}); "
            "the log continues on stderr only",
            file=sys.stderr,
            flush=True,
        )
        with contextlib.suppress(OSError):  # its buffer cannot be flushed either
            self.close()
