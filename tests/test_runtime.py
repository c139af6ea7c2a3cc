"""Process-wide CPU settings: glibc keeps freed activations instead of faulting them in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT

# Page faults over three training steps of the default model on 80 px images. By default
# glibc hands the freed activations of a step back to the kernel, and the next step faults
# the same memory in again (with zeroing), which took most of a CPU step's time.
PROGRAM = """
import resource, sys, torch
from caption.runtime import keep_freed_memory
from tests.helpers.config import compose_config
from caption.models.build import build_model
if sys.argv[1] == "on":
    assert keep_freed_memory()
torch.manual_seed(0)
model = build_model(compose_config("train").model, vocab_size=40).train()
images, captions = torch.rand(8, 3, 80, 80), torch.randint(4, 40, (8, 12))
def step():
    model.zero_grad()
    model.loss(images, captions).loss.backward()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(setting: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, setting],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_training_steps_reuse_freed_memory() -> None:
    # Fault counts of one run swing by 2x on a busy machine (other processes, thread pools
    # waking up); the fewest of three runs is each setting's own cost.
    off = min(faults("off") for _ in range(3))
    on = min(faults("on") for _ in range(3))
    assert on < off / 2, (off, on)
