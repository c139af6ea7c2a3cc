"""The README's Flickr8k examples: the first test photos, their caption and two references.

    python bench/flickr8k_examples.py [--run outputs/flickr8k] [--n 6] [--figure <jpg>]

Reads the captions `make flickr8k` wrote (`<run>/test_captions.jsonl`, in split order) and
the references from the checkpoint's dataset. Prints a Markdown table and draws the photos
with their captions into one figure. The photos are the split's first ones, not chosen.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from PIL import Image

from caption.checkpoint import load_checkpoint
from caption.data.formats import read_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("outputs/flickr8k"))
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--figure", type=Path, default=Path("docs/flickr8k_examples.jpg"))
    args = parser.parse_args()
    config = load_checkpoint(args.run / "checkpoints" / "best.pt")["config"]
    records = read_split(config["data"], "test")[: args.n]
    lines = (args.run / "test_captions.jsonl").read_text().splitlines()[: args.n]
    captions = [json.loads(line)["caption"] for line in lines]
    print("| photo | generated (beam 3) | reference #0 | reference #1 |")
    print("|---|---|---|---|")
    for record, caption in zip(records, captions, strict=True):
        refs = [" ".join(c) for c in record.captions[:2]]
        print(f"| `{record.path.name}` | **{caption}** | {refs[0]} | {refs[1]} |")
    fig, axes = plt.subplots(2, (args.n + 1) // 2, figsize=(3.2 * ((args.n + 1) // 2), 7.4))
    for ax, record, caption in zip(axes.flat, records, captions, strict=False):
        ax.imshow(Image.open(record.path).convert("RGB"))
        ax.set_title("\n".join(textwrap.wrap(caption, 30)), fontsize=10)
        ax.set_xlabel(record.path.name, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(args.figure, dpi=90, pil_kwargs={"quality": 85})
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
