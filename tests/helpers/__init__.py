"""Plain helpers the tests (and bench/) share; pytest fixtures stay in tests/conftest.py.

No test file imports another test file: what two of them need lives here.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
BIN = Path(sys.executable).parent  # the venv's console scripts
