"""Tests for caption.models.encoder and .backbones: shapes, freezing, grids, weights, errors."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from PIL import Image
from torch import nn

from caption.data.images import load_image
from caption.errors import CaptionError
from caption.models.backbones import BACKBONES, receptive_field
from caption.models.encoder import Encoder, coord_grid

CONF = Path(__file__).resolve().parents[1] / "conf" / "model" / "encoder"
needs_timm = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None, reason="efficientnet_lite0 needs the pretrained extra"
)

OUT_DIM = {
    "small_cnn": 64,
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
    "vgg16": 512,
    "vgg19": 512,
    "mobilenet_v3_small": 576,
    "mobilenet_v3_large": 960,
    "efficientnet_lite0": 1280,
}


@functools.cache
def shared(name: str) -> Encoder:
    """One randomly initialised encoder per backbone, reused (read-only, eval mode) across tests."""
    torch.manual_seed(0)
    return Encoder(name).eval()


def bn_layers(enc: Encoder) -> list[nn.BatchNorm2d]:
    return [m for m in enc.backbone.modules() if isinstance(m, nn.BatchNorm2d)]


def test_registry_matches_expected_names() -> None:
    assert set(BACKBONES) == set(OUT_DIM)


@pytest.mark.parametrize(
    ("name", "size", "grid"),
    [
        ("small_cnn", 64, (8, 8)),
        ("small_cnn", (48, 80), (6, 10)),
        ("resnet18", 64, (2, 2)),
        ("resnet18", (64, 96), (2, 3)),
        ("resnet34", 32, (1, 1)),
        ("resnet50", 32, (1, 1)),
        ("resnet101", 32, (1, 1)),
        ("resnet152", 32, (1, 1)),
        ("vgg16", 224, (14, 14)),  # the paper's 14x14x512 conv5 map
        ("vgg16", 112, (7, 7)),
        ("vgg19", 32, (2, 2)),
        ("mobilenet_v3_small", 64, (2, 2)),
        ("mobilenet_v3_large", 32, (1, 1)),
        pytest.param("efficientnet_lite0", 64, (2, 2), marks=needs_timm),
    ],
)
def test_output_shape_and_grid_shape(name: str, size: int | tuple[int, int], grid: tuple) -> None:
    enc = shared(name)
    H, W = (size, size) if isinstance(size, int) else size
    with torch.no_grad():
        out = enc(torch.rand(2, 3, H, W))
    assert enc.out_dim == OUT_DIM[name]
    assert out.shape == (2, grid[0] * grid[1], OUT_DIM[name])
    assert enc.grid_shape(size) == grid
    assert torch.isfinite(out).all()


def test_small_cnn_trains_end_to_end() -> None:
    torch.manual_seed(0)
    enc = Encoder().train()
    out = enc(torch.rand(4, 3, 64, 64))
    assert out.shape == (4, 64, 64)  # 8x8 grid, D = channels[-1]
    assert not torch.isnan(out).any()
    (out * torch.randn_like(out)).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("fine_tune", [True, False])
def test_inference_folds_batchnorm_into_the_conv(fine_tune: bool) -> None:
    """Without gradients, conv → eval BatchNorm runs as one conv: same annotations."""
    torch.manual_seed(0)
    enc = Encoder(fine_tune=fine_tune)
    for bn in bn_layers(enc):  # running statistics and affine terms far from the identity
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        nn.init.uniform_(bn.weight, 0.5, 2)
        nn.init.uniform_(bn.bias, -1, 1)
    enc.eval()
    images = torch.rand(3, 3, 64, 64)
    unfolded = enc(images)  # gradients on: BatchNorm runs as its own layer
    calls = []
    for bn in bn_layers(enc):
        bn.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        folded = enc(images)
    assert calls == []  # every BatchNorm was folded away
    torch.testing.assert_close(folded, unfolded, atol=1e-5, rtol=1e-4)
    enc.train()
    with torch.no_grad():
        enc(images)  # training mode normalises with batch statistics: nothing to fold
    assert len(calls) == (len(bn_layers(enc)) if fine_tune else 0)


@pytest.mark.parametrize("size", [(8, 8), (9, 7)])
def test_inference_max_pool_is_max_pool2d(size: tuple[int, int]) -> None:
    from caption.models.encoder import _max_pool_2x2

    x = torch.randn(2, 3, *size).contiguous(memory_format=torch.channels_last)
    assert torch.equal(_max_pool_2x2(x), nn.functional.max_pool2d(x, 2))  # odd sizes: floor


def test_small_cnn_widths_and_hydra_listconfig() -> None:
    hydra_utils = pytest.importorskip("hydra.utils")
    cfg = {"_target_": "caption.models.encoder.Encoder", "channels": [8, 16]}
    enc = hydra_utils.instantiate(cfg)  # channels arrives as a ListConfig
    assert enc.out_dim == 16
    assert enc.grid_shape(64) == (16, 16)
    assert enc(torch.rand(1, 3, 64, 64)).shape == (1, 256, 16)


def test_coord_channels() -> None:
    assert Encoder(coord_channels=True).backbone[0].in_channels == 5
    assert Encoder(coord_channels=False).backbone[0].in_channels == 3
    assert shared("resnet18").backbone[0].in_channels == 3  # ignored for torchvision backbones
    xy = coord_grid(4, 6, torch.device("cpu"), torch.float32)
    assert xy.shape == (1, 2, 4, 6)
    assert torch.equal(xy[0, 0, 0], torch.linspace(-1, 1, 6))  # x runs along the width
    assert torch.equal(xy[0, 1, :, 0], torch.linspace(-1, 1, 4))  # y runs down the height


def test_small_cnn_receptive_field_is_local() -> None:
    assert receptive_field(3) == 38
    enc = shared("small_cnn")  # eval: train-mode BN would mix every pixel through batch stats
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    enc(x).view(1, 8, 8, -1)[0, 4, 4].sum().backward()
    rows, cols = x.grad[0].abs().sum(0).nonzero().unbind(1)
    # cell 4 covers px 32..39; the 38 px field reaches 15 px left/up and 15 px right/down
    assert rows.min() >= 17 and rows.max() <= 54
    assert cols.min() >= 17 and cols.max() <= 54


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_frozen_backbone(name: str) -> None:
    enc = Encoder(name, fine_tune=False)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert enc.training
    assert not any(m.training for m in enc.backbone.modules())
    before = [bn.running_mean.clone() for bn in bn_layers(enc)]
    out = enc(torch.rand(2, 3, 64, 64))
    assert not out.requires_grad
    for bn, mean in zip(bn_layers(enc), before, strict=True):
        assert torch.equal(bn.running_mean, mean)


def test_fine_tuned_backbone_updates_bn_but_grid_shape_does_not() -> None:
    enc = Encoder().train()
    before = bn_layers(enc)[0].running_mean.clone()
    assert enc.grid_shape(64) == (8, 8)
    assert torch.equal(bn_layers(enc)[0].running_mean, before)
    assert all(m.training for m in enc.modules())  # dry run restored the modes
    enc(torch.rand(2, 3, 64, 64))
    assert not torch.equal(bn_layers(enc)[0].running_mean, before)


def test_normalisation_buffers_not_in_checkpoint() -> None:
    keys = Encoder().state_dict()
    assert "mean" not in keys and "std" not in keys


def test_grid_size_pools_down() -> None:
    torch.manual_seed(0)
    full = Encoder().eval()
    pooled = Encoder(grid_size=4).eval()
    pooled.load_state_dict(full.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = full(x), pooled(x)
    assert b.shape == (2, 16, 64) and pooled.grid_shape(64) == (4, 4)
    grid = a.transpose(1, 2).reshape(2, 64, 8, 8)  # (B, L, D) -> (B, D, 8, 8)
    expected = nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(b, expected)
    same = Encoder(grid_size=8).eval()
    same.load_state_dict(full.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(same(x), a)


def test_grid_size_never_upsamples() -> None:
    enc = Encoder(grid_size=9)
    with pytest.raises(ValueError, match="8x8"):
        enc(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="8x8"):
        enc.grid_shape(64)
    assert enc.grid_shape(96) == (9, 9)  # a 12x12 map pools down fine
    resnet = Encoder("resnet18", grid_size=14)  # the 196-copies-of-49 pitfall
    with pytest.raises(ValueError, match="7x7"):
        resnet.grid_shape(224)


def test_weights_path_loads_state_dict(tmp_path, monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("weights_path must not trigger a download")

    monkeypatch.setattr(tvm.ResNet18_Weights, "get_state_dict", no_network)
    state = tvm.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    enc = Encoder("resnet18", pretrained=True, weights_path=str(path))
    assert torch.equal(enc.backbone[0].weight, state["conv1.weight"])
    assert torch.equal(enc.backbone[1].running_var, state["bn1.running_var"])


def _bad_file(tmp_path, kind: str):
    path = tmp_path / f"{kind}.pth"
    if kind == "corrupt":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif kind == "other_arch":
        torch.save(tvm.resnet34(weights=None).state_dict(), path)
    elif kind == "wrong_shapes":
        torch.save(tvm.resnet18(weights=None, num_classes=10).state_dict(), path)
    elif kind == "not_a_dict":
        torch.save(torch.zeros(3), path)
    return path  # "missing" is never written


@pytest.mark.parametrize("kind", ["corrupt", "other_arch", "wrong_shapes", "not_a_dict", "missing"])
def test_weights_path_errors_name_the_file(tmp_path, kind: str) -> None:
    path = _bad_file(tmp_path, kind)
    with pytest.raises(RuntimeError) as info:
        Encoder("resnet18", weights_path=str(path))
    message = str(info.value)
    assert str(path) in message and "resnet18" in message
    assert "\n" not in message
    assert isinstance(info.value, CaptionError)  # the CLI prints it as one clean line


def test_pretrained_without_network_says_what_to_do(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvm.ResNet18_Weights, "get_state_dict", offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as info:
        Encoder("resnet18", pretrained=True)
    message = str(info.value)
    assert "resnet18" in message and "ImageNet" in message
    assert "weights_path=" in message and "pretrained=false" in message
    assert "\n" not in message


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="resnet18") as info:
        Encoder("resnet9000")
    assert "small_cnn" in str(info.value) and isinstance(info.value, CaptionError)
    with pytest.raises(ValueError, match="from scratch"):
        Encoder("small_cnn", pretrained=True)
    with pytest.raises(ValueError, match="from scratch"):
        Encoder("small_cnn", weights_path="weights.pth")
    with pytest.raises(ValueError, match="grid_size"):
        Encoder(grid_size=0)
    with pytest.raises(ValueError, match="RGB"):
        shared("small_cnn")(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="image_size"):
        Encoder(image_size=0)
    Encoder("small_cnn", fine_tune=False)  # random frozen features: pointless but allowed


def test_encoder_knows_its_input(tmp_path: Path) -> None:
    enc = shared("small_cnn")
    assert enc.image_size == enc.native_image_size == 80  # unset: the backbone's own side
    assert Encoder(image_size=48).image_size == 48
    assert enc.mean.shape == enc.std.shape == (1, 3, 1, 1)  # what forward normalises with
    photo = Image.new("RGBA", (120, 40), (200, 30, 30, 255))
    x = enc.prepare(photo)
    assert x.dtype == torch.uint8 and x.shape == (3, 80, 80)  # resized whole, not cropped
    photo.save(tmp_path / "photo.png")
    assert torch.equal(enc.prepare(tmp_path / "photo.png"), load_image(tmp_path / "photo.png", 80))
    assert torch.equal(enc.prepare(str(tmp_path / "photo.png")), x)


# blocks per backbone: ResNet stem + layer1..4, VGG's five conv stages, MobileNetV3's `features`,
# EfficientNet-Lite0's stem + 7 stages + head, small_cnn's 3 widths + final conv
N_BLOCKS = {
    "small_cnn": 4,
    "resnet18": 5,
    "resnet34": 5,
    "resnet50": 5,
    "resnet101": 5,
    "resnet152": 5,
    "vgg16": 5,
    "vgg19": 5,
    "mobilenet_v3_small": 13,
    "mobilenet_v3_large": 17,
    "efficientnet_lite0": 9,
}


@pytest.mark.parametrize(
    "name",
    [n if n != "efficientnet_lite0" else pytest.param(n, marks=needs_timm) for n in N_BLOCKS],
)
def test_blocks_partition_the_backbone(name: str) -> None:
    enc = shared(name)
    blocks = enc.blocks()
    assert len(blocks) == len(enc.block_names) == N_BLOCKS[name]
    ids = [id(p) for b in blocks for p in b.parameters()]
    assert ids == [id(p) for p in enc.backbone.parameters()]  # all of them, in order, once
    if name not in {"small_cnn", "resnet18", "mobilenet_v3_small", "efficientnet_lite0"}:
        return  # the same layer sequence; running the big trunks again adds only minutes
    x = enc._stem(torch.rand(1, 3, 32, 32))
    with torch.no_grad():
        y = x
        for b in blocks:
            y = b(y)
        torch.testing.assert_close(y, enc.backbone(x))


def test_fine_tune_settings() -> None:
    assert Encoder().fine_tune_top == 4 and Encoder().fine_tune  # fine_tune=True: all blocks
    assert Encoder(fine_tune=False).fine_tune_top == 0
    top = Encoder(fine_tune=False, fine_tune_top=1)  # k > 0 wins over fine_tune
    trainable = {n for n, p in top.backbone.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in top.backbone.named_parameters() if int(n.split(".")[0]) >= 12
    }
    assert Encoder(fine_tune=True, fine_tune_top=0).fine_tune_top == 4  # 0 leaves it to fine_tune
    later = Encoder(fine_tune_from_epoch=2)
    assert not later.fine_tune and later.set_epoch(2) and later.fine_tune
    for bad, match in [
        ({"fine_tune_top": 5}, "4 blocks"),
        ({"fine_tune_top": -1}, "fine_tune_top"),
        ({"fine_tune_from_epoch": -1}, "fine_tune_from_epoch"),
        ({"lr": 0.0}, "lr"),
    ]:
        with pytest.raises(ValueError, match=match) as info:
            Encoder(**bad)
        assert isinstance(info.value, CaptionError)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_encoder_configs_match_the_signature(path: Path) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.load(path)
    params = set(inspect.signature(Encoder).parameters)
    assert cfg.name == path.stem and cfg.name in BACKBONES
    assert set(cfg) - {"_target_"} <= params
    if cfg.name != "small_cnn":  # every ImageNet backbone exposes the fine-tuning schedule
        assert {"fine_tune_top", "fine_tune_from_epoch", "lr"} <= set(cfg)
