"""Benchmark: training throughput of the default config, and decoding speed.

    python bench/throughput.py [--steps 150] [--decode-images 256]

It generates a shapes set in a temporary folder, trains the default config for `--steps`
optimizer steps through `train(cfg)` (the real loop: data, loss, backward, clipping, Adam,
schedule), and reports training images/s. It then decodes val images with the trained model
and reports, measured side by side in this one run, greedy vs batched beam search vs beam
search one image at a time (what most public implementations do).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from caption.checkpoint import load_captioner
from caption.config import CONF_DIR
from caption.data.dataset import ImageBank
from caption.data.karpathy import read_karpathy
from caption.data.shapes import generate_shapes
from caption.train import train


def timed(fn, repeats: int = 3) -> float:
    """Best wall-clock seconds of `repeats` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps to time")
    parser.add_argument("--decode-images", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_shapes(
            Path(tmp) / "shapes", n_train=2000, n_val=args.decode_images, n_test=1
        )
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(
                "train",
                [
                    f"data.annotations={data}",
                    f"data.images={data.parent}",
                    f"run_dir={Path(tmp) / 'run'}",
                    "trainer.max_epochs=1",
                    f"trainer.max_steps={args.steps}",
                    "trainer.progress=false",
                    "trainer.device=cpu",
                    "trainer.val_max_images=1",
                ],
            )
        summary = train(cfg)
        model, _, _ = load_captioner(Path(tmp) / "run" / "checkpoints" / "last.pt")
        bank = ImageBank(read_karpathy(data)["val"], cfg.data.image_size)
        images = bank.pixels
        n = len(images)

        def batched(strategy: str, k: int = 1, batch: int = 64) -> None:
            for i in range(0, n, batch):
                model.generate(images[i : i + batch], strategy=strategy, beam_size=k)

        greedy = timed(lambda: batched("greedy"))
        beam = timed(lambda: batched("beam", 3))
        single = timed(lambda: batched("beam", 3, batch=1), repeats=1)
    result = {
        "train_images_per_sec": round(summary["images_per_sec"], 1),
        "train_steps": summary["steps"],
        "batch_size": cfg.data.batch_size,
        "decode_images": n,
        "greedy_images_per_sec": round(n / greedy, 1),
        "beam3_batched_images_per_sec": round(n / beam, 1),
        "beam3_one_at_a_time_images_per_sec": round(n / single, 1),
        "beam3_batched_speedup": round(single / beam, 2),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
