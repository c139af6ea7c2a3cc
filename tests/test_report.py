"""The HTML attention report: records, a self-contained page, and its behaviour in Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from caption.cli.visualize import visualize
from caption.data.vocab import SPECIALS, Vocabulary
from caption.errors import CaptionError
from caption.views.attention import AttentionView, attention_views, window_cells
from caption.views.report import attention_record, render_page, report_item, write_report
from tests.helpers.browser import canvas_pixels
from tests.helpers.cli import run
from tests.helpers.config import compose_config
from tests.helpers.models import images, tiny_model

GRID = (8, 8)


# Per word, each head's window: one head for local attention, two under multi-head attention.
WINDOWS = {
    "local": [[(0.5, 0.5, 1)], [(7.5, 7.5, 1)], [(4.0, 4.0, 1)]],
    "local_heads": [
        [(0.5, 0.5, 1), (2.5, 6.5, 1)],
        [(7.5, 7.5, 1), (1.0, 1.0, 1)],
        [(4.0, 4.0, 1)] * 2,
    ],
}


def peaked_view(kind: str = "soft") -> AttentionView:
    """Three words: all attention on the top-left cell, on the bottom-right cell, uniform."""
    alphas = torch.zeros(3, 64)
    alphas[0, 0] = 1.0
    alphas[1, 63] = 1.0
    alphas[2] = 1 / 64
    return AttentionView(
        words=["red", "circle", "here"],
        alphas=alphas,
        grid=GRID,
        betas=torch.tensor([0.9, 0.5, 0.25]),
        locations=torch.tensor([0, 63, 27]) if kind == "hard" else None,
        windows=WINDOWS.get(kind),
        log_prob=-1.5,
    )


def gray_image(path: Path, size: int = 64) -> Path:
    Image.new("RGB", (size, size), (128, 128, 128)).save(path)
    return path


def decode_u8(record: dict) -> np.ndarray:
    n, L = len(record["words"]), record["grid"][0] * record["grid"][1]
    raw = np.frombuffer(base64.b64decode(record["attention_u8"]), dtype=np.uint8)
    return raw.reshape(n, L) / 255 * record["attention_max"]


@pytest.mark.parametrize("attention", ["soft", "hard", "local"])
def test_records_of_each_attention(attention: str) -> None:
    model = tiny_model(f"model/attention={attention}").eval()
    vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(16))])
    gen = model.generate(images(2), strategy="greedy", max_len=6)
    views = attention_views(model, vocab, gen)
    assert len(views) == 2
    for b, view in enumerate(views):
        n = len(view.words)
        assert n > 0  # a random model seldom ends at once; then nothing here would be tested
        record = attention_record(view)
        assert record["words"] == view.words and record["grid"] == [8, 8]
        assert np.allclose(record["attention"], gen.alphas[b, :n].numpy(), atol=1e-6)
        assert record["betas"] == pytest.approx(gen.betas[b, :n].tolist(), abs=1e-4)
        assert (record["locations"] is not None) == (attention == "hard")
        assert (record["windows"] is not None) == (attention == "local")
        if attention == "hard":
            assert record["locations"] == gen.locations[b, :n].tolist()
        if attention == "local":
            for t, heads in enumerate(record["windows"]):
                p = gen.positions[b, t].tolist()
                assert [w["cells"] for w in heads] == [list(window_cells((*p, 2), GRID))]
        compact = attention_record(view, compact=True)
        assert "attention" not in compact
        # 8 bits relative to the caption's peak: within half a step of the floats.
        step = compact["attention_max"] / 255
        assert np.abs(decode_u8(compact) - gen.alphas[b, :n].numpy()).max() <= step / 2 + 1e-7


def test_colour_scale_never_stretches_a_uniform_map() -> None:
    view = peaked_view()
    assert attention_record(view)["vmax"] == 1.0
    uniform = view._replace(alphas=torch.full((3, 64), 1 / 64))
    assert attention_record(uniform)["vmax"] == pytest.approx(4 / 64)
    assert attention_record(view, normalize="panel")["vmax"] == pytest.approx([1, 1, 4 / 64])


def test_report_item_scores_the_image_against_its_references(tmp_path: Path) -> None:
    image = gray_image(tmp_path / "a.png", 300)
    refs = [["red", "circle", "here"], ["a", "red", "circle"]]
    item = report_item(image, peaked_view(), refs, max_side=100)
    assert item["name"] == "a.png" and item["references"] == ["red circle here", "a red circle"]
    assert item["bleu"]["bleu1"] == 1.0 and item["bleu"]["bleu4"] == 0.0  # 3 words: no 4-gram
    header, data = item["image"].split(",", 1)
    assert header == "data:image/jpeg;base64"
    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
        assert im.size == (100, 100)  # shrunk to max_side
    assert "bleu" not in report_item(image, peaked_view(), None)


def test_page_is_self_contained_and_escapes_what_it_embeds() -> None:
    hostile = "</script><script>alert(1)</script>"
    page = render_page("report.html", title=hostile, subtitle="s", data={"x": hostile})
    assert hostile not in page
    assert re.search(r"https?://", page) is None  # no CDN, font or script from elsewhere
    assert "{{" not in page  # every field filled
    data = re.search(r'id="report-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data) == {"x": hostile}


# --- in the browser ---------------------------------------------------------------------


def corner_brightness(pixels: np.ndarray) -> tuple[float, float]:
    """Mean brightness of the top-left and bottom-right cells (1/8 of each side)."""
    h, w = pixels.shape[0] // 8, pixels.shape[1] // 8
    return float(pixels[:h, :w].mean()), float(pixels[-h:, -w:].mean())


def cyan(pixels: np.ndarray) -> int:
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return int(((r < 80) & (g > 180) & (b > 200)).sum())


def green(pixels: np.ndarray) -> int:
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return int(((r < 170) & (g > 220) & (b < 60)).sum())


def open_report(browser, path: Path):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']")
    return page, errors


@pytest.mark.parametrize("attention", ["soft", "hard", "local", "local_heads"])
def test_hovering_a_word_shows_its_heat_map(attention: str, browser, tmp_path: Path) -> None:
    image = gray_image(tmp_path / "gray.png")
    report = tmp_path / "report.html"
    write_report(report, [report_item(image, peaked_view(attention))])
    page, errors = open_report(browser, report)
    card = page.locator(".card").first
    words = card.locator(".av-word")
    assert words.all_inner_texts() == ["red\nβ 0.90", "circle\nβ 0.50", "here\nβ 0.25"]

    plain = canvas_pixels(card)
    assert np.abs(plain - 128).max() <= 2  # the gray image alone before any word

    words.nth(0).hover()
    first = canvas_pixels(card)
    top_left, bottom_right = corner_brightness(first)
    assert top_left > bottom_right + 60  # "red" looked at the top-left cell
    assert card.locator(".av-label").inner_text().startswith("red · β = 0.90")

    words.nth(1).hover()
    second = canvas_pixels(card)
    top_left, bottom_right = corner_brightness(second)
    assert bottom_right > top_left + 60  # the map followed the word
    assert np.abs(second - first).mean() > 1

    # Marks: hard attention's sampled cell in cyan, local attention's window in green.
    assert (cyan(second) > 20) == (attention == "hard")
    assert (green(second) > 20) == attention.startswith("local")
    assert errors == [] and browser.outside == []
    page.close()


def test_click_pins_a_word_and_arrow_keys_move(browser, tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    write_report(report, [report_item(gray_image(tmp_path / "g.png"), peaked_view())])
    page, _ = open_report(browser, report)
    card = page.locator(".card").first
    canvas = card.locator("canvas")
    card.locator(".av-word").nth(0).click()
    page.mouse.move(0, 0)  # leaving the words falls back to the pinned one
    assert canvas.get_attribute("data-shown") == "0"
    page.keyboard.press("ArrowRight")
    assert canvas.get_attribute("data-shown") == "1"
    top_left, bottom_right = corner_brightness(canvas_pixels(card))
    assert bottom_right > top_left + 60
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")  # stops at the last word
    assert canvas.get_attribute("data-shown") == "2"
    page.keyboard.press("ArrowLeft")
    assert canvas.get_attribute("data-shown") == "1"
    page.close()


@pytest.mark.slow
@pytest.mark.cli
def test_visualize_html_report_of_a_split(trained: Path, browser, tmp_path: Path) -> None:
    ckpt = trained / "run" / "checkpoints" / "best.pt"
    out = tmp_path / "report"
    proc = run(
        "caption-visualize",
        f"checkpoint={ckpt}",
        "split=test",
        f"annotations={trained / 'shapes' / 'dataset_shapes.json'}",
        "format=html",
        f"output_dir={out}",
        "page_size=3",
    )
    path = out / "attention.html"
    line = proc.stdout.strip().splitlines()[-1]
    assert line == f"{path} ({path.stat().st_size / 1e6:.1f} MB, 8 images)"

    page, errors = open_report(browser, path)
    assert page.locator("#pages").inner_text() == "page 1 of 3"
    cards = page.locator(".card")
    assert cards.count() == 3
    first = cards.first
    assert first.locator(".name").inner_text().startswith("test_00000.png")
    assert first.locator(".refs li").count() == 6  # the shapes set has 6 references an image
    assert re.match(r"BLEU-4 \d\.\d{3}", first.locator(".bleu").inner_text())
    before = canvas_pixels(first)
    first.locator(".av-word").first.hover()
    assert np.abs(canvas_pixels(first) - before).mean() > 1  # the heat map is drawn over it

    page.locator("#next").click()
    assert page.locator("#pages").inner_text() == "page 2 of 3"
    assert cards.first.locator(".name").inner_text().startswith("test_00003.png")
    word = first.locator(".av-word").first.inner_text().split("\n")[0]
    page.locator("#filter").fill(word)
    assert re.fullmatch(r"\d+ of 8 images", page.locator("#summary").inner_text())
    assert errors == [] and browser.outside == []
    page.close()


def test_visualize_needs_images_or_a_split(trained: Path, tmp_path: Path) -> None:
    ckpt = trained / "run" / "checkpoints" / "best.pt"
    base = [f"checkpoint={ckpt}", f"output_dir={tmp_path}"]
    with pytest.raises(CaptionError, match="either images="):
        visualize(compose_config("visualize", base))
    with pytest.raises(CaptionError, match="format"):
        visualize(compose_config("visualize", [*base, "images=x.png", "format=pdf"]))
