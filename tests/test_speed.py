"""The fast paths compute what the plain ones do; the speed options train or fail clearly."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from caption.cli.train import train
from caption.data.vocab import PAD_ID, START_ID
from caption.errors import CaptionError
from caption.models.captioner import Captioner
from caption.speed import CompileFallback, Precision, compile_model
from tests.helpers import ROOT
from tests.helpers.models import random_batch, tiny_model

spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "bench" / "throughput.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def stepwise_logits(model: Captioner, images: torch.Tensor, captions: torch.Tensor) -> list:
    """Teacher forcing the slow way: one `Decoder.step` per word over the full batch."""
    dec = model.decoder
    a = model.encode(images)
    memory, state = dec.attention.prepare(a), dec.init_state(a)
    rows = []
    for t in range(captions.shape[1] - 1):
        step = dec.step(captions[:, t], state, a, memory)
        rows.append(step.logits)
        state = step.state
    return torch.stack(rows, 1)  # (B, T-1, V)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.input_feeding=true"],
        ["model.heads=2"],
        ["model/attention=local"],
        ["model/attention=local_monotonic"],
        ["model/attention=hard"],
        ["model.gate=false", "model.deep_output=false", "model.init_from_mean=false"],
    ],
    ids=lambda o: ",".join(o) or "default",
)
def test_packed_teacher_forcing_equals_step_by_step(overrides: list[str]) -> None:
    model = tiny_model(*overrides).eval()  # eval: no dropout; hard attention decodes by expectation
    images, captions = random_batch(B=5, T=8, seed=3)
    real = captions[:, 1:] != PAD_ID
    assert not real.all(), "the batch must have captions of different lengths"
    with torch.no_grad():
        packed = model(images, captions).logits
        reference = stepwise_logits(model, images, captions)
    torch.testing.assert_close(packed[real], reference[real], atol=1e-5, rtol=1e-4)
    assert (packed[~real] == 0).all()  # steps after <end> are not computed


def test_packed_loss_equals_masked_padded_loss() -> None:
    """The packed NLL and penalty equal the masked ones over the padded layout."""
    model = tiny_model().eval()
    images, captions = random_batch(B=6, T=9, seed=4)
    losses = model.loss(images, captions)
    targets = captions[:, 1:]
    real = targets != PAD_ID
    with torch.no_grad():
        logp = stepwise_logits(model, images, captions).log_softmax(-1)
    nll = -logp.gather(2, targets.unsqueeze(-1)).squeeze(-1)[real].mean()
    torch.testing.assert_close(losses.nll.detach(), nll, atol=1e-5, rtol=1e-5)


def test_precision_refuses_unknown_and_fp16_off_cuda() -> None:
    with pytest.raises(CaptionError, match=r"trainer\.precision: 'half' is not one of"):
        Precision("half", torch.device("cpu"))
    with pytest.raises(CaptionError, match=r"trainer\.precision: fp16 needs a CUDA device"):
        Precision("fp16", torch.device("cpu"))
    assert Precision(32, torch.device("cpu")).dtype is None


def test_bf16_and_channels_last_train(train_cfg: DictConfig) -> None:
    train_cfg.trainer.precision = "bf16"
    train_cfg.trainer.channels_last = True
    train_cfg.trainer.max_steps = 3
    train_cfg.trainer.val_max_images = 2
    summary = train(train_cfg)
    assert summary["steps"] == 3 and summary["words_per_sec"] > 0
    row = (Path(train_cfg.run_dir) / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"train_loss": NaN' not in row


def test_bf16_autocast_is_close_to_float32() -> None:
    model = tiny_model("model.dropout=0").eval()
    images, captions = random_batch()
    full = model.loss(images, captions).nll
    with Precision("bf16", torch.device("cpu")).autocast():
        half = model.loss(images, captions).nll
    assert abs(full.item() - half.item()) < 0.05 * full.item()


def test_compile_falls_back_to_eager_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    def broken_compiler(fn, dynamic):  # what a missing C++ toolchain looks like at first call
        def compiled(*args, **kwargs):
            raise RuntimeError("InductorError: no working C++ compiler found")

        return compiled

    model = tiny_model().eval()
    images, captions = random_batch()
    expected = model.loss(images, captions).nll
    compile_model(model, compiler=broken_compiler)
    with caplog.at_level(logging.WARNING, logger="caption.speed"):
        got = model.loss(images, captions).nll
        again = model.loss(images, captions).nll
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(again, expected)
    warnings = [r.getMessage() for r in caplog.records if "trainer.compile" in r.getMessage()]
    assert len(warnings) == 2  # one for the encoder, one for the decoder step, each once
    assert all("no working C++ compiler found" in w for w in warnings)
    assert isinstance(model.decoder.advance, CompileFallback)


def test_flop_counter_matches_the_analytic_count() -> None:
    """The bench counts FLOPs with torch's counter; check it against the formula by hand."""
    dims = {"grid": 3, "D": 12, "hidden": 10, "attention": 6, "embed": 8}
    V, B = 30, 4
    model = bench.paper_model(vocab=V, **dims)
    L, D, H, A, m = 9, 12, 10, 6, 8
    features = torch.rand(B, L, D)
    captions = bench.random_captions(B, V, (2, 5), seed=1)
    assert (captions[:, 0] == START_ID).all()
    N = int((captions[:, 1:] != PAD_ID).sum())  # real words: the only steps computed
    forward = (
        2 * B * L * D * A  # W_a a_i, once per image
        + 2 * 2 * B * D * H  # f_init,h and f_init,c
        + 2 * N * m * 4 * H  # the words' share of the LSTM gates, all at once
        + N * 2 * (H * A + L * A + L * D + H + (D + H) * 4 * H)  # U_a h, v_a, Σ α a, f_β, cell
        + 2 * N * (H * m + D * m + m * V)  # L_h, L_z, L_o
    )
    with FlopCounterMode(display=False) as counter:
        model.loss(features, captions)
    assert counter.get_total_flops() == forward
    both = bench.step_flops(model, features, captions)
    assert 2 * forward < both < 3 * forward  # backward: at most two matmuls per forward one


def test_batched_beam_search_equals_one_image_at_a_time() -> None:
    model = tiny_model(seed=5).eval()
    images, _ = random_batch(B=6, seed=6)
    result = bench.decode_pair(model, images, "beam5", "beam", 5, 6, torch.device("cpu"), 12)
    assert result["beam5_identical"] is True
    assert result["beam5_batched_images_per_sec"] > 0


def test_batched_fetch_equals_collated_items(tiny_shapes: Path) -> None:
    """`__getitems__` gathers a batch with tensor indexing; it must equal the per-item path."""
    from caption.data.dataset import CaptionDataset, ImageBank, collate_captions
    from caption.data.formats import read_karpathy
    from caption.data.vocab import Vocabulary

    records = read_karpathy(tiny_shapes)["train"][:8]
    vocab = Vocabulary.build(c for r in records for c in r.captions)
    keys = [5, 0, 17, 3, 29, 11]
    for preload in (True, False):
        data = CaptionDataset(ImageBank(records, 64, preload=preload), vocab)
        fast = collate_captions(data.__getitems__(keys))
        slow = collate_captions([data[k] for k in keys])
        for a, b in zip(fast[:3], slow[:3], strict=True):  # images, captions, lengths
            assert torch.equal(a, b)
        assert fast.skipped == slow.skipped == ()
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate_captions)
    first = next(iter(loader))
    assert torch.equal(first.captions, collate_captions([data[k] for k in range(4)]).captions)
