"""The console scripts: run one in a subprocess, and the decoding tools' config checks."""

from __future__ import annotations

import os
import subprocess

from caption.cli.evaluate import evaluate
from caption.cli.generate import generate
from caption.cli.serve import check_serve_config
from caption.cli.visualize import visualize
from tests.helpers import BIN, ROOT

# The tools that decode, each with the function that checks its config and the overrides it
# needs beside checkpoint=: for tests of the decoding settings every one of them shares.
DECODING_TOOLS = [
    ("generate", generate, ["images=x"]),
    ("evaluate", evaluate, []),
    ("visualize", visualize, ["images=x", "output_dir=x"]),
    ("serve", check_serve_config, []),
]


def run(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run one of the console scripts in a subprocess from the repository root."""
    proc = subprocess.run(
        [str(BIN / tool), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc
