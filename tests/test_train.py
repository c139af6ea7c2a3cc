"""Config composition, `train(cfg)`, checkpoints and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from caption.checkpoint import load_checkpoint, save_checkpoint
from caption.cli.train import train
from caption.errors import CaptionError
from caption.models.build import load_captioner
from caption.overrides import check_group_overrides
from tests.helpers.cli import run
from tests.helpers.config import compose_config


def test_compose_default_and_overrides(tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [
            "model/encoder=resnet18",
            "optimizer=rmsprop",
            "trainer.max_epochs=3",
            "trainer.max_steps=7",
            "trainer.seed=5",
            f"run_dir={tmp_path}",
            "model.gate=false",
        ],
    )
    assert cfg.model.encoder.name == "resnet18" and cfg.model.encoder.fine_tune is False
    assert cfg.optimizer._target_ == "torch.optim.RMSprop" and cfg.optimizer._partial_
    assert (cfg.trainer.max_epochs, cfg.trainer.max_steps, cfg.trainer.seed) == (3, 7, 5)
    assert cfg.run_dir == str(tmp_path) and cfg.model.gate is False
    assert cfg.model.attention._target_.endswith("SoftAttention")
    assert cfg.model.score._target_.endswith("AdditiveScore")
    quick = compose_config("train", ["experiment=quick"])
    assert quick.trainer.max_epochs == 2 and quick.trainer.val_max_images == 100


@pytest.mark.parametrize("override", ["trainer.no_such_knob=1", "model/encoder=resnet9000"])
def test_unknown_option_is_refused(override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config("train", [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_epochs=0", "trainer.max_epochs must be an integer >= 1"),
        ("trainer.max_epochs=abc", "trainer.max_epochs must be an integer"),
        ("data.batch_size=-3", "data.batch_size"),
        (
            "trainer.val.strategy=nucleus",
            "trainer.val.strategy must be one of greedy, beam, sample",
        ),
        ("model.dropout=1.5", "model.dropout must be in [0, 1)"),
        ("trainer.device=tpu9", "not a torch device"),
        ("trainer.checkpoint_every=0", "trainer.checkpoint_every must be an integer >= 1"),
        ("trainer.deterministic=sometimes", "trainer.deterministic must be true or false"),
        ("data.strict_images=1", "data.strict_images must be true or false"),
        ("data.max_image_pixels=-5", "data.max_image_pixels must be an integer >= 1"),
        ("resume=true", "resume must be auto, a run dir or a checkpoint file"),
        ("+trainer.resume=true", "config: trainer.resume is gone; use resume=auto"),
    ],
)
def test_bad_values_fail_with_one_line(train_cfg: DictConfig, override: str, message: str) -> None:
    key, value = override.split("=")
    cfg = compose_config("train", [f"{key}={value}"])
    OmegaConf.update(cfg, "run_dir", train_cfg.run_dir)
    with pytest.raises(CaptionError) as e:
        train(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_dataset_says_what_to_do(train_cfg: DictConfig, tmp_path: Path) -> None:
    train_cfg.data.annotations = str(tmp_path / "nope.json")
    with pytest.raises(CaptionError, match=r"data\.annotations: .*nope\.json does not exist"):
        train(train_cfg)


@pytest.mark.slow
def test_train_writes_metrics_and_checkpoints(train_cfg: DictConfig) -> None:
    train_cfg.trainer.max_epochs = 2
    summary = train(train_cfg)
    run = Path(train_cfg.run_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "val_bleu4", "images_per_sec"} <= rows[0].keys()
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert summary["steps"] == rows[-1]["step"] == 2 * 24  # 64 images x 6 captions / 16
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run / "checkpoints" / name, weights_only=True)  # safe loading works
        assert ckpt["format"] == "caption-checkpoint"
        assert {"model", "optimizer", "config", "vocab", "progress"} <= ckpt.keys()
    assert not list((run / "checkpoints").glob("*.tmp"))  # atomic writes leave nothing behind
    # The checkpoint alone is enough to caption.
    model, vocab, cfg = load_captioner(run / "checkpoints" / "best.pt")
    assert cfg.model.hidden_dim == 32 and len(vocab) == model.decoder.L_o.out_features
    gen = model.generate(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), max_len=5)
    assert gen.tokens.shape[0] == 1


@pytest.mark.slow
def test_max_steps_and_resume_continue_the_run(train_cfg: DictConfig) -> None:
    train_cfg.trainer.max_steps = 5
    assert train(train_cfg)["steps"] == 5
    run = Path(train_cfg.run_dir)
    train_cfg.trainer.max_steps = None
    train_cfg.trainer.max_epochs = 2
    train_cfg.resume = "auto"
    summary = train(train_cfg)
    assert summary["steps"] == 5 + 24 and summary["epochs"] == 2
    assert load_checkpoint(run / "checkpoints" / "last.pt")["progress"]["epoch"] == 2


def test_foreign_and_corrupt_checkpoints_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(CaptionError, match="not a caption checkpoint"):
        load_checkpoint(foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole module: unsafe to unpickle
    with pytest.raises(CaptionError, match="cannot be read safely"):
        load_checkpoint(pickled)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CaptionError, match=r"corrupt\.pt"):
        load_checkpoint(corrupt)
    with pytest.raises(CaptionError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_save_checkpoint_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, model={"w": torch.ones(2)}, progress={"step": 1})

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model={"w": torch.zeros(2)}, progress={"step": 2})
    assert load_checkpoint(path)["progress"]["step"] == 1  # the old file survives intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.slow
def test_encoder_top_blocks_train_from_their_epoch_with_their_lr(train_cfg: DictConfig) -> None:
    OmegaConf.update(train_cfg, "model.encoder.fine_tune", False, force_add=True)
    OmegaConf.update(train_cfg, "model.encoder.fine_tune_top", 1, force_add=True)
    OmegaConf.update(train_cfg, "model.encoder.fine_tune_from_epoch", 2, force_add=True)
    OmegaConf.update(train_cfg, "model.encoder.lr", 1e-4, force_add=True)
    train_cfg.trainer.max_epochs = 1
    train(train_cfg)
    run = Path(train_cfg.run_dir)
    first = load_checkpoint(run / "checkpoints" / "last.pt")
    groups = first["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["initial_lr"] == pytest.approx(1e-4)
    train_cfg.trainer.max_epochs = 2
    train_cfg.resume = "auto"
    train(train_cfg)
    second = load_checkpoint(run / "checkpoints" / "last.pt")
    # Adam keeps state only for parameters it stepped: none of the encoder's in epoch 1.
    encoder_ids = set(groups[1]["params"])
    assert not encoder_ids & set(first["optimizer"]["state"])
    assert encoder_ids <= set(second["optimizer"]["state"])
    backbone = [k for k in first["model"] if k.startswith("encoder.backbone.")]
    changed = {k for k in backbone if not torch.equal(first["model"][k], second["model"][k])}
    assert changed, "the top block did not train in epoch 2"
    assert len(changed) < len(backbone)  # the lower blocks stayed frozen


@pytest.mark.parametrize(
    "args, message",
    [
        (["model/attention=foo"], "model/attention=foo is not an option of model/attention; "),
        (["-m", "model/score=dot,cosine"], "valid: additive, dot, general, scaled_dot"),
        (["model/encoder=resnet9000"], "model/encoder=resnet9000 is not an option"),
    ],
)
def test_unknown_group_options_get_one_line_with_the_valid_ones(
    args: list[str], message: str
) -> None:
    with pytest.raises(CaptionError, match=message) as e:
        check_group_overrides(args)
    assert "\n" not in str(e.value)
    check_group_overrides(["model/attention=hard", "model/score=dot,general", "x.y=1"])


@pytest.mark.cli
def test_caption_train_refuses_an_unknown_attention_in_one_line() -> None:
    proc = run("caption-train", "model/attention=fancy", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: config: model/attention=fancy is not an option of model/attention; "
        "valid: hard, local, local_monotonic, soft"
    )
