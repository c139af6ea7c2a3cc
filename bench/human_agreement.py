"""Human agreement on a caption split: each image's caption #0 scored against its other four.

    python bench/human_agreement.py [--flickr8k ../shared/flickr8k] [--split test]

This is the ceiling a model is compared with: how well one person's caption matches the
others', by the same metrics and code as `caption-evaluate` (BLEU with nltk, METEOR,
ROUGE-L and CIDEr-D with pycocoevalcap). A model scores against five references, a human
caption here against four, which lowers the human figures a little (BLEU most).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from caption.data.formats import read_dataset
from caption.metrics import bleu, coco_metrics

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flickr8k", type=Path, default=ROOT.parent / "shared" / "flickr8k")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    records = read_dataset(
        args.flickr8k / "Flickr8k.token.txt", args.flickr8k / "Flicker8k_Dataset"
    )[args.split]
    hypotheses = [r.captions[0] for r in records]
    references = [r.captions[1:] for r in records]
    metrics = bleu(references, hypotheses)
    metrics.update(
        coco_metrics(
            [[" ".join(c) for c in refs] for refs in references],
            [" ".join(h) for h in hypotheses],
        )
    )
    print(json.dumps({"split": args.split, "n_images": len(records), **metrics}))


if __name__ == "__main__":
    main()
