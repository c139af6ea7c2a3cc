"""CPU training step time with and without `caption.runtime.keep_freed_memory`.

Each measurement is a fresh process (glibc reads its settings once), running the default
model's training step on a batch of 64 random images. Runs alternate off/on so that other
load on the machine hits both alike; the script prints the medians and their ratio.

    python bench/allocator.py --repeats 3 --image-size 80
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEP = """
import json, resource, sys, time, torch
from caption.runtime import keep_freed_memory
from caption.models.build import build_model
from tests.helpers.config import compose_config
if sys.argv[1] == "on":
    keep_freed_memory()
torch.set_flush_denormal(True)
size, steps = int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = build_model(compose_config("train").model, vocab_size=40).train()
opt = torch.optim.Adam(model.parameters(), 1e-3)
images, captions = torch.rand(64, 3, size, size), torch.randint(4, 40, (64, 12))
def step():
    opt.zero_grad()
    model.loss(images, captions).loss.backward()
    opt.step()
step()
faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
for _ in range(steps):
    step()
seconds = time.perf_counter() - start
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"s_per_step": seconds / steps, "faults_per_step": faults / steps}))
"""


def measure(setting: str, size: int, steps: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", STEP, setting, str(size), str(steps)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="processes per setting")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--image-size", type=int, default=80)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for setting in runs:
            runs[setting].append(measure(setting, args.image_size, args.steps))
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
    for s in runs:
        print(
            f"keep_freed_memory {s:3s}: {med[s]['s_per_step']:.3f} s/step, "
            f"{med[s]['faults_per_step']:,.0f} page faults/step"
        )
    print(f"speed-up: {med['off']['s_per_step'] / med['on']['s_per_step']:.2f}x")


if __name__ == "__main__":
    main()
