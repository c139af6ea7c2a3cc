"""The SCST reward's cost: `caption.metrics.CiderD.score` on 64 images x 5 samples, against
pycocoevalcap's `Cider` on the same captions, and against one SCST training step.

    python bench/cider.py [--flickr8k ../shared/flickr8k] [--repeats 5]

The captions are real: Flickr8k's (train references for the document frequencies; as the 320
"samples", caption #0 of 64 train images five times over, each with a word dropped at random
so the samples differ), or the shapes default's when Flickr8k is absent. The training step is
`SelfCritical.losses` + backward of the shapes default model on 64 images, 5 samples each.
Best of `--repeats` runs of each; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def references(flickr8k: Path) -> tuple[str, list[list[list[str]]]]:
    from caption.data.formats import read_flickr8k, read_karpathy

    tokens = flickr8k / "Flickr8k.token.txt"
    if tokens.is_file():
        return "flickr8k", [r.captions for r in read_flickr8k(tokens)["train"]]
    shapes = ROOT / "data" / "shapes" / "dataset_shapes.json"
    return "shapes", [r.captions for r in read_karpathy(shapes)["train"]]


def scst_step_seconds(repeats: int) -> float:
    """One SCST step of the shapes default model: 64 images, 5 samples, loss and backward."""
    import torch
    from hydra import compose, initialize_config_dir

    from caption.data.formats import read_karpathy
    from caption.data.vocab import Vocabulary
    from caption.models.build import build_model
    from caption.training.dist import Dist
    from caption.training.scst import ImageBatch, SelfCritical

    records = read_karpathy(ROOT / "data" / "shapes" / "dataset_shapes.json")["train"]
    vocab = Vocabulary.build([c for r in records for c in r.captions])
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train")
    model = build_model(cfg.model, len(vocab)).train()
    bank = type("Bank", (), {"records": records})()
    scst = SelfCritical(bank, vocab, samples=5)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 80, 80), dtype=torch.uint8, generator=g)
    batch = ImageBatch(images, torch.arange(64))
    dist = Dist(device=torch.device("cpu"))

    def step() -> None:
        scst.losses(model, batch, dist, channels_last=False).loss.backward()

    step()  # warm-up
    return best(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flickr8k", type=Path, default=ROOT.parent / "shared" / "flickr8k")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from pycocoevalcap.cider.cider import Cider

    from caption.metrics import CiderD

    source, refs = references(args.flickr8k)
    start = time.perf_counter()
    scorer = CiderD(refs)
    build_s = time.perf_counter() - start
    rng = random.Random(0)
    images = [i for i in range(64) for _ in range(5)]
    samples = []
    for i in images:
        words = list(refs[i][0])
        del words[rng.randrange(len(words))]
        samples.append(words)
    ours = best(lambda: scorer.score(samples, images), args.repeats)
    gts = {k: [" ".join(r) for r in refs[i]] for k, i in enumerate(images)}
    res = {k: [" ".join(s)] for k, s in enumerate(samples)}
    theirs = best(lambda: Cider().compute_score(gts, res), args.repeats)
    step = scst_step_seconds(args.repeats)
    result = {
        "captions": source,
        "train_images": len(refs),
        "build_seconds": round(build_s, 3),
        "score_320_ms": round(ours * 1e3, 2),
        "pycocoevalcap_320_ms": round(theirs * 1e3, 2),
        "speedup_over_pycocoevalcap": round(theirs / ours, 1),
        "scst_step_ms": round(step * 1e3, 1),
        "score_share_of_step": round(ours / step, 4),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
