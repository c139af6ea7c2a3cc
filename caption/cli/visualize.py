"""`caption-visualize`: caption images and draw their attention, one PNG each or one report.

    caption-visualize checkpoint=outputs/demo/checkpoints/best.pt \\
        images='data/shapes/images/test_0000?.png' output_dir=outputs/demo/attention

The figures are `caption.views.figures.attention_figure`; `format=html` writes the
self-contained report of `caption.views.report` instead (see conf/visualize.yaml).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from caption.config import check_choice, check_decoding, check_int, decoding_options, resolve_device
from caption.data.formats import read_split
from caption.data.images import expand_images
from caption.data.records import SPLITS
from caption.errors import CaptionError
from caption.evaluation.decode import caption_files
from caption.files import advice, advised, atomic_file
from caption.models.build import load_captioner
from caption.overrides import hydra_command
from caption.runtime import configure_cpu
from caption.views import report
from caption.views.attention import AttentionView, attention_views, shown_image
from caption.views.figures import attention_figure

log = logging.getLogger(__name__)


def _output_name(path: Path, taken: set[str]) -> str:
    """`<stem>.png`, or `<stem>_<k>.png` when another input had the same stem."""
    name, k = f"{path.stem}.png", 1
    while name in taken:
        name, k = f"{path.stem}_{k}.png", k + 1
    taken.add(name)
    return name


def _inputs(cfg: DictConfig, train_data: DictConfig) -> tuple[list[Path], dict[Path, Any]]:
    """The image files to caption, and their reference captions where a dataset split names them.

    `images=` is a file, folder or glob (no references); `split=` takes a split of `annotations=`
    or, by default, of the checkpoint's own dataset, with its references.
    """
    if (cfg.images is None) == (cfg.split is None):
        raise CaptionError(
            "caption-visualize: pass either images=<file|folder|glob> or split=<train|val|test>"
        )
    if cfg.images is not None:
        files = expand_images(cfg.images)
        references: dict[Path, Any] = {}
    else:
        check_choice(cfg, "split", SPLITS)
        if cfg.annotations:
            source: Any = {"annotations": cfg.annotations, "images": cfg.image_root}
        else:
            source = train_data
        records = read_split(source, cfg.split, "auto")
        files = [r.path for r in records]
        references = {r.path: r.captions for r in records}
    check_int(cfg, "max_images", 1, optional=True)
    return (files[: cfg.max_images] if cfg.max_images else files), references


def visualize(cfg: DictConfig) -> dict[str, Any]:
    """Caption images and draw their attention: one PNG each, or one self-contained HTML report.

    The images are `cfg.images` (a file, folder or glob) or a dataset split (`cfg.split`),
    whose reference captions and per-image BLEU then join the report. Bad image files are
    reported on stderr and skipped; the others are still drawn. Each written file's path is
    printed on stdout (the report's with its size).

    Returns:
        `{"written": [paths], "failed": [paths]}`.
    """
    _check_config(cfg)
    device = resolve_device(cfg.device)
    configure_cpu()
    model, vocab, train_cfg = load_captioner(cfg.checkpoint, device)
    files, references = _inputs(cfg, train_cfg.data)
    output_dir = Path(cfg.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CaptionError(
            f"output_dir: cannot create {output_dir} ({e.strerror}); pass a writable folder"
        ) from None
    html = cfg.format == "html"
    written: list[str] = []
    failed: list[str] = []
    items: list[dict[str, Any]] = []
    taken: set[str] = set()
    batches = caption_files(
        model,
        files,
        failed,
        batch_size=cfg.batch_size,
        device=device,
        max_pixels=cfg.max_image_pixels,
        **decoding_options(cfg),
    )
    for good, gen in batches:
        for path, view in zip(good, attention_views(model, vocab, gen), strict=True):
            if html:
                items.append(
                    report.report_item(
                        path,
                        view,
                        references.get(path),
                        normalize=cfg.normalize,
                        max_side=cfg.image_max_side,
                        max_pixels=cfg.max_image_pixels,
                    )
                )
            else:
                _write_figure(cfg, path, view, output_dir / _output_name(path, taken), written)
    if html:
        _write_report(cfg, items, failed, output_dir, written)
    log.info(
        "wrote %s to %s%s",
        f"a report of {len(items)} images" if html else f"{len(written)} attention figure(s)",
        output_dir,
        f", {len(failed)} image(s) failed" if failed else "",
    )
    return {"written": written, "failed": failed}


def _check_config(cfg: DictConfig) -> None:
    """The values `caption-visualize` needs, each checked with a one-line error."""
    check_decoding(cfg)
    check_choice(cfg, "format", ("png", "html"))
    check_int(cfg, "columns", 1)
    check_int(cfg, "dpi", 10)
    check_int(cfg, "page_size", 1)
    check_int(cfg, "image_max_side", 16)
    check_int(cfg, "max_image_pixels", 1, optional=True)
    check_choice(cfg, "normalize", ("shared", "panel"))


def _write_figure(
    cfg: DictConfig, path: Path, view: AttentionView, target: Path, written: list[str]
) -> None:
    """Draw one image's attention figure and write it to `target` as a PNG."""
    shown = np.asarray(shown_image(path, 512, cfg.max_image_pixels))  # not full size
    fig = attention_figure(
        shown,
        view.words,
        view.alphas,
        view.grid,
        betas=view.betas,
        locations=view.locations,
        windows=view.windows,
        normalize=cfg.normalize,
        columns=cfg.columns,
    )
    with _reported(written, target.parent), atomic_file(target, "wb") as f:
        fig.savefig(f, format="png", dpi=cfg.dpi, facecolor="white")
    written.append(str(target))
    print(target, flush=True)


def _write_report(
    cfg: DictConfig,
    items: list[dict[str, Any]],
    failed: list[str],
    output_dir: Path,
    written: list[str],
) -> None:
    """Write the HTML report of `items` to `output_dir / cfg.report_file`."""
    decoding = f"beam {cfg.beam_size}" if cfg.strategy == "beam" else cfg.strategy
    decoding += ", <unk> allowed" if cfg.allow_unk else ""
    source = f"{cfg.split} split" if cfg.split else str(cfg.images)
    target = output_dir / cfg.report_file
    with _reported(written, output_dir):
        size = report.write_report(
            target,
            items,
            title=f"Attention of {Path(cfg.checkpoint).name} on {source}",
            subtitle=f"{cfg.checkpoint} · {decoding} · {len(items)} images"
            + (f" · {len(failed)} unreadable" if failed else ""),
            page_size=cfg.page_size,
        )
    written.append(str(target))
    print(f"{target} ({size / 1e6:.1f} MB, {len(items)} images)", flush=True)


def _reported(written: list[str], output_dir: Path) -> contextlib.AbstractContextManager:
    """A failed write of a figure or the report, with what was written before it."""
    done = f"{len(written)} figure(s) before it are in {output_dir}: " if written else ""
    return advised(lambda e: f"{done}{advice(e.errno)}")


@hydra_command("caption-visualize", "visualize")
def main(cfg: DictConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, even where a display exists
    result = visualize(cfg)
    if result["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
