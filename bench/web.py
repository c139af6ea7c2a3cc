"""Benchmark: the HTML report of 1,000 shapes test images, and `POST /caption` latency.

    python bench/web.py [--checkpoint outputs/demo/checkpoints/best.pt] [--images 1000]

With a trained checkpoint (`make demo` writes the default one), it generates `--images` shapes
test images at the checkpoint's image size in a temporary folder, builds their report with
`caption-visualize format=html split=test` (in process), and opens it `--opens` times in
headless Debian Chromium, each in a fresh page: the time to open is from navigation start to
the first page of cards drawn, as the page itself measures it (`performance.now()`). Then it
starts `caption-serve` on a free port of 127.0.0.1 and sends `--requests` shapes images one
after another, and decodes the same images in this process with no server (the model's own
share of a request), side by side.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from caption.cli.visualize import visualize
from caption.config import CONF_DIR
from caption.data.shapes import generate_shapes
from caption.models.build import load_captioner
from caption.runtime import configure_cpu

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/web.py` from a checkout: tests.helpers

from tests.helpers.browser import CHROMIUM, launch_chromium  # noqa: E402


def open_times(report: Path, opens: int, chromium: str, profile: Path) -> list[tuple[float, float]]:
    """Seconds from navigation start to the first page drawn, per fresh page: as the page
    measures it, and as this process sees it (from `goto` to the ready mark)."""
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as p:
        context = launch_chromium(p, profile, chromium)
        for _ in range(opens):
            page = context.new_page()
            start = time.perf_counter()
            page.goto(report.as_uri(), timeout=60_000)
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            wall = time.perf_counter() - start
            times.append((page.evaluate("window.reportReadyMs") / 1000, wall))
            page.close()
        context.close()
    return times


def multipart(content: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def latencies(url: str, files: list[Path], model, n: int) -> tuple[list, list]:
    """Seconds per `POST /caption`, and per decode of the same image in this process.

    The two alternate, one request then one decode, so both see the same machine load.
    """
    payloads = [multipart(f.read_bytes()) for f in files]

    def decode(path: Path) -> None:
        with torch.inference_mode():
            model.generate(model.prepare(path)[None], strategy="beam", beam_size=3, max_len=30)

    served, decoded = [], []
    # The decode runs on a worker thread, as the server's requests do: on a busy machine,
    # torch's intra-op threads started from the main thread were far slower (measured 60x).
    with ThreadPoolExecutor(1) as worker:
        for i in range(n + 10):  # the first 10 warm up
            body, kind = payloads[i % len(payloads)]
            request = urllib.request.Request(url, data=body, headers={"Content-Type": kind})
            start = time.perf_counter()
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
            middle = time.perf_counter()
            worker.submit(decode, files[i % len(files)]).result()
            if i >= 10:
                served.append(middle - start)
                decoded.append(time.perf_counter() - middle)
    return served, decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="outputs/demo/checkpoints/best.pt")
    parser.add_argument("--images", type=int, default=1000, help="test images in the report")
    parser.add_argument("--opens", type=int, default=5, help="times the report is opened")
    parser.add_argument("--requests", type=int, default=200, help="timed POST /caption")
    parser.add_argument("--chromium", default=CHROMIUM)
    args = parser.parse_args()
    if not Path(args.checkpoint).is_file():
        sys.exit(f"error: {args.checkpoint} does not exist; run `make demo` or pass --checkpoint")
    configure_cpu()
    model, vocab, _ = load_captioner(args.checkpoint)
    size = model.image_size
    results: dict[str, float | int | str] = {"checkpoint": args.checkpoint, "image_size": size}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = generate_shapes(
            tmp / "shapes", n_train=1, n_val=1, n_test=args.images, image_size=size
        )
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(
                "visualize",
                [
                    f"checkpoint={args.checkpoint}",
                    "split=test",
                    f"annotations={data}",
                    "format=html",
                    f"output_dir={tmp / 'report'}",
                    "device=cpu",
                ],
            )
        start = time.perf_counter()
        report = Path(visualize(cfg)["written"][0])
        results["report_build_s"] = round(time.perf_counter() - start, 2)
        results["report_images"] = args.images
        results["report_mb"] = round(report.stat().st_size / 1e6, 2)
        opened = open_times(report, args.opens, args.chromium, tmp / "profile")
        results["report_open_s_median"] = round(statistics.median(t for t, _ in opened), 3)
        results["report_open_s_max"] = round(max(t for t, _ in opened), 3)
        results["report_goto_to_ready_s_median"] = round(statistics.median(w for _, w in opened), 3)

        files = sorted((data.parent / "images").glob("test_*.png"))[: args.requests]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "caption-serve"),
                f"checkpoint={Path(args.checkpoint).resolve()}",
                f"port={port}",
                "access_log=false",
                "device=cpu",
            ],
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"{base}/health", timeout=2).close()
                    break
                except OSError:
                    time.sleep(0.2)
            served, decoded = latencies(f"{base}/caption", files, model, args.requests)
        finally:
            server.terminate()
            server.wait(timeout=30)
    results["post_caption_ms_median"] = round(1000 * statistics.median(served), 1)
    results["post_caption_ms_p90"] = round(1000 * statistics.quantiles(served, n=10)[-1], 1)
    results["decode_only_ms_median"] = round(1000 * statistics.median(decoded), 1)
    results["server_overhead_ratio"] = round(
        statistics.median(served) / statistics.median(decoded), 2
    )
    print(
        f"report of {args.images} images: {results['report_mb']} MB, built in "
        f"{results['report_build_s']} s, opens in {results['report_open_s_median']} s "
        f"(median of {args.opens}; max {results['report_open_s_max']} s)"
    )
    print(
        f"POST /caption, beam 3: median {results['post_caption_ms_median']} ms, p90 "
        f"{results['post_caption_ms_p90']} ms; the decode alone {results['decode_only_ms_median']}"
        f" ms ({results['server_overhead_ratio']}x)"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
