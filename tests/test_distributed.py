"""Data-parallel training: the sampler's sharding, and two gloo processes against one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from caption.data.sampler import EpochSampler
from tests.helpers import BIN, ROOT
from tests.helpers.config import TINY_MODEL


def test_epoch_sampler_shards_one_permutation_per_epoch() -> None:
    n, world = 23, 3
    ranks = [EpochSampler(n, seed=4, rank=r, world_size=world) for r in range(world)]
    shares = [list(s) for s in ranks]
    assert all(len(s) == len(r) == 8 for s, r in zip(shares, ranks, strict=True))  # 23 -> 3 x 8
    order = ranks[0].order().tolist()
    assert sorted(order) == list(range(n))
    # Step k of B samples on every rank is batch k of one process with batch B * W.
    b = 2
    for k in range(3):  # whole steps (the last one holds the padding)
        together = sorted(i for s in shares for i in s[k * b : (k + 1) * b])
        assert together == sorted(order[k * b * world : (k + 1) * b * world])
    # Every sample is served; the one padding sample comes from the start of the order.
    served = [i for s in shares for i in s]
    assert set(served) == set(range(n)) and len(served) == 24
    # A new epoch, a new order; the same epoch, the same order (nothing else is consulted).
    ranks[0].set_epoch(2)
    assert ranks[0].order().tolist() != order
    ranks[0].set_epoch(1)
    assert ranks[0].order().tolist() == order


def test_epoch_sampler_resumes_inside_the_epoch() -> None:
    whole = list(EpochSampler(20, seed=0))
    later = EpochSampler(20, seed=0)
    later.set_epoch(1, start=6)
    assert list(later) == whole[6:] and len(later) == 14
    two = [EpochSampler(20, seed=0, rank=r, world_size=2) for r in range(2)]
    for s in two:
        s.set_epoch(1, start=6)
    assert sorted(i for s in two for i in s) == sorted(whole[6:])


def _train(
    run_dir: Path, shapes: Path, nproc: int, batch_size: int, cache: Path, extra: list[str]
) -> None:
    args = [
        f"data.annotations={shapes}",
        f"data.images={shapes.parent}",
        f"hydra.run.dir={run_dir}",
        f"data.batch_size={batch_size}",
        "trainer.max_epochs=1",
        "trainer.max_steps=3",
        "trainer.val_max_images=4",
        "trainer.progress=false",
        "trainer.device=cpu",
        # Plain SGD at a constant rate: Adam's first steps are lr * sign(g), which turns float
        # noise in a near-zero gradient into a full step and hides what is compared.
        "optimizer._target_=torch.optim.SGD",
        "optimizer.lr=0.5",
        "scheduler=constant",
        # Dropout masks differ between one process and two; BatchNorm batch statistics
        # (per rank under DDP) are avoided by a frozen encoder, which the cache needs anyway.
        "model.dropout=0",
        "model.encoder.fine_tune=false",
        "data.feature_cache=true",
        f"data.feature_cache_dir={cache}",
        "data.feature_cache_dtype=float32",
        *TINY_MODEL,
        *extra,
    ]
    if nproc == 1:
        cmd = [str(BIN / "caption-train"), *args]
    else:
        cmd = [
            str(BIN / "torchrun"),
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "caption.cli.train",
            *args,
        ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# Hard attention with N = 2 samples per image, every caption on the expected context (so that
# the ranks' sampling cannot differ from one process's): each sample's words must count.
HARD_SAMPLES = [
    "model/attention=hard",
    "model.attention.samples=2",
    "model.attention.expectation_prob=1",
]


@pytest.mark.slow
@pytest.mark.cli
@pytest.mark.parametrize("extra", [[], HARD_SAMPLES], ids=["soft", "hard-samples"])
def test_two_gloo_processes_match_one_process_on_the_combined_batch(
    tiny_shapes: Path, tmp_path: Path, extra: list[str]
) -> None:
    cache = tmp_path / "cache"
    _train(tmp_path / "one", tiny_shapes, nproc=1, batch_size=16, cache=cache, extra=extra)
    _train(tmp_path / "two", tiny_shapes, nproc=2, batch_size=8, cache=cache, extra=extra)
    one = torch.load(tmp_path / "one/checkpoints/last.pt", weights_only=True)
    two = torch.load(tmp_path / "two/checkpoints/last.pt", weights_only=True)
    assert one["progress"]["step"] == two["progress"]["step"] == 3
    assert two["progress"]["world_size"] == 2 and len(two["rng"]) == 2  # each rank's RNG
    diffs = 0.0
    for name, p in one["model"].items():
        if p.is_floating_point():
            # Summation order differs (two partial sums, then all-reduce), nothing else.
            diffs = max(diffs, (two["model"][name] - p).abs().max().item())
            torch.testing.assert_close(two["model"][name], p, rtol=0, atol=1e-5)
    # Against a model that trained differently, the same check fails: batch 8 on one process.
    _train(tmp_path / "half", tiny_shapes, nproc=1, batch_size=8, cache=cache, extra=extra)
    half = torch.load(tmp_path / "half/checkpoints/last.pt", weights_only=True)["model"]
    worst = max((half[k] - p).abs().max().item() for k, p in one["model"].items())
    print(f"one vs two processes: max diff {diffs}; one vs batch 8: {worst}")
    assert worst > 1e-3, "the tolerance cannot tell different training apart"
