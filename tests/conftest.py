"""Shared fixtures: a tiny generated shapes set and Hydra-composed configs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from caption.browser import CHROMIUM, launch_chromium
from caption.checkpoint import load_checkpoint, save_checkpoint
from caption.cli.evaluate import evaluate
from caption.cli.generate import generate
from caption.cli.serve import check_serve_config
from caption.cli.visualize import visualize
from caption.data.shapes import generate_shapes
from caption.data.vocab import END_ID

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
BIN = Path(sys.executable).parent  # the venv's console scripts

# A model small enough for a test to train in seconds, with the default architecture
# (no `model.score.*` keys: they differ between score functions).
TINY_MODEL = [
    "model.embed_dim=16",
    "model.hidden_dim=32",
    "model.encoder.channels=[8,16,16]",
]
# Smaller still, for float64 references and exact enumeration: two stride-2 layers, no
# dropout, no penalty (an 8 px image gives a 2x2 grid, 16 px a 4x4 one).
NANO_MODEL = [
    "model.embed_dim=8",
    "model.hidden_dim=8",
    "model.score.hidden_dim=8",
    "model.encoder.channels=[4,4]",
    "model.dropout=0",
    "model.doubly_stochastic=0",
]
# Hard attention whose surrogate's expected gradient is the exact gradient of L_s: every
# caption samples its locations, λ_r = 1, λ_e = 0.
EXACT_HARD = [
    "model/attention=hard",
    "model.attention.expectation_prob=0",
    "model.attention.reward_weight=1.0",
    "model.attention.entropy_weight=0",
]

# The tools that decode, each with the function that checks its config and the overrides it
# needs beside checkpoint=: for tests of the decoding settings every one of them shares.
DECODING_TOOLS = [
    ("generate", generate, ["images=x"]),
    ("evaluate", evaluate, []),
    ("visualize", visualize, ["images=x", "output_dir=x"]),
    ("serve", check_serve_config, []),
]


def compose_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose `conf/<name>.yaml` the way the command-line tool would."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides or [])


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and lose several-fold on a busy
    machine: a module that asks for this runs on one thread, then gives the count back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64/16/16-image shapes set; returns its Karpathy JSON."""
    return generate_shapes(
        tmp_path_factory.mktemp("shapes"), n_train=64, n_val=16, n_test=16, seed=1
    )


@pytest.fixture
def train_cfg(tiny_shapes: Path, tmp_path: Path) -> DictConfig:
    """The default training config on the tiny set, one quick epoch, run dir in tmp_path."""
    return compose_config(
        "train",
        [
            f"data.annotations={tiny_shapes}",
            f"data.images={tiny_shapes.parent}",
            f"run_dir={tmp_path / 'run'}",
            "data.batch_size=16",
            "trainer.max_epochs=1",
            "trainer.progress=false",
            "trainer.device=cpu",
            *TINY_MODEL,
        ],
    )


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


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generate a tiny shapes set with the module CLI and train on it with caption-train.

    Session-scoped: the CLI, visualizer and notebook tests share one tiny run. Returns the
    folder holding `shapes/` and `run/`.
    """
    root = tmp_path_factory.mktemp("e2e")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "caption.data.shapes",
            "--output",
            str(root / "shapes"),
            "--train",
            "48",
            "--val",
            "8",
            "--test",
            "8",
            "--seed",
            "2",
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    run(
        "caption-train",
        f"data.annotations={root / 'shapes' / 'dataset_shapes.json'}",
        f"data.images={root / 'shapes'}",
        f"hydra.run.dir={root / 'run'}",
        "trainer.max_epochs=2",
        "trainer.max_steps=6",
        "data.batch_size=16",
        "trainer.progress=false",
        "trainer.device=cpu",
        *TINY_MODEL,
    )
    _never_end(root / "run" / "checkpoints" / "best.pt")
    return root


def _never_end(path: Path) -> None:
    """Make `<end>` impossible in a checkpoint's output layer.

    Six steps leave the decoder near uniform, and there the likeliest caption, which beam
    search rightly finds, is the empty one: every word costs about log V. The pages, panels
    and words the end-to-end tests check need captions with words.
    """
    ckpt = load_checkpoint(path)
    ckpt["model"]["decoder.L_o.bias"][END_ID] = float("-inf")
    save_checkpoint(path, **{k: v for k, v in ckpt.items() if k not in ("format", "version")})


# --- a real headless browser: Debian's chromium, driven by Playwright ----------------------


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """A headless Chromium context with a fresh profile that may reach only this machine.

    Every request to anything but a file, 127.0.0.1 or an inline data/blob URL is aborted and
    recorded in `browser.outside`, so a test can assert that a page loads nothing from outside.
    """
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: `make test` installs Debian's chromium "
            "(apt-get install chromium), or set CAPTION_CHROMIUM=<path>"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = launch_chromium(p, tmp_path_factory.mktemp("chromium-profile"))
        context.outside = []

        def only_local(route) -> None:
            url = route.request.url
            if url.startswith(("file://", "data:", "blob:", "http://127.0.0.1:")):
                route.continue_()
            else:
                context.outside.append(url)
                route.abort()

        context.route("**/*", only_local)
        yield context
        context.close()
