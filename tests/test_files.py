"""Atomic file writes and one-line error reasons, shared by checkpoints, reports and metrics."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from caption.errors import first_line
from caption.files import atomic_file


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "report.html"
    with atomic_file(path) as f:  # the folder is created
        f.write("first")
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write("half of the sec")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "first"  # the old file stands
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]  # no temp left


def test_atomic_file_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "shared.txt") as f:
            f.write("x")
        with atomic_file(tmp_path / "private.pt", "wb", private=True) as f:
            f.write(b"x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "shared.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.pt").stat().st_mode) == 0o600


def test_first_line() -> None:
    assert first_line(ValueError("  bad value\n  Traceback details\n")) == "bad value"
    assert first_line(ValueError("a" * 300), 160) == "a" * 160
    assert first_line(KeyError()) == "KeyError"  # no message: the type's name
