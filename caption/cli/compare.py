"""`caption-compare`: gather finished training runs into one markdown comparison table.

    caption-compare multirun/2026-11-25/14-00-00 [more run dirs or sweep dirs] [--output table.md]

Every folder below the given paths that holds a `summary.json` (written by `caption-train` at
the end of a run) is one row. Test scores come from `eval_test.json` where `caption-evaluate`
has written one; the grounding columns appear once any run has them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Optional metrics from eval_test.json, shown when at least one run has them.
EVAL_COLUMNS = {
    "bleu4": "test BLEU-4",
    "pointing_acc": "pointing acc",
    "attention_in_box": "attention in box",
}


def load_run(summary_path: Path) -> dict[str, Any]:
    """One run: its overrides, its training summary and its test metrics, if any."""
    summary = json.loads(summary_path.read_text())
    evaluation = summary_path.parent / "eval_test.json"
    metrics = json.loads(evaluation.read_text()) if evaluation.is_file() else {}
    overrides = [o for o in summary.get("overrides", []) if not o.startswith("hydra.")]
    return {"dir": summary_path.parent, "overrides": overrides, "summary": summary, "eval": metrics}


def find_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """Rows for every `summary.json` at or below `paths`, in path order (job numbers sort
    numerically), each labelled by the overrides that set it apart from the other rows."""
    found = sorted(
        {s for p in paths for s in p.rglob("summary.json")},
        key=lambda s: [int(x) if x.isdigit() else x for x in s.parts],
    )
    rows = [load_run(s) for s in found]
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    for r in rows:
        varied = [o for o in r["overrides"] if o not in shared]
        r["run"] = " ".join(varied) or r["dir"].name
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Render rows as a GitHub markdown table."""
    evals = [k for k in EVAL_COLUMNS if any(k in r["eval"] for r in rows)]
    header = ["run", "val BLEU-4", *(EVAL_COLUMNS[k] for k in evals), "train time", "parameters"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        s = r["summary"]
        cells = [
            f"`{r['run']}`",
            f"{s['best_val_bleu4']:.4f}",
            # None: the metric had nothing to score (no object mentions), like a missing one.
            *(f"{r['eval'][k]:.4f}" if r["eval"].get(k) is not None else "–" for k in evals),
            f"{s['train_seconds'] / 60:.1f} min",
            f"{s['parameters']:,}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="caption-compare", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run dirs or sweep dirs")
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        print(f"error: {missing[0]} does not exist; pass run or sweep directories", file=sys.stderr)
        sys.exit(2)
    rows = find_runs(args.paths)
    if not rows:
        print(
            f"error: no finished runs (summary.json) under {', '.join(map(str, args.paths))}",
            file=sys.stderr,
        )
        sys.exit(2)
    table = markdown_table(rows)
    print(table)
    if args.output:
        args.output.write_text(table + "\n")


if __name__ == "__main__":
    main()
