"""Benchmark: the Flickr8k CPU recipe's speed on real photographs.

    python bench/flickr8k.py [--feature-images 1000] [--steps 100] [--decode-images 500]
        [--flickr8k ../shared/flickr8k] [--checkpoint outputs/flickr8k/checkpoints/best.pt]
        [--out outputs/bench/flickr8k.json]

Full size, as `make bench-flickr8k` runs it (the defaults above):

    python bench/flickr8k.py --out bench/flickr8k.json

The recipe is `conf/experiment/flickr8k_cpu.yaml` (frozen ImageNet EfficientNet-Lite0, 224 px
-> 7x7x1280 annotation vectors cached as float16; soft attention, additive score, embedding
and LSTM 512; batch 64; fused Adam at 1e-3; gradient norm clipped to 5), composed with Hydra
as `caption-train experiment=flickr8k_cpu data.format=flickr8k ...` composes it, and the model
built by `caption.models.build.build_model`, so the figures are the recipe's own. The data is
the raw Flickr8k layout under `--flickr8k`: `Flicker8k_Dataset/*.jpg`, `Flickr8k.token.txt`
and `Flickr_8k.{train,dev,test}Images.txt`. Three phases, each in its own process so that its
peak memory (ru_maxrss) is its own:

- `features`: `FeatureBank.build` of the first `--feature-images` val photos into a fresh
  cache entry, with the recipe's encoder, dtype, batch and DataLoader workers: images/s, the
  bytes per image, their extrapolation to the 7,000 train + val images the recipe caches, and
  the entry's real size (apparent, and allocated on disk as `du` counts it).
- `train`: `--steps` optimizer steps of `caption.training.step.train_step`, the real training
  step, after `--warmup-steps`, on those cached features with their real captions and the
  real vocabulary (train captions, min_count 5): caption-image pairs/s (one step is 64 pairs)
  and predicted words/s (`<end>` included, as `caption-train` counts them).
- `decode`: a trained checkpoint (`--checkpoint`) captions the first `--decode-images` test
  photos as `caption-evaluate` does (images read into an `ImageBank`, then `decode_bank`,
  encoder included) at beam 1 (greedy) and beam 3, alternated `--rounds` times, keeping the
  best of each: images/s of each and `beam3_slowdown`, with each one's mean words per caption,
  on which its time depends (beam search, with no length penalty, may settle on shorter
  captions than greedy). Skipped without a checkpoint: an untrained model decodes to
  max_len, which would misstate both.

It prints a table and writes every figure to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/flickr8k.py` from a checkout

from bench.measure import phase_in_subprocess, sync, timed_phase  # noqa: E402
from caption.config import CONF_DIR  # noqa: E402
from caption.data.dataset import CaptionBatch, ImageBank  # noqa: E402
from caption.data.formats import read_dataset  # noqa: E402
from caption.data.records import ImageRecord  # noqa: E402
from caption.data.vocab import Vocabulary  # noqa: E402

RECIPE = "flickr8k_cpu"
CACHED_IMAGES = 7000  # train + val: what the recipe's feature cache holds


def recipe(args: argparse.Namespace) -> DictConfig:
    """The recipe's training config over the Flickr8k copy at `args.flickr8k`.

    Returns:
        The composed config of `caption-train experiment=flickr8k_cpu` on that copy.
    """
    from hydra import compose, initialize_config_dir

    data = Path(args.flickr8k).resolve()
    overrides = [f"experiment={RECIPE}"]
    overrides += [
        "data.format=flickr8k",
        f"data.annotations={data / 'Flickr8k.token.txt'}",
        f"data.images={data / 'Flicker8k_Dataset'}",
        f"trainer.device={args.device}",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides)


def splits_and_vocab(cfg: DictConfig) -> tuple[dict[str, list[ImageRecord]], Vocabulary]:
    """The records of each split, and the vocabulary `caption-train` builds from them."""
    d = cfg.data
    splits = read_dataset(d.annotations, d.images, format=d.format)
    vocab = Vocabulary.build(
        (c for r in splits["train"] for c in r.captions),
        min_count=d.min_count,
        max_size=d.vocab_size,
    )
    return splits, vocab


def entry_sizes(folder: Path) -> tuple[int, int]:
    """A cache entry's (apparent bytes, bytes allocated on disk), as `du -b` and `du` count."""
    stats = [p.stat() for p in folder.iterdir() if p.is_file()]
    return sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats)


# --------------------------------------------------------------------------------- phases


def phase_features(args: argparse.Namespace, work: Path, device: torch.device) -> dict:
    """Build the feature cache of `--feature-images` val photos into `work/cache`."""
    from caption.data.features import FeatureBank
    from caption.models.build import build_model

    cfg = recipe(args)
    d = cfg.data
    splits, vocab = splits_and_vocab(cfg)
    records = splits["val"][: args.feature_images]
    torch.manual_seed(cfg.trainer.seed)
    encoder = build_model(cfg.model, len(vocab)).encoder.to(device)
    bank = ImageBank(records, d.image_size, preload=False, max_pixels=d.max_image_pixels)
    start = time.perf_counter()
    cached = FeatureBank.build(
        encoder,
        bank,
        work / "cache",
        dtype=d.feature_cache_dtype,
        batch_size=d.batch_size,
        num_workers=d.num_workers,
        device=device,
    )
    seconds = time.perf_counter() - start
    n = len(cached)
    per_image = cached.features[0].nbytes  # L x D x itemsize
    apparent, on_disk = entry_sizes(cached.folder)
    # The workers decode the JPEGs: their peak is not this process's (RUSAGE_CHILDREN is the
    # largest of them).
    workers_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "recipe": f"conf/experiment/{RECIPE}.yaml",
        "encoder": cfg.model.encoder.name,
        "image_size": d.image_size,
        "grid_and_dim": list(cached.features.shape[1:]),
        "dtype": d.feature_cache_dtype,
        "batch_size": d.batch_size,
        "num_workers": d.num_workers,
        "images": n,
        "build_seconds": round(seconds, 2),
        "images_per_sec": round(n / seconds, 1),
        "bytes_per_image": per_image,
        f"bytes_{CACHED_IMAGES}_images": per_image * CACHED_IMAGES,
        f"mb_{CACHED_IMAGES}_images": round(per_image * CACHED_IMAGES / 1e6, 1),
        "entry_apparent_bytes": apparent,
        "entry_disk_bytes": on_disk,
        "entry_disk_bytes_per_image": round(on_disk / n, 1),
        "workers_peak_memory_mb": round(workers_kib / 1024, 1),
    }


def batches(loader: torch.utils.data.DataLoader) -> Iterator[CaptionBatch]:
    """The loader's batches, epoch after epoch: `--steps` may outlast one epoch."""
    epoch = 1
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def phase_train(args: argparse.Namespace, work: Path, device: torch.device) -> dict:
    """Time `--steps` real training steps on the features phase's cache entry."""
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    from caption.data.dataset import CaptionDataset, collate_captions
    from caption.data.features import FeatureBank
    from caption.data.sampler import EpochSampler
    from caption.models.build import build_model
    from caption.speed import Precision
    from caption.training.dist import Dist
    from caption.training.objectives import CrossEntropy
    from caption.training.step import build_optimizer, train_step
    from caption.training.trainer import seed_everything

    cfg = recipe(args)
    d, t = cfg.data, cfg.trainer
    seed_everything(t.seed)
    splits, vocab = splits_and_vocab(cfg)
    model = build_model(cfg.model, len(vocab)).to(device)
    # The entry the features phase wrote, of the same records in the same order.
    (folder,) = {p.parent for p in (work / "cache").glob("*/features.npy")}
    bank = FeatureBank(folder, splits["val"][: args.feature_images])
    pairs = CaptionDataset(bank, vocab, d.max_caption_len)
    # In this process, not in workers: a batch from the cache is a few gathers of a memory
    # map, and a worker's memory would not be in this phase's peak.
    loader = DataLoader(
        pairs,
        batch_size=d.batch_size,
        sampler=EpochSampler(len(pairs), t.seed),
        collate_fn=collate_captions,
        drop_last=True,  # every step a full batch of 64 pairs, as nearly all of an epoch's are
    )
    optimizer, params = build_optimizer(cfg, model)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=args.warmup_steps + args.steps)
    dist, precision = Dist(device=device), Precision(t.precision, device)
    xe = CrossEntropy()
    model.train()
    stream = batches(loader)
    for _ in range(args.warmup_steps):  # the allocator, first touch of Adam's state
        train_step(next(stream), xe, model, optimizer, scheduler, params, dist, t, precision)
    sync(device)
    steps, n_pairs, words = [], 0, 0
    for _ in range(args.steps):
        start = time.perf_counter()
        batch = next(stream)  # fetching the batch is part of a step, as in caption-train
        train_step(batch, xe, model, optimizer, scheduler, params, dist, t, precision)
        sync(device)
        steps.append(time.perf_counter() - start)
        n_pairs += len(batch.captions)
        words += int(batch.lengths.sum()) - len(batch.lengths)  # <end> included
    seconds = sum(steps)
    return {
        "vocab_size": len(vocab),
        "parameters": sum(p.numel() for p in params),
        "cached_images": len(bank),
        "pairs_in_cache": len(pairs),
        "batch_size": d.batch_size,
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "seconds": round(seconds, 2),
        "pairs_per_sec": round(n_pairs / seconds, 1),
        "words_per_sec": round(words / seconds, 1),
        "words_per_pair": round(words / n_pairs, 2),
        "step_seconds_median": round(statistics.median(steps), 4),
        "step_seconds_min": round(min(steps), 4),
    }


def phase_decode(args: argparse.Namespace, work: Path, device: torch.device) -> dict:
    """Time greedy and beam 3 decoding of `--decode-images` test photos, alternated."""
    from caption.evaluation.decode import decode_bank
    from caption.models.build import load_captioner

    model, vocab, cfg = load_captioner(args.checkpoint, device)
    ev = OmegaConf.load(Path(CONF_DIR) / "evaluate.yaml")  # caption-evaluate's max_len, batch
    data = Path(args.flickr8k)
    records = read_dataset(
        data / "Flickr8k.token.txt", data / "Flicker8k_Dataset", format="flickr8k"
    )["test"][: args.decode_images]
    size = model.image_size
    start = time.perf_counter()
    bank = ImageBank(records, size, preload=True)  # as caption-evaluate reads them
    load_seconds = time.perf_counter() - start
    warm = ImageBank(records[: ev.batch_size], size, preload=True)
    beams = {"greedy": ("greedy", 1), "beam3": ("beam", 3)}

    def run(name: str, images: ImageBank) -> list[dict]:
        strategy, k = beams[name]
        out = decode_bank(
            model,
            images,
            vocab,
            strategy=strategy,
            beam_size=k,
            max_len=ev.max_len,
            batch_size=ev.batch_size,
            device=device,
            length_penalty=ev.length_penalty,  # caption-evaluate's, as make flickr8k decodes
        )
        sync(device)
        return out

    for name in beams:  # warm-up of each on one batch
        run(name, warm)
    # Alternate the two and keep the best of each: both see the same machine, and load from
    # other processes hits both alike.
    seconds: dict[str, list[float]] = {name: [] for name in beams}
    captions: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for name in beams:
            start = time.perf_counter()
            captions[name] = run(name, bank)
            seconds[name].append(time.perf_counter() - start)
    n = len(bank)
    result: dict = {
        "checkpoint": str(args.checkpoint),
        "checkpoint_model": describe(cfg),
        "images": n,
        "load_images_per_sec": round(n / load_seconds, 1),
        "max_len": ev.max_len,
        "length_penalty": ev.length_penalty,
        "batch_size": ev.batch_size,
        "rounds": args.rounds,
    }
    for name in beams:
        lengths = [len(c["tokens"]) for c in captions[name]]
        result[f"{name}_images_per_sec"] = round(n / min(seconds[name]), 1)
        result[f"{name}_seconds_all"] = [round(s, 2) for s in seconds[name]]
        result[f"{name}_words_per_caption"] = round(sum(lengths) / n, 2)
        # Captions that ran to max_len: many would mean an untrained model, and a slow decode.
        result[f"{name}_at_max_len"] = sum(n_words >= ev.max_len for n_words in lengths)
    result["beam3_slowdown"] = round(min(seconds["beam3"]) / min(seconds["greedy"]), 2)
    return result


def describe(cfg: DictConfig) -> str:
    """A checkpoint's model in a few words, to see that it is the recipe's."""
    m = cfg.model
    return (
        f"{m.encoder.name}, {m.attention._target_.rsplit('.', 1)[-1]}, "
        f"{m.score._target_.rsplit('.', 1)[-1]}, embed {m.embed_dim}, hidden {m.hidden_dim}"
    )


PHASES = {"features": phase_features, "train": phase_train, "decode": phase_decode}


def run_phase(args: argparse.Namespace) -> None:
    """Run one phase in this process and print its figures as one JSON line."""
    result, _, seconds = timed_phase(PHASES, args)
    result["phase_seconds"] = seconds
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))


def table(results: dict) -> str:
    """The figures as a markdown table."""
    f, t, d = results["features"], results["train"], results["decode"]
    grid = "x".join(str(x) for x in f["grid_and_dim"])
    rows = [
        (
            f"feature cache build ({f['encoder']}, {f['image_size']} px, {f['images']} images)",
            f"{f['images_per_sec']:,} images/s",
        ),
        (
            f"cache per image ({grid} {f['dtype']})",
            f"{f['bytes_per_image']:,} B; {f['entry_disk_bytes_per_image']:,.0f} B on disk",
        ),
        (f"cache of {CACHED_IMAGES:,} train + val images", f"{f[f'mb_{CACHED_IMAGES}_images']} MB"),
        (
            f"decoder training (batch {t['batch_size']}, {t['steps']} steps)",
            f"{t['pairs_per_sec']:,} pairs/s, {t['words_per_sec']:,} words/s",
        ),
    ]
    if "skipped" in d:
        rows.append(("decoding", f"skipped: {d['skipped']}"))
    else:
        for name, label in (("greedy", "greedy (beam 1)"), ("beam3", "beam 3")):
            rows.append(
                (
                    f"decoding {d['images']} test photos, {label}",
                    f"{d[f'{name}_images_per_sec']:,} images/s, "
                    f"{d[f'{name}_words_per_caption']} words/caption",
                )
            )
        rows.append(
            ("**beam3_slowdown** (beam 3 time / greedy time)", f"**{d['beam3_slowdown']}x**")
        )
    run = [k for k in PHASES if "peak_memory_mb" in results[k]]
    rows.append(
        (
            f"peak memory ({' / '.join(run)})",
            " / ".join(f"{results[k]['peak_memory_mb']:,.0f} MB" for k in run),
        )
    )
    lines = ["| benchmark | figure |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    """The command line (a phase's process gets `--phase` and `--work` too)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flickr8k", type=Path, default=ROOT.parent / "shared" / "flickr8k")
    parser.add_argument(
        "--feature-images", type=int, default=1000, help="val photos to cache and train on"
    )
    parser.add_argument("--steps", type=int, default=100, help="timed optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--decode-images", type=int, default=500, help="test photos")
    parser.add_argument("--rounds", type=int, default=3, help="greedy/beam 3 alternations")
    parser.add_argument(
        "--checkpoint", type=Path, default=ROOT / "outputs" / "flickr8k" / "checkpoints" / "best.pt"
    )
    parser.add_argument("--device", default="cpu", help="cpu (the recipe's), auto, cuda, cuda:N")
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads per phase (0: torch's default)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "flickr8k.json")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.feature_images * 5 < 64:  # five captions a photo; a step takes 64 pairs
        parser.error("--feature-images: at least 13 photos make one batch of 64 pairs")
    return args


def main() -> None:
    """Run each phase in its own process, then print the table and write `--out`."""
    args = parse_args()
    if args.phase:
        run_phase(args)
        return
    results: dict = {"load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as work:
        for phase in PHASES:
            if phase == "decode" and not args.checkpoint.is_file():
                reason = f"no checkpoint at {args.checkpoint} (pass --checkpoint <best.pt>)"
                print(f"bench: decode skipped: {reason}", file=sys.stderr, flush=True)
                results[phase] = {"skipped": reason}
                continue
            keys = (
                "flickr8k",
                "feature_images",
                "steps",
                "warmup_steps",
                "decode_images",
                "rounds",
                "checkpoint",
                "device",
                "threads",
            )
            results[phase] = phase_in_subprocess(__file__, phase, work, args, keys)
    results["recipe"] = results["features"]["recipe"]
    results["features_images_per_sec"] = results["features"]["images_per_sec"]
    results["train_pairs_per_sec"] = results["train"]["pairs_per_sec"]
    results["beam3_slowdown"] = results["decode"].get("beam3_slowdown")
    results["torch"] = torch.__version__
    # Other processes' load, for the reader to judge contention: 1/5/15-minute averages.
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
