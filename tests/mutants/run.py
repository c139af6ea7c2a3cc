"""Mutation testing: plant each known-wrong equation and check that its tests fail.

Every `tests/mutants/*.toml` lists mutants as

    [[mutant]]
    name = "local: sigma = D instead of D/2"
    file = "caption/models/local.py"
    old = '''...exact text, occurring once in the file...'''
    new = '''...the mutated text...'''
    tests = ["tests/test_equations.py::test_local_attention_matches_reference"]

The working tree (tracked files and untracked ones git does not ignore) is copied to a
temporary folder once, so that the checkout is never modified. The listed tests must pass
there unmutated; then each mutant is applied in turn, only its own tests run (fast ones:
`-m "not slow"`, stopping at the first failure), and the file is restored. A mutant is
killed when its tests fail and survives when they pass. A mutant whose `old` text does not
occur exactly once is stale, an error. Exit status: 0 when every mutant is killed, 1 when
one survives, is stale or cannot be run, 2 when the unmutated tests fail.

Usage: python tests/mutants/run.py [--only SUBSTRING] [--output summary.json|summary.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MUTANTS = Path(__file__).resolve().parent
KEYS = ("name", "file", "old", "new", "tests")
KILLED, SURVIVED, TIMEOUT, STALE, ERROR = "killed", "survived", "timeout", "stale", "error"


class MutantError(ValueError):
    """A mutant that cannot be applied or a mutant file that cannot be read."""


@dataclass
class Mutant:
    name: str
    file: str  # relative to the repository root
    old: str
    new: str
    tests: list[str]
    source: str  # the .toml it came from


@dataclass
class Result:
    name: str
    source: str
    status: str  # killed | survived | timeout | stale | error
    seconds: float
    detail: str = ""  # why stale, or the failing test's last lines
    tests: list[str] = field(default_factory=list)


def load_mutants(paths: list[Path]) -> list[Mutant]:
    """The mutants of these .toml files, in file order; raises `MutantError` on a bad entry."""
    mutants: list[Mutant] = []
    for path in paths:
        try:
            entries = tomllib.loads(path.read_text(encoding="utf-8")).get("mutant", [])
        except tomllib.TOMLDecodeError as e:
            raise MutantError(f"{path.name}: not valid TOML ({e})") from None
        for k, entry in enumerate(entries):
            missing = [key for key in KEYS if key not in entry]
            unknown = sorted(set(entry) - set(KEYS))
            if missing or unknown:
                raise MutantError(
                    f"{path.name}: mutant #{k + 1} ({entry.get('name', '?')}): "
                    f"missing {missing}, unknown {unknown}"
                )
            if not entry["tests"] or entry["old"] == entry["new"]:
                raise MutantError(f"{path.name}: {entry['name']}: no tests, or old == new")
            mutants.append(Mutant(**{key: entry[key] for key in KEYS}, source=path.name))
    names = [m.name for m in mutants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise MutantError(f"duplicate mutant names: {duplicates}")
    return mutants


def mutate(text: str, mutant: Mutant) -> str:
    """`text` with the mutant applied; raises `MutantError` unless `old` occurs exactly once."""
    count = text.count(mutant.old)
    if count != 1:
        where = "does not occur" if count == 0 else f"occurs {count} times"
        raise MutantError(f"stale: its `old` text {where} in {mutant.file}")
    return text.replace(mutant.old, mutant.new)


def copy_tree(root: Path, dest: Path) -> None:
    """Copy the files git knows of and does not ignore (tracked or not) from root to dest."""
    listing = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listing.split("\0")):
        src = root / name
        if src.is_file():  # listed but deleted in the working tree: skip it
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[int | None, str]:
    """Run the fast tests in the copy; (pytest's exit status or None on timeout, output)."""
    # No bytecode: a mutant and its restored original can share a size and an mtime second,
    # and a cached .pyc of the mutant would then be run for the original.
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-B", "-m", "pytest", "-x", "-q", "-m", "not slow"]
    cmd += ["-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(
            cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    return proc.returncode, proc.stdout + proc.stderr


def tail(output: str, lines: int = 15) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


def run_mutant(copy: Path, mutant: Mutant, timeout: float) -> Result:
    """Apply one mutant in the copy, run its tests, restore the file."""
    start = time.perf_counter()
    path = copy / mutant.file

    def result(status: str, detail: str = "") -> Result:
        seconds = time.perf_counter() - start
        return Result(mutant.name, mutant.source, status, seconds, detail, mutant.tests)

    try:
        original = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return result(STALE, f"stale: {mutant.file} does not exist")
    try:
        mutated = mutate(original, mutant)
    except MutantError as e:
        return result(STALE, str(e))
    path.write_text(mutated, encoding="utf-8")
    try:
        rc, output = run_tests(copy, mutant.tests, timeout)
    finally:
        path.write_text(original, encoding="utf-8")
    if rc is None:
        return result(TIMEOUT, output)
    if rc in (1, 2):  # tests failed, or the mutant broke collection (an import error)
        return result(KILLED, tail(output, 3))
    if rc == 0:
        return result(SURVIVED, tail(output, 3))
    return result(ERROR, f"pytest exit status {rc}:\n{tail(output)}")


def summary(results: list[Result], seconds: float) -> tuple[str, bool]:
    """The kill-rate line, and whether every mutant was killed (timeouts count as killed)."""
    dead = sum(r.status in (KILLED, TIMEOUT) for r in results)
    rate = 100 * dead / len(results) if results else 100.0
    ok = dead == len(results)
    return f"{dead}/{len(results)} mutants killed ({rate:.0f}%) in {seconds:.0f} s", ok


def write_output(path: Path, results: list[Result], line: str) -> None:
    """A JSON summary, or a markdown table when the path ends in .md."""
    if path.suffix == ".md":
        names = [r.name.replace("|", r"\|") for r in results]  # a name may hold |c - p|
        rows = [
            f"| {r.status} | {name} | {r.source} | {r.seconds:.1f} |"
            for r, name in zip(results, names, strict=True)
        ]
        head = ["| status | mutant | file | seconds |", "|---|---|---|---|"]
        path.write_text("\n".join([f"{line}\n", *head, *rows]) + "\n", encoding="utf-8")
    else:
        data = {"summary": line, "mutants": [asdict(r) for r in results]}
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the mutants whose name contains this substring")
    parser.add_argument("--output", type=Path, help="write a summary (.json, or .md)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per mutant")
    parser.add_argument(
        "--files", nargs="*", type=Path, help="mutant .toml files (default: tests/mutants/*.toml)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        mutants = load_mutants(args.files or sorted(MUTANTS.glob("*.toml")))
    except MutantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.only:
        mutants = [m for m in mutants if args.only in m.name]
    if not mutants:
        print("error: no mutants to run", file=sys.stderr)
        return 1
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        copy = Path(tmp)
        copy_tree(ROOT, copy)
        tests = sorted({t for m in mutants for t in m.tests})
        rc, output = run_tests(copy, tests, args.timeout * 2)
        if rc != 0:
            print(f"error: the unmutated tests do not pass:\n{tail(output, 30)}", file=sys.stderr)
            return 2
        print(f"unmutated: {len(tests)} test ids pass ({time.perf_counter() - start:.0f} s)")
        results = []
        for mutant in mutants:
            r = run_mutant(copy, mutant, args.timeout)
            results.append(r)
            print(f"{r.status:8} {r.seconds:5.1f} s  [{r.source}] {r.name}", flush=True)
            if r.status not in (KILLED, TIMEOUT):
                print("    " + r.detail.replace("\n", "\n    "), flush=True)
    line, ok = summary(results, time.perf_counter() - start)
    print(line)
    if args.output:
        write_output(args.output, results, line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
