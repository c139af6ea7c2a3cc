"""Attention figures: the Python API on soft, hard and local models, and `caption-visualize`."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest
import torch
from PIL import Image

from caption.data.vocab import END_ID, SPECIALS, Vocabulary
from caption.views.attention import attention_views, heat_maps, local_windows, window_cells
from caption.views.figures import attention_figure
from tests.helpers import ROOT
from tests.helpers.cli import run
from tests.helpers.config import TINY_MODEL
from tests.helpers.models import V, images, tiny_model

WORDS = ["a", "small", "red", "circle", "above", "a", "large", "blue", "square"]


def gids(ax: matplotlib.axes.Axes) -> list[str | None]:
    return [a.get_gid() for a in [*ax.patches, *ax.lines]]


@pytest.mark.parametrize("attention", ["soft", "hard", "local"])
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_figure_has_one_panel_per_word(attention: str, strategy: str, tmp_path: Path) -> None:
    model = tiny_model(f"model/attention={attention}").eval()
    with torch.no_grad():  # no <end>: every caption has max_len words (the words are fake)
        model.decoder.L_o.bias[END_ID] = float("-inf")
    x = images()
    gen = model.generate(x, strategy=strategy, beam_size=3, max_len=len(WORDS) + 1)
    assert gen.alphas.shape[1] >= len(WORDS)
    n = min(len(WORDS), gen.alphas.shape[1])
    words = WORDS[:n]
    hard = attention == "hard"
    windows = local_windows(gen.positions[0, :n], 2) if gen.positions is not None else None
    assert (gen.positions is not None) == (attention == "local")
    fig = attention_figure(
        x[0],
        words,
        gen.alphas[0],
        gen.grid,
        betas=gen.betas[0],
        locations=gen.locations[0] if hard else None,
        windows=windows,
    )
    assert len(fig.axes) == n + 1
    assert fig.axes[0].get_title() == "image"
    assert fig.axes[1].get_title() == f"{words[0]}  β={gen.betas[0, 0]:.2f}"
    for ax in fig.axes:
        assert ax.get_xticks().size == 0 and ax.get_yticks().size == 0
    for ax in fig.axes[1:]:
        marks = gids(ax)
        assert ("hard-location" in marks) == hard
        assert ("local-window" in marks) == (attention == "local")
        assert ("local-centre" in marks) == (attention == "local")
        assert len(ax.images) == 2  # the image and the blended heat map
    png = tmp_path / f"{attention}.png"
    fig.savefig(png, dpi=60)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > im.height  # two rows of six panels


def test_hard_marker_is_the_chosen_cell() -> None:
    alphas = torch.zeros(2, 64)
    alphas[0, 8 * 2 + 5] = 1.0
    alphas[1, 63] = 1.0
    fig = attention_figure(images(1)[0], ["a", "b"], alphas, (8, 8), locations=[21, 63])
    boxes = [next(p for p in ax.patches if p.get_gid() == "hard-location") for ax in fig.axes[1:]]
    assert boxes[0].get_xy() == (40.0, 16.0) and boxes[0].get_width() == 8.0  # row 2, col 5
    assert boxes[1].get_xy() == (56.0, 56.0)


def test_local_window_matches_where_alpha_is_nonzero() -> None:
    """The outlined window is exactly the cells local attention could use, for each word,
    with greedy and with beam search (whose reordering must keep positions with alphas)."""
    model = tiny_model("model/attention=local").eval()
    for strategy in ("greedy", "beam"):
        gen = model.generate(images(3), strategy=strategy, beam_size=3, max_len=6)
        assert gen.positions is not None and gen.positions.shape == (*gen.alphas.shape[:2], 2)
        real = gen.tokens != 0  # steps up to and including <end>
        for b, t in real.nonzero().tolist():
            r0, r1, c0, c1 = window_cells((*gen.positions[b, t].tolist(), 2), (8, 8))
            box = torch.zeros(8, 8, dtype=torch.bool)
            box[r0 : r1 + 1, c0 : c1 + 1] = True
            assert torch.equal(gen.alphas[b, t].view(8, 8) > 0, box)
        assert torch.isnan(gen.positions[~real]).all()


def test_multi_head_local_attention_outlines_every_head_window() -> None:
    """Under multi-head attention each head has its own window: the view keeps all of them,
    the mean α is non-zero exactly on their union, and the figure outlines each."""
    heads = 2
    model = tiny_model("model/attention=local", f"model.heads={heads}")
    with torch.no_grad():  # no <end>: every caption has max_len words to look at
        model.decoder.L_o.bias[END_ID] = float("-inf")
    vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(V - len(SPECIALS)))])
    for strategy in ("greedy", "beam"):
        gen = model.generate(images(2), strategy=strategy, beam_size=3, max_len=6)
        assert gen.positions is not None
        assert gen.positions.shape == (*gen.alphas.shape[:2], heads, 2)
        for b, view in enumerate(attention_views(model, vocab, gen)):
            assert view.windows is not None and len(view.windows) == len(view.words)
            for t, windows in enumerate(view.windows):
                assert len(windows) == heads and all(w[2] == 2 for w in windows)
                union = torch.zeros(8, 8, dtype=torch.bool)
                for window in windows:
                    r0, r1, c0, c1 = window_cells(window, (8, 8))
                    union[r0 : r1 + 1, c0 : c1 + 1] = True
                assert torch.equal(gen.alphas[b, t].view(8, 8) > 0, union)
    view = attention_views(model, vocab, gen)[0]
    assert len(view.words) == 6
    fig = attention_figure(images(1)[0], view.words, view.alphas, view.grid, windows=view.windows)
    for ax in fig.axes[1:]:
        assert gids(ax).count("local-window") == heads


def test_window_cells_clip_at_the_grid() -> None:
    assert window_cells((4.0, 4.0, 2), (8, 8)) == (2, 5, 2, 5)
    assert window_cells((0.2, 7.9, 1), (8, 8)) == (0, 0, 7, 7)
    assert window_cells((8.0, 0.0, 1), (8, 8)) == (7, 7, 0, 0)  # p on the far edge


def test_long_captions_wrap_and_maps_are_smooth_and_nonnegative() -> None:
    words = [f"w{i}" for i in range(13)]
    alphas = torch.softmax(torch.randn(13, 64), dim=-1)
    fig = attention_figure(images(1)[0], words, alphas, (8, 8), columns=6)
    assert len(fig.axes) == 14
    rows = {round(ax.get_position().y0, 3) for ax in fig.axes}
    assert len(rows) == 3  # 14 panels in rows of 6
    heat = heat_maps(alphas[:1], (8, 8), (64, 64))
    assert heat.shape == (1, 64, 64) and (heat >= 0).all()
    # Upsampling and blur keep the scale: the mean stays that of the map.
    assert float(heat.mean()) == pytest.approx(1 / 64, rel=0.05)
    with pytest.raises(ValueError, match="attention maps"):
        attention_figure(images(1)[0], words, alphas[:3], (8, 8))


# --- caption-visualize end to end, on the tiny run of tests/conftest.py -------------------


@pytest.mark.slow
@pytest.mark.cli
def test_images_are_drawn_upright(tmp_path: Path) -> None:
    """A phone photo stored sideways with an EXIF rotation is drawn as the model reads it."""
    import base64
    import io

    from caption.data.images import read_rgb
    from caption.views.attention import shown_image
    from caption.views.report import embed_image

    photo = Image.new("RGB", (60, 30), (200, 30, 30))
    photo.paste((30, 30, 200), (0, 0, 30, 30))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    path = tmp_path / "sideways.jpg"
    photo.save(path, exif=exif)
    upright = read_rgb(path)
    assert upright.size == (30, 60)  # what the model is fed
    assert shown_image(path, 512).size == (30, 60)
    assert shown_image(path, 20).size == (10, 20)  # shrunk, aspect kept
    uri = embed_image(path, 20)
    embedded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert embedded.size == (10, 20)
    top = embedded.convert("RGB").getpixel((5, 2))
    assert top[2] > top[0]  # the blue half is on top once rotated clockwise


def test_visualize_cli_glob_and_beam(trained: Path, tmp_path: Path) -> None:
    ckpt = trained / "run" / "checkpoints" / "best.pt"
    pattern = trained / "shapes" / "images" / "test_0000[0-2].png"
    out = tmp_path / "attention"
    # Quoted: `[` is Hydra override syntax.
    proc = run(
        "caption-visualize", f"checkpoint={ckpt}", f"images='{pattern}'", f"output_dir={out}"
    )
    written = proc.stdout.splitlines()
    assert written == [str(out / f"test_0000{i}.png") for i in range(3)]
    with Image.open(written[0]) as im:
        assert im.format == "PNG"


@pytest.mark.slow
@pytest.mark.cli
def test_visualize_cli_folder_with_a_bad_image(trained: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        src = trained / "shapes" / "images" / f"val_0000{i}.png"
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "broken.png").write_text("not a png")
    out = tmp_path / "figs"
    proc = run(
        "caption-visualize",
        f"checkpoint={trained / 'run/checkpoints/best.pt'}",
        f"images={folder}",
        f"output_dir={out}",
        "strategy=greedy",
        check=False,
    )
    assert proc.returncode == 1
    assert sorted(p.name for p in out.iterdir()) == ["val_00000.png", "val_00001.png"]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0]


@pytest.mark.slow
@pytest.mark.cli
def test_visualize_cli_missing_images_is_one_clear_line(trained: Path, tmp_path: Path) -> None:
    proc = run(
        "caption-visualize",
        f"checkpoint={trained / 'run/checkpoints/best.pt'}",
        "images=/no/such/dir",
        f"output_dir={tmp_path}",
        check=False,
    )
    assert proc.returncode == 2
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "images: /no/such/dir does not exist" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.cli
def test_evaluate_reports_grounding(trained: Path, tmp_path: Path) -> None:
    ckpt = trained / "run" / "checkpoints" / "best.pt"
    proc = run("caption-evaluate", f"checkpoint={ckpt}", f"output={tmp_path / 'e.json'}")
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    keys = [
        "pointing_acc",
        "attention_in_box",
        "pointing_acc_uniform",
        "attention_in_box_uniform",
        "pointing_acc_reference",
        "attention_in_box_reference",
        "n_mentions",
    ]
    assert set(keys) <= last.keys()
    assert last["n_mentions_reference"] > 0 and 0 <= last["attention_in_box_reference"] <= 1


@pytest.mark.slow
def test_walkthrough_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Execute the walkthrough's code cells at a tiny size, headless.

    A Jupyter kernel provides `display`; here it collects what the notebook shows.
    """
    matplotlib.use("Agg")
    notebook = json.loads((ROOT / "notebooks" / "walkthrough.ipynb").read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells)
    code = "\n\n".join("".join(c["source"]) for c in cells)
    monkeypatch.setenv("WALKTHROUGH_DIR", str(tmp_path))
    monkeypatch.setenv("WALKTHROUGH_TRAIN", "48")
    monkeypatch.setenv("WALKTHROUGH_EVAL", "6")
    monkeypatch.setenv("WALKTHROUGH_EPOCHS", "1")
    monkeypatch.setenv("WALKTHROUGH_MAX_STEPS", "3")
    monkeypatch.setenv("WALKTHROUGH_OVERRIDES", " ".join(TINY_MODEL))
    shown: list[object] = []
    scope: dict = {"display": shown.append}
    exec(compile(code, "walkthrough.ipynb", "exec"), scope)
    assert len(shown) >= 3 and all(isinstance(f, matplotlib.figure.Figure) for f in shown)
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    assert {"bleu4", "pointing_acc", "pointing_acc_uniform"} <= scope["metrics"].keys()
