"""`caption-serve`: the page in Chromium, the JSON API, its limits and bad requests."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caption.errors import CaptionError
from caption.serve import check_port, create_app
from tests.conftest import BIN, ROOT, compose_config
from tests.test_report import canvas_pixels

pytestmark = [pytest.mark.slow, pytest.mark.cli]

MAX_PIXELS = 100 * 100
MAX_UPLOAD_MB = 0.25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, content: bytes, field: str = "image", **fields: str) -> tuple[int, dict]:
    """POST `content` as multipart file field `field` (plus text `fields`); (status, JSON)."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="x.png"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + content
        + b"\r\n"
    )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def png(size: tuple[int, int], color: tuple[int, int, int] = (40, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def serving(checkpoint: Path, *args: str) -> Iterator[str]:
    """`caption-serve` of `checkpoint` on a free port of 127.0.0.1, with `args`; its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "caption-serve"),
            f"checkpoint={checkpoint}",
            f"port={port}",
            "access_log=false",
            "device=cpu",
            *args,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    assert json.loads(r.read())["status"] == "ok"
                break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(f"caption-serve exited: {proc.stderr.read()}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


@pytest.fixture(scope="module")
def server(trained: Path) -> Iterator[str]:
    """`caption-serve` with small limits; its base URL."""
    checkpoint = trained / "run" / "checkpoints" / "best.pt"
    limits = [f"max_pixels={MAX_PIXELS}", f"max_upload_mb={MAX_UPLOAD_MB}"]
    with serving(checkpoint, *limits) as url:
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
