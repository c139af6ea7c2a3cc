"""Two or more `caption-evaluate` results side by side, as one markdown table.

    python bench/side_by_side.py NAME=eval.json NAME=eval.json ...

Each argument is a column: a label, `=`, and the JSON file `caption-evaluate output=` wrote.
Rows are the metrics any of the files has, in the order papers report them; the last column
is the change from the first file to the last.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = {
    "bleu1": "BLEU-1",
    "bleu2": "BLEU-2",
    "bleu3": "BLEU-3",
    "bleu4": "BLEU-4",
    "meteor": "METEOR",
    "rouge_l": "ROUGE-L",
    "cider": "CIDEr-D",
    "repeated_trigrams": "captions with a repeated trigram",
    "pointing_acc": "pointing accuracy",
    "attention_in_box": "attention in box",
}


def table(columns: list[tuple[str, dict]]) -> str:
    """The markdown table of the metrics in `columns`, (label, metrics) each."""
    head = "| metric | " + " | ".join(label for label, _ in columns) + " | change |"
    lines = [head, "|---" * (len(columns) + 2) + "|"]
    for key, name in ROWS.items():
        values = [m.get(key) for _, m in columns]
        if all(v is None for v in values):
            continue
        cells = ["" if v is None else f"{v:.4f}" for v in values]
        first, last = values[0], values[-1]
        change = ""
        if first is not None and last is not None:
            change = f"{last - first:+.4f}" + (f" ({(last / first - 1):+.1%})" if first else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {change} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    columns = []
    for arg in argv:
        label, sep, path = arg.partition("=")
        if not sep or not Path(path).is_file():
            print(
                f"side_by_side: {arg!r} is not LABEL=<caption-evaluate output JSON>",
                file=sys.stderr,
            )
            return 2
        columns.append((label, json.loads(Path(path).read_text())))
    if len(columns) < 2:
        print("side_by_side: give two or more LABEL=eval.json columns", file=sys.stderr)
        return 2
    print(table(columns))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
