"""`caption-serve`: the page in Chromium, the JSON API, its limits and bad requests."""

from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caption.cli.serve import check_port, create_app
from caption.errors import CaptionError
from tests.helpers.browser import canvas_pixels
from tests.helpers.config import compose_config
from tests.helpers.serving import post, serving

pytestmark = [pytest.mark.slow, pytest.mark.cli]

MAX_PIXELS = 100 * 100
MAX_UPLOAD_MB = 0.25


def png(size: tuple[int, int], color: tuple[int, int, int] = (40, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(trained: Path) -> Iterator[str]:
    """`caption-serve` on a free port of 127.0.0.1, with small limits; its base URL."""
    with serving(
        trained / "run" / "checkpoints" / "best.pt",
        f"max_pixels={MAX_PIXELS}",
        f"max_upload_mb={MAX_UPLOAD_MB}",
    ) as url:
        yield url


def shapes_image(trained: Path, i: int = 0) -> Path:
    return trained / "shapes" / "images" / f"test_{i:05d}.png"


def test_page_captions_an_upload_and_its_words_respond(server: str, trained: Path, browser):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/")
    assert page.locator("#beam").input_value() == "3"
    page.locator("#file").set_input_files(str(shapes_image(trained)))
    page.wait_for_selector("#result:not([hidden]) .av-word")
    status, api = post(f"{server}/caption", shapes_image(trained).read_bytes())
    assert status == 200
    assert page.locator("#caption").inner_text() == api["caption"] != ""
    words = page.locator("#result .av-word")
    assert words.count() == len(api["words"])
    card = page.locator("#result")
    canvas = card.locator("canvas")
    page.wait_for_function("document.querySelector('#result canvas').width > 224")
    plain = canvas_pixels(card)
    words.first.hover()
    assert canvas.get_attribute("data-shown") == "0"
    first = canvas_pixels(card)
    assert np.abs(first - plain).mean() > 1  # the heat map is drawn over the image
    words.last.hover()
    assert canvas.get_attribute("data-shown") == str(len(api["words"]) - 1)
    assert card.locator(".av-label").inner_text().startswith(api["words"][-1])
    # The page asks for the beam size it shows.
    page.locator("#beam").select_option("1")
    page.wait_for_function("document.getElementById('status').textContent.includes('beam 1')")
    assert errors == [] and browser.outside == []
    page.close()


def test_api_answers_caption_words_and_attention(server: str, trained: Path) -> None:
    status, body = post(f"{server}/caption", shapes_image(trained, 1).read_bytes(), beam_size="2")
    assert status == 200 and body["beam_size"] == 2
    assert body["caption"] == " ".join(body["words"])
    H, W = body["grid"]
    assert len(body["attention"]) == len(body["betas"]) == len(body["words"])
    for row in body["attention"]:
        assert len(row) == H * W and sum(row) == pytest.approx(1, abs=1e-3)
    assert (body["width"], body["height"]) == Image.open(shapes_image(trained, 1)).size
    with urllib.request.urlopen(f"{server}/openapi.json") as r:
        schema = json.loads(r.read())
    operation = schema["paths"]["/caption"]["post"]
    assert "multipart/form-data" in operation["requestBody"]["content"]
    assert {"200", "400", "413", "422"} <= set(operation["responses"])


def test_a_corrupt_upload_is_refused_and_the_next_one_served(server: str, trained: Path):
    good = shapes_image(trained).read_bytes()
    status, body = post(f"{server}/caption", b"this is not an image")
    assert status == 400 and body["error"].startswith("image: not an image file")
    status, body = post(f"{server}/caption", good[: len(good) // 2])  # truncated PNG
    assert status == 400 and "corrupt or truncated" in body["error"]
    status, body = post(f"{server}/caption", good, field="file")
    assert status == 422 and "image: Field required" in body["error"]
    status, body = post(f"{server}/caption", good, beam_size="99")
    assert status == 422 and body["error"].startswith("beam_size:")
    status, body = post(f"{server}/caption", good)
    assert status == 200 and body["words"]


def test_limits_on_pixels_and_upload_size(server: str) -> None:
    status, body = post(f"{server}/caption", png((101, 100)))
    assert status == 413
    assert body["error"] == (
        "image: 101×100 is 10,100 pixels, over this server's limit of 10,000 (max_pixels); "
        "send a smaller image"
    )
    assert post(f"{server}/caption", png((100, 100)))[0] == 200  # at the limit is fine
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")  # ~480 kB
    status, body = post(f"{server}/caption", buffer.getvalue())
    assert status == 413 and "over this server's limit of 0.25 MB" in body["error"]


def test_concurrent_requests_all_get_their_answer(server: str, trained: Path) -> None:
    good = [shapes_image(trained, i).read_bytes() for i in range(4)]
    expected = [post(f"{server}/caption", g)[1]["caption"] for g in good]
    jobs = [good[i % 4] for i in range(12)] + [b"junk"] * 4
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda content: post(f"{server}/caption", content), jobs))
    for i, (status, body) in enumerate(answers[:12]):
        assert status == 200 and body["caption"] == expected[i % 4]
    assert all(status == 400 for status, _ in answers[12:])
    with urllib.request.urlopen(f"{server}/health") as r:
        assert r.status == 200


def test_serve_bad_checkpoint_and_busy_port(trained: Path, tmp_path: Path) -> None:
    """The CLI's two start-up failures are one-line `CaptionError`s (exit 2 via cli_guard)."""
    missing = tmp_path / "none.pt"
    with pytest.raises(CaptionError, match=f"checkpoint: {missing} does not exist"):
        create_app(compose_config("serve", [f"checkpoint={missing}"]))
    with pytest.raises(CaptionError, match="beam_size: 12 is over max_beam_size=10"):
        create_app(compose_config("serve", [f"checkpoint={missing}", "beam_size=12"]))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(CaptionError, match=f"port: cannot listen on 127.0.0.1:{port}"):
            check_port("127.0.0.1", port)
