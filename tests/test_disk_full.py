"""A full disk (or another failed write) is one line naming the file, never a traceback.

Most tests write to a real, tiny tmpfs: torch's zip writer and NumPy's memory map fail in
their own ways partway through (a chained RuntimeError; a SIGBUS), which a mocked OSError
would not show. Mounting needs root (CI runs as root); elsewhere those tests are skipped.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from caption.checkpoint import load_checkpoint, save_checkpoint
from caption.cli.evaluate import evaluate
from caption.cli.generate import generate
from caption.cli.visualize import visualize
from caption.data.dataset import ImageBank
from caption.data.features import FeatureBank
from caption.data.formats import read_karpathy
from caption.data.vocab import Vocabulary
from caption.files import WriteError, atomic_file, write_failure
from caption.logfile import RunLogFile
from caption.models.build import build_model
from caption.models.encoder import Encoder
from tests.helpers import ROOT
from tests.helpers.cli import run
from tests.helpers.config import TINY_MODEL, compose_config

Mount = Callable[[int], Path]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Mount]:
    """`small_fs(kib)` mounts a fresh tmpfs of that size and returns its folder; every one is
    unmounted when the test ends."""
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        folder = tmp_path / f"fs{len(mounted)}"
        folder.mkdir()
        try:
            proc = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                capture_output=True,
                text=True,
            )
        except FileNotFoundError:
            pytest.skip("no mount command here: these tests mount a small tmpfs")
        if proc.returncode != 0:
            pytest.skip(f"mounting a tmpfs was refused (needs root): {proc.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


def fill(folder: Path, leave: int = 0) -> None:
    """Write a ballast file into `folder` until its file system is full (less `leave` bytes)."""
    fd = os.open(folder / "ballast", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    if leave:
        size = (folder / "ballast").stat().st_size
        os.truncate(folder / "ballast", max(0, size - leave))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name or "partial" in p.name)


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and text.strip() == text
    return text


# --- the writer itself -----------------------------------------------------------------------


def test_checkpoint_larger_than_the_free_space(small_fs: Mount) -> None:
    folder = small_fs(256)
    path = folder / "checkpoints" / "last.pt"
    save_checkpoint(path, weights=torch.zeros(1000), progress={"step": 10})
    with pytest.raises(WriteError) as caught:  # 2 MB into 256 kB: torch's writer fails midway
        save_checkpoint(path, weights=torch.zeros(500_000), progress={"step": 20})
    message = one_line(caught.value)
    assert message.startswith(f"{path}: cannot be written (no space left on device); ")
    assert load_checkpoint(path)["progress"]["step"] == 10  # the previous one is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp left


def test_text_file_on_a_full_disk(small_fs: Mount) -> None:
    folder = small_fs(64)
    path = folder / "metrics.jsonl"
    with atomic_file(path) as f:
        f.write('{"epoch": 1}\n')
    fill(folder)
    with (
        pytest.raises(WriteError, match=r"\(no space left on device\); free some space"),
        atomic_file(path) as f,
    ):
        f.write('{"epoch": 1}\n{"epoch": 2}\n' * 1000)
    assert path.read_text() == '{"epoch": 1}\n'
    assert leftovers(folder) == []


def test_read_only_folder(small_fs: Mount) -> None:
    folder = small_fs(64)
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    with (
        pytest.raises(WriteError, match=r"\(read-only file system\); write to a writable folder"),
        atomic_file(folder / "sub" / "report.html") as f,
    ):
        f.write("x")


def test_cleanup_that_fails_does_not_hide_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    with (
        pytest.raises(WriteError, match=r"\(disk quota exceeded\); free some space"),
        atomic_file(tmp_path / "x.json") as f,
    ):
        f.write("x")
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))


def test_write_failure_reads_through_torch_and_leaves_other_errors(tmp_path: Path) -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None
    except RuntimeError as e:
        assert e.__cause__ is None  # `from None` hides the context from tracebacks only
        assert write_failure(e) == ("no space left on device", errno.ENOSPC)
    assert write_failure(RuntimeError("PytorchStreamWriter failed writing file data/0"))
    assert write_failure(ValueError("a bug, not a write")) is None
    with pytest.raises(ValueError), atomic_file(tmp_path / "x"):
        raise ValueError("a bug")  # not reported as a write failure
    assert list(tmp_path.iterdir()) == []


def test_run_log_on_a_full_disk_is_one_warning(
    small_fs: Mount, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = small_fs(16)
    handler = RunLogFile(folder / "train.log")
    logger = logging.getLogger("test_disk_full.log")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("before")
        fill(folder)
        for i in range(200):  # pages past the first need room there is not
            logger.warning("line %d %s", i, "x" * 60)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert capsys.readouterr().err == (
        f"warning: {folder / 'train.log'}: cannot be written (no space left on device); "
        "the log continues on stderr only\n"
    )
    assert (folder / "train.log").read_text().startswith("before\n")


# --- caption-train end to end ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.cli
def test_train_on_a_disk_that_fills_up_then_resume(
    small_fs: Mount, tiny_shapes: Path, tmp_path: Path
) -> None:
    args = [
        f"data.annotations={tiny_shapes}",
        f"data.images={tiny_shapes.parent}",
        "data.batch_size=16",
        "trainer.max_epochs=1",
        "trainer.checkpoint_every=2",
        "trainer.progress=false",
        "trainer.device=cpu",
        "data.preload=false",
        *TINY_MODEL,
    ]
    sizing = tmp_path / "sizing"  # a first run measures one checkpoint
    run("caption-train", *args, f"hydra.run.dir={sizing}", "trainer.max_steps=2")
    size = (sizing / "checkpoints" / "last.pt").stat().st_size
    # One checkpoint and the run's small files fit; a second beside it (its temp) does not.
    folder = small_fs((size * 3 // 2 + 64 * 1024) // 1024)
    run_dir = folder / "run"
    proc = run("caption-train", *args, f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("[")]
    last = run_dir / "checkpoints" / "last.pt"
    assert errors == [
        f"error: {last}: cannot be written (no space left on device); {last}, from step 2, "
        f"is intact: once there is room, continue with caption-train resume={run_dir}"
    ]
    assert load_checkpoint(last)["progress"]["step"] == 2
    assert leftovers(run_dir) == []

    subprocess.run(["mount", "-o", "remount,size=16m", str(folder)], check=True)  # room again
    again = run("caption-train", *args, f"hydra.run.dir={run_dir}", f"resume={run_dir}")
    assert "at epoch 0, step 2 " in again.stderr  # resumed where the intact checkpoint was
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["steps"] == 24  # 64 images x 6 captions / 16
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1


# --- the feature cache ----------------------------------------------------------------------

CACHE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from caption.data.dataset import ImageBank
    from caption.data.features import FeatureBank
    from caption.data.formats import read_karpathy
    from caption.errors import CaptionError
    from caption.models.encoder import Encoder

    torch.manual_seed(0)
    encoder = Encoder("small_cnn", fine_tune=False, channels=[8, 64])
    bank = ImageBank(read_karpathy(sys.argv[1])["train"], image_size=64, preload=False)
    try:
        cached = FeatureBank.build(encoder, bank, sys.argv[2], dtype="float32", batch_size=8)
    except CaptionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    with torch.no_grad():
        live = encoder(bank[5][None].float() / 255)[0]
    torch.testing.assert_close(cached[5], live)
    print(cached.folder)
    """
)


def build_cache(tiny_shapes: Path, root: Path) -> subprocess.CompletedProcess:
    """Build the cache in a subprocess: a memory map written on a full disk dies of SIGBUS."""
    return subprocess.run(
        [sys.executable, "-c", CACHE_SCRIPT, str(tiny_shapes), str(root)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_feature_cache_on_a_full_disk(small_fs: Mount, tiny_shapes: Path) -> None:
    folder = small_fs(256)  # 64 images x 16x16 x 64 float32 = 4 MB: it cannot fit
    root = folder / "cache"
    proc = build_cache(tiny_shapes, root)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: data.feature_cache_dir: {root}/")
    assert "no space left on device" in proc.stderr
    assert "data.feature_cache_dir=<a folder with room>" in proc.stderr
    assert not list(root.rglob("features.npy")) and leftovers(folder) == []

    subprocess.run(["mount", "-o", "remount,size=16m", str(folder)], check=True)
    proc = build_cache(tiny_shapes, root)
    assert proc.returncode == 0, proc.stderr[-2000:]  # built now, and equal to the live vectors
    assert leftovers(folder) == []


def test_half_written_cache_entry_is_not_trusted(tiny_shapes: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = Encoder("small_cnn", fine_tune=False, channels=[8, 16])
    bank = ImageBank(read_karpathy(tiny_shapes)["val"], image_size=64, preload=False)
    with torch.no_grad():
        live = encoder(torch.stack([bank[i] for i in range(len(bank))]).float() / 255)
    entry = FeatureBank.build(encoder, bank, tmp_path, dtype="float32").folder
    features = entry / "features.npy"
    size = features.stat().st_size
    # A build killed before its rename: only the temporary file, garbage in it, is there.
    os.replace(features, entry / "features.tmp.npy")
    np.save(entry / "features.tmp.npy", np.full((len(bank), *live.shape[1:]), 7.0, np.float32))
    cached = FeatureBank.build(encoder, bank, tmp_path, dtype="float32")
    torch.testing.assert_close(cached[3], live[3])  # rebuilt, not read
    del cached
    # A file cut short afterwards (a copy that ran out of room): rebuilt, not mapped.
    os.truncate(features, size // 2)
    cached = FeatureBank.build(encoder, bank, tmp_path, dtype="float32")
    assert features.stat().st_size == size
    torch.testing.assert_close(cached[len(bank) - 1], live[-1])
    assert sorted(p.name for p in entry.iterdir()) == ["features.npy", "meta.json"]


# --- caption-generate, caption-evaluate, caption-visualize -----------------------------------


@pytest.fixture(scope="module")
def checkpoint(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny captioner's checkpoint: what a command loads, made in a moment."""
    cfg = compose_config(
        "train",
        [
            f"data.annotations={tiny_shapes}",
            f"data.images={tiny_shapes.parent}",
            "run_dir=unused",
            *TINY_MODEL,
        ],
    )
    records = read_karpathy(tiny_shapes)["train"]
    vocab = Vocabulary.build(c for r in records for c in r.captions)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(vocab))
    path = tmp_path_factory.mktemp("checkpoint") / "model.pt"
    config = OmegaConf.to_container(cfg, resolve=True)
    save_checkpoint(path, model=model.state_dict(), config=config, vocab=vocab.itos)
    return path


def test_generate_keeps_the_whole_lines_it_wrote(
    small_fs: Mount, checkpoint: Path, tiny_shapes: Path, tmp_path: Path
) -> None:
    args = [
        f"checkpoint={checkpoint}",
        f"images={tiny_shapes.parent / 'images'}",
        "strategy=greedy",
        "max_len=8",
        "batch_size=8",
        "device=cpu",
    ]
    roomy = tmp_path / "all.jsonl"
    done = generate(compose_config("generate", [*args, f"output={roomy}"]))
    total = len(roomy.read_text().splitlines())
    assert total == done["captioned"] == 96 and leftovers(tmp_path) == []

    folder = small_fs(8)
    fill(folder, leave=4096)  # one page: some dozens of the 96 lines
    out = folder / "captions.jsonl"
    with pytest.raises(WriteError) as caught:
        generate(compose_config("generate", [*args, f"output={out}"]))
    message = one_line(caught.value)
    partial = folder / "captions.jsonl.partial"
    match = re.fullmatch(
        rf"{out}: cannot be written \(no space left on device\); the first (\d+) captions "
        rf"are in {partial}: free some space and run again",
        message,
    )
    assert match, message
    lines = partial.read_text().splitlines(keepends=True)
    assert 0 < len(lines) == int(match[1]) < total
    assert all(line.endswith("\n") and json.loads(line)["caption"] for line in lines)
    assert lines == roomy.read_text().splitlines(keepends=True)[: len(lines)]
    assert not out.exists()  # nothing under the real name that could pass for complete


def test_evaluate_says_which_files_it_wrote(
    small_fs: Mount, checkpoint: Path, tiny_shapes: Path, tmp_path: Path
) -> None:
    folder = small_fs(64)
    fill(folder)
    metrics = tmp_path / "eval_test.json"
    coco = folder / "coco.json"
    cfg = compose_config(
        "evaluate",
        [
            f"checkpoint={checkpoint}",
            f"output={metrics}",
            f"coco_results={coco}",
            "split=test",
            "strategy=greedy",
            "max_len=8",
            "coco_metrics=false",
            "device=cpu",
        ],
    )
    with pytest.raises(WriteError) as caught:
        evaluate(cfg)
    assert one_line(caught.value) == (
        f"{coco}: cannot be written (no space left on device); free some space and run "
        f"again, or pass coco_results=<another file>; {metrics} written"
    )
    assert json.loads(metrics.read_text())["n_images"] == 16  # the first file is whole
    assert not coco.exists() and leftovers(folder) == []


def test_visualize_says_how_many_figures_it_wrote(
    small_fs: Mount, checkpoint: Path, tiny_shapes: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    one = (tiny_shapes.parent / "images" / "test_00000.png").read_bytes()
    for name in "abc":  # the same image thrice: three figures of the same size
        (images / f"{name}.png").write_bytes(one)
    args = [f"checkpoint={checkpoint}", f"images={images}", "strategy=greedy", "max_len=4"]
    args += ["dpi=40", "device=cpu"]
    roomy = tmp_path / "figures"
    visualize(compose_config("visualize", [*args, f"output_dir={roomy}"]))
    size = (roomy / "a.png").stat().st_size
    folder = small_fs(-(-size * 5 // 2 // 4096) * 4)  # room for two figures, not three
    out = folder / "figures"
    with pytest.raises(WriteError) as caught:
        visualize(compose_config("visualize", [*args, f"output_dir={out}"]))
    assert one_line(caught.value) == (
        f"{out / 'c.png'}: cannot be written (no space left on device); 2 figure(s) before "
        f"it are in {out}: free some space and run again"
    )
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    assert (out / "b.png").read_bytes() == (roomy / "b.png").read_bytes()
