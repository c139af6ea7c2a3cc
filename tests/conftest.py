"""Shared fixtures: a tiny generated shapes set, a tiny trained run, configs, a browser.

Plain helpers (paths, `compose_config`, `run`, model sizes) are in tests/helpers/.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from caption.checkpoint import load_checkpoint, save_checkpoint
from caption.data.shapes import generate_shapes
from caption.data.vocab import END_ID
from tests.helpers import ROOT
from tests.helpers.browser import CHROMIUM, launch_chromium
from tests.helpers.cli import run
from tests.helpers.config import TINY_MODEL, compose_config


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
