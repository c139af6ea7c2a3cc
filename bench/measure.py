"""What every benchmark here needs: phases in their own processes, their peak memory, and
timings that cover the GPU."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from caption.runtime import configure_cpu


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory: GPU memory allocated on CUDA, else resident CPU memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_phase(
    phases: dict[str, Callable[[argparse.Namespace, Path, torch.device], dict]],
    args: argparse.Namespace,
) -> tuple[dict, torch.device, float]:
    """Run phase `args.phase` in this process, set up as every command sets itself up.

    Returns:
        The phase's figures with `peak_memory_mb` added, its device, and its seconds.
    """
    configure_cpu()  # what every command does: flush denormals, keep freed memory
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    start = time.perf_counter()
    result = phases[args.phase](args, Path(args.work), device)
    result["peak_memory_mb"] = round(peak_memory_mb(device), 1)
    return result, device, round(time.perf_counter() - start, 1)


def phase_in_subprocess(
    script: str, phase: str, work: str, args: argparse.Namespace, keys: Sequence[str]
) -> dict:
    """Run `script --phase <phase>` in a fresh process, so that its peak memory is its own,
    passing on the options `keys` of `args`; its figures, the last line it printed.

    Exits with the phase's stderr if it fails.
    """
    argv = [sys.executable, script, "--phase", phase, "--work", work]
    for key in keys:
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    print(f"bench: {phase} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench: phase {phase} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
