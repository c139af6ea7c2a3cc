"""Benchmarks: training and decoding throughput, peak memory and FLOP utilization.

    python bench/throughput.py [--steps 200] [--decode-images 500] [--out results.json]

Four phases, each in its own process so that its peak memory is its own:

- `shapes_train`: the shapes default (`caption-train` with no overrides) for `--steps`
  optimizer steps through `train(cfg)`, the real loop: images/s and words/s.
- `shapes_decode`: that trained model captions `--decode-images` test images with greedy,
  beam 3 and beam 5 search, batched and one image at a time, side by side;
  `beam_speedup` is beam 5's ratio and `beam_identical` whether the captions are the same.
- `paper_train`: a paper-sized decoder (Xu et al.: 14x14 grid of D = 2048 cached features,
  LSTM 512, attention 512, embedding 512, vocabulary 10,000, batch 64) trained from random
  features: images/s, words/s, and the matmul FLOPs of a step (forward and backward, counted
  by `torch.utils.flop_counter`) per second as a fraction of this machine's dense float32
  matmul FLOP/s, measured in alternation with the steps (`flop_utilization`).
- `paper_decode`: beam 5 with the paper-sized decoder, batched and one image at a time.

It prints a table and writes every figure to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/throughput.py` from a checkout

from bench.measure import phase_in_subprocess, sync, timed_phase  # noqa: E402
from caption.data.vocab import END_ID, PAD_ID, START_ID  # noqa: E402
from caption.models.attention import SoftAttention  # noqa: E402
from caption.models.captioner import Captioner  # noqa: E402
from caption.models.scores import AdditiveScore  # noqa: E402

# The paper-sized decoder (Xu et al. 2015 and the authors' COCO script).
PAPER = {"grid": 14, "D": 2048, "hidden": 512, "attention": 512, "embed": 512, "vocab": 10000}
PAPER_BATCH = 64
PAPER_WORDS = (8, 16)  # caption lengths drawn uniformly from this range (COCO's bulk)


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Least wall-clock seconds of `repeats` calls: the run least disturbed by other work."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    return platform.processor() or "cpu"


class CachedFeatures(nn.Module):
    """Stands in for a frozen encoder whose annotation vectors come from the feature cache."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim

    def forward(self, images: Tensor) -> Tensor:
        raise RuntimeError("cached features are (B, L, D); there is no image encoder")


def paper_model(vocab: int = PAPER["vocab"], **dims: int) -> Captioner:
    """The paper-sized captioner over cached features (smaller dims for tests)."""
    d = {**PAPER, "vocab": vocab, **dims}
    return Captioner(
        CachedFeatures(d["D"]),
        SoftAttention,
        partial(AdditiveScore, hidden_dim=d["attention"]),
        d["vocab"],
        embed_dim=d["embed"],
        hidden_dim=d["hidden"],
        doubly_stochastic=1.0,
    )


def adam(params: Iterable[Tensor]) -> torch.optim.Optimizer:
    """The optimizer `caption-train` builds from `conf/optimizer/adam.yaml`, at lr 1e-4."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from caption.config import CONF_DIR

    cfg = OmegaConf.load(Path(CONF_DIR) / "optimizer" / "adam.yaml")
    return instantiate(cfg, lr=1e-4)(params=params)


def random_captions(B: int, V: int, words: tuple[int, int], seed: int = 0) -> Tensor:
    """(B, T) `<start> w.. <end> <pad>..` with lengths drawn uniformly from `words`, longest
    first, the order `collate_captions` gives a training batch."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(words[0], words[1] + 1, (B,), generator=g).sort(descending=True).values
    captions = torch.full((B, int(lengths.max()) + 2), PAD_ID)
    for b, n in enumerate(lengths.tolist()):
        captions[b, 0] = START_ID
        captions[b, 1 : n + 1] = torch.randint(4, V, (n,), generator=g)
        captions[b, n + 1] = END_ID
    return captions


def step_flops(model: Captioner, features: Tensor, captions: Tensor) -> int:
    """Matmul FLOPs of one training step's forward and backward, as torch counts them."""
    with FlopCounterMode(display=False) as counter:
        model.loss(features, captions).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_flops_per_sec(device: torch.device, n: int = 2048, repeats: int = 3) -> float:
    """This machine's dense float32 matmul FLOP/s: the best of `repeats` n x n products."""
    x, y = torch.randn(n, n, device=device), torch.randn(n, n, device=device)

    def product() -> None:
        x @ y
        sync(device)

    product()
    return 2 * n**3 / best_seconds(product, repeats)


# --------------------------------------------------------------------------------- phases


def phase_shapes_train(args: argparse.Namespace, work: Path, device: torch.device) -> dict:
    from hydra import compose, initialize_config_dir

    from caption.cli.train import train
    from caption.config import CONF_DIR
    from caption.data.shapes import generate_shapes

    data = generate_shapes(work / "shapes", n_train=2000, n_val=1, n_test=args.decode_images)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            [
                f"data.annotations={data}",
                f"data.images={data.parent}",
                f"run_dir={work / 'run'}",
                "trainer.max_epochs=100",
                f"trainer.max_steps={args.steps}",
                "trainer.progress=false",
                f"trainer.device={device}",
                "trainer.val_max_images=1",
            ],
        )
    summary = train(cfg)
    return {
        "images_per_sec": round(summary["images_per_sec"], 1),
        "words_per_sec": round(summary["words_per_sec"], 1),
        "steps": summary["steps"],
        "batch_size": cfg.data.batch_size,
        "image_size": cfg.data.image_size,
    }


def phase_shapes_decode(args: argparse.Namespace, work: Path, device: torch.device) -> dict:
    from caption.data.dataset import ImageBank
    from caption.data.formats import read_karpathy
    from caption.models.build import load_captioner

    model, _, _ = load_captioner(work / "run" / "checkpoints" / "last.pt", device)
    records = read_karpathy(work / "shapes" / "dataset_shapes.json")["test"]
    images = ImageBank(records, model.image_size).pixels.to(device)
    result: dict = {"images": len(images), "batch_size": args.decode_batch}
    for name, strategy, k in (("greedy", "greedy", 1), ("beam3", "beam", 3), ("beam5", "beam", 5)):
        result.update(decode_pair(model, images, name, strategy, k, args.decode_batch, device))
    return result


def decode_pair(
    model: Captioner,
    inputs: Tensor,
    name: str,
    strategy: str,
    k: int,
    batch: int,
    device: torch.device,
    max_len: int = 30,
    rounds: int = 2,
) -> dict:
    """Batched vs one-image-at-a-time decoding of the same inputs, side by side: the best of
    `rounds` alternating runs of each, after one warm-up run of each."""

    def run(size: int) -> Tensor:
        out = []
        for i in range(0, len(inputs), size):
            gen = model.generate(
                inputs[i : i + size], strategy=strategy, beam_size=k, max_len=max_len
            )
            out.extend(t[t != PAD_ID] for t in gen.tokens.cpu())
        sync(device)
        return out

    batched_tokens = run(batch)  # warm-up, and the captions to compare
    single_tokens = run(1)
    # Alternate the two and keep the best of each: both see the same machine, and load from
    # other processes (which slows the many small steps of one-at-a-time most) hits both alike.
    times: dict[int, list[float]] = {batch: [], 1: []}
    for _ in range(rounds):
        for size, seconds in times.items():
            seconds.append(best_seconds(lambda size=size: run(size), 1))
    batched, single = min(times[batch]), min(times[1])
    same = all(torch.equal(a, b) for a, b in zip(batched_tokens, single_tokens, strict=True))
    n = len(inputs)
    return {
        f"{name}_batched_images_per_sec": round(n / batched, 1),
        f"{name}_one_at_a_time_images_per_sec": round(n / single, 1),
        f"{name}_speedup": round(single / batched, 2),
        f"{name}_identical": same,
    }


def phase_paper_train(args: argparse.Namespace, work: Path, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = paper_model().to(device)
    L = PAPER["grid"] ** 2
    features = torch.randn(PAPER_BATCH, L, PAPER["D"], device=device).relu_()  # post-ReLU maps
    captions = random_captions(PAPER_BATCH, PAPER["vocab"], PAPER_WORDS).to(device)
    words = int((captions[:, 1:] != PAD_ID).sum())
    optimizer = adam(model.parameters())
    params = list(model.parameters())

    def step() -> None:
        loss = model.loss(features, captions).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        sync(device)

    flops = step_flops(model, features, captions)
    step()  # warm-up: allocator, first-touch of Adam's state
    # Alternate the reference matmul and the step, keeping the best of each: both see the
    # same machine, and load from other processes disturbs both alike.
    peaks, steps = [], []
    for _ in range(args.rounds):
        peaks.append(matmul_flops_per_sec(device))
        steps.append(best_seconds(step, 1))
    peak, seconds = max(peaks), min(steps)
    return {
        "batch_size": PAPER_BATCH,
        "words_per_step": words,
        "step_seconds": round(seconds, 3),
        "images_per_sec": round(PAPER_BATCH / seconds, 1),
        "words_per_sec": round(words / seconds, 1),
        "step_gflop": round(flops / 1e9, 2),
        "achieved_gflop_per_sec": round(flops / seconds / 1e9, 1),
        "matmul_gflop_per_sec": round(peak / 1e9, 1),
        "flop_utilization": round(flops / seconds / peak, 3),
        "step_seconds_all": [round(s, 3) for s in steps],
        "matmul_gflop_per_sec_all": [round(p / 1e9, 1) for p in peaks],
    }


def phase_paper_decode(args: argparse.Namespace, work: Path, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = paper_model().to(device).eval()
    # With random weights `<end>` alone is the likeliest caption, and beam search, which keeps
    # finished captions, would settle after two steps: without `<end>` every caption is 16 words.
    with torch.no_grad():
        model.decoder.L_o.bias[END_ID] = float("-inf")
    L = PAPER["grid"] ** 2
    features = torch.randn(args.paper_decode_images, L, PAPER["D"], device=device).relu_()
    result = {"images": args.paper_decode_images, "max_len": 16}
    result.update(
        decode_pair(model, features, "beam5", "beam", 5, args.decode_batch, device, max_len=16)
    )
    return result


PHASES = {
    "shapes_train": phase_shapes_train,
    "shapes_decode": phase_shapes_decode,
    "paper_train": phase_paper_train,
    "paper_decode": phase_paper_decode,
}


def run_phase(args: argparse.Namespace) -> None:
    result, device, seconds = timed_phase(PHASES, args)
    result["seconds"] = seconds
    result["device"] = device_name(device)
    print(json.dumps(result))


def table(results: dict) -> str:
    """The figures as a markdown table."""
    s, d, p, q = (results[k] for k in PHASES)
    rows = [
        (
            "shapes default training",
            f"{s['images_per_sec']:,} images/s, {s['words_per_sec']:,} words/s",
        ),
        (
            "paper-sized training",
            f"{p['images_per_sec']:,} images/s, {p['words_per_sec']:,} words/s",
        ),
        (
            "paper-sized step",
            f"{p['step_gflop']} GFLOP in {p['step_seconds']} s: "
            f"{p['achieved_gflop_per_sec']} GFLOP/s",
        ),
        ("dense matmul (float32, 2048²)", f"{p['matmul_gflop_per_sec']} GFLOP/s"),
        ("**flop_utilization**", f"**{p['flop_utilization']:.1%}**"),
    ]
    for name in ("greedy", "beam3", "beam5"):
        rows.append(
            (
                f"shapes {name}, batched vs one at a time",
                f"{d[f'{name}_batched_images_per_sec']:,} vs "
                f"{d[f'{name}_one_at_a_time_images_per_sec']:,} images/s: "
                f"{d[f'{name}_speedup']}x, identical: {d[f'{name}_identical']}",
            )
        )
    rows += [
        (
            "**beam_speedup** (shapes, beam 5)",
            f"**{results['beam_speedup']}x**, identical: {results['beam_identical']}",
        ),
        (
            "paper-sized beam 5, batched vs one at a time",
            f"{q['beam5_batched_images_per_sec']:,} vs {q['beam5_one_at_a_time_images_per_sec']:,} "
            f"images/s: {q['beam5_speedup']}x, identical: {q['beam5_identical']}",
        ),
        (
            "peak memory (shapes train / decode / paper train / decode)",
            " / ".join(f"{results[k]['peak_memory_mb']:,.0f} MB" for k in PHASES),
        ),
    ]
    lines = ["| benchmark | figure |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="shapes training steps")
    parser.add_argument("--decode-images", type=int, default=500, help="shapes test images")
    parser.add_argument("--decode-batch", type=int, default=500, help="images per batch")
    parser.add_argument("--paper-decode-images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=6, help="paper step/matmul rounds")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads per phase (0: torch's default)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "results.json")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        run_phase(args)
        return
    results: dict = {"load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as work:
        for phase in PHASES:
            keys = (
                "steps",
                "decode_images",
                "decode_batch",
                "paper_decode_images",
                "rounds",
                "device",
                "threads",
            )
            results[phase] = phase_in_subprocess(__file__, phase, work, args, keys)
    results["beam_speedup"] = results["shapes_decode"]["beam5_speedup"]
    results["beam_identical"] = results["shapes_decode"]["beam5_identical"]
    results["flop_utilization"] = results["paper_train"]["flop_utilization"]
    results["torch"] = torch.__version__
    # Other processes' load, for the reader to judge contention: 1/5/15-minute averages.
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
