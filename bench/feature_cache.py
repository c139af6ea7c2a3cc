"""Benchmark: a decoder-only epoch from the feature cache vs encoding images on the fly.

    python bench/feature_cache.py [--images 32] [--encoder resnet101] [--image-size 448]

ResNet-101 at 448 px gives the paper's 14x14 grid (L = 196, D = 2048). Both epochs run the
same training steps (frozen encoder, the decoder's forward, backward and Adam step) over the
same images and captions, measured side by side in this one run; the cache's one-time build
is reported separately. Weights are random: the cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from caption.data.dataset import CaptionDataset, ImageBank, collate_captions
from caption.data.features import FeatureBank
from caption.data.records import ImageRecord
from caption.data.vocab import Vocabulary
from caption.models.attention import SoftAttention
from caption.models.captioner import Captioner
from caption.models.encoder import Encoder
from caption.models.scores import AdditiveScore
from caption.runtime import configure_cpu


def epoch_seconds(model: Captioner, dataset: CaptionDataset, batch_size: int) -> float:
    """Wall-clock seconds of one training epoch over `dataset`."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_captions)
    start = time.perf_counter()
    for inputs, captions, *_ in loader:
        loss = model.loss(inputs, captions).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--encoder", default="resnet101")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    configure_cpu()  # what every command does: flush denormals, keep freed memory
    rng = np.random.default_rng(0)
    words = ["a", "dog", "runs", "on", "the", "grass", "cat", "sits"]
    with tempfile.TemporaryDirectory() as tmp:
        records = []
        for i in range(args.images):
            path = Path(tmp) / f"{i}.jpg"
            pixels = rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
            caption = list(rng.choice(words, size=12))
            records.append(ImageRecord(imgid=i, path=path, split="train", captions=[caption]))
        vocab = Vocabulary.build(r.captions[0] for r in records)
        encoder = Encoder(args.encoder, fine_tune=False)
        model = Captioner(
            encoder,
            SoftAttention,
            AdditiveScore,
            len(vocab),
            embed_dim=512,
            hidden_dim=512,
            doubly_stochastic=1.0,
        )
        images = ImageBank(records, args.image_size, preload=True)
        grid = encoder.grid_shape(args.image_size)
        on_the_fly = epoch_seconds(model, CaptionDataset(images, vocab), args.batch_size)
        start = time.perf_counter()
        # float32: random weights give activations beyond float16's range (ImageNet ones don't).
        cached = FeatureBank.build(
            encoder, images, Path(tmp) / "cache", dtype="float32", batch_size=args.batch_size
        )
        build = time.perf_counter() - start
        from_cache = epoch_seconds(model, CaptionDataset(cached, vocab), args.batch_size)
    print(
        json.dumps(
            {
                "encoder": args.encoder,
                "image_size": args.image_size,
                "grid": list(grid),
                "annotation_dim": encoder.out_dim,
                "images": args.images,
                "epoch_on_the_fly_s": round(on_the_fly, 2),
                "epoch_from_cache_s": round(from_cache, 2),
                "speedup": round(on_the_fly / from_cache, 1),
                "cache_build_s": round(build, 2),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
