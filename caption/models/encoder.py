"""CNN encoder: images -> a grid of annotation vectors a_i, shape (B, L, D) with L = H' * W'."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import Tensor, nn

from caption.errors import CaptionError

# ImageNet statistics: every torchvision backbone was trained on inputs normalised with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderConfigError(CaptionError, ValueError):
    """A bad encoder setting (name, grid size, input size); a ValueError for plain callers."""


class EncoderWeightsError(CaptionError, RuntimeError):
    """Backbone weights that cannot be fetched or loaded; a RuntimeError for plain callers."""


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    # no conv bias: the BatchNorm shift right after it makes one redundant
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Sequential):
    """From-scratch CNN: [conv3x3-BN-ReLU, maxpool2] per width, then one conv3x3-BN-ReLU.

    The grid stride is 2**len(channels): a 64 px image gives 8x8 with the default three widths.
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
            layers += [*conv_bn_relu(c, width), nn.MaxPool2d(2)]
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


def coord_grid(H: int, W: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """CoordConv planes (1, 2, H, W): x then y, each running over [-1, 1]."""
    ys = torch.linspace(-1.0, 1.0, H, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, W, device=device, dtype=dtype)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y]).unsqueeze(0)


def _small_cnn(
    *, pretrained: bool, weights_path: str | None, channels: Sequence[int], coord_channels: bool
) -> tuple[nn.Module, int]:
    if pretrained or weights_path is not None:
        raise EncoderConfigError(
            "small_cnn is trained from scratch; set "
            "model.encoder.pretrained=false and leave weights_path unset"
        )
    widths = tuple(int(c) for c in channels)  # Hydra hands over a ListConfig
    if not widths or min(widths) < 1:
        raise EncoderConfigError(f"small_cnn: channels must be positive widths, got {widths}")
    net = SmallCNN(3 + 2 * coord_channels, widths)
    return net, net.out_dim


def _load_local(model: nn.Module, name: str, path: Path) -> None:
    """Load a full torchvision state dict into `model` strictly, or fail with one line."""
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
            f"{path}: holds a {type(state).__name__}, not the state dict of a torchvision {name}"
        )
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


def _torchvision(
    name: str,
    cut: Callable[[nn.Module], nn.Module],
    out_dim: int,
    *,
    pretrained: bool,
    weights_path: str | None,
    **_: object,
) -> tuple[nn.Module, int]:
    if weights_path is not None:  # a local file wins over a download
        model = tvm.get_model(name, weights=None)
        _load_local(model, name, Path(weights_path))
    elif pretrained:
        try:
            model = tvm.get_model(name, weights="DEFAULT")
        except Exception as e:
            reason = " ".join(str(e).split())[:120]  # keep the message on one line
            raise EncoderWeightsError(
                f"{name}: the ImageNet weights could not be fetched ({type(e).__name__}: "
                f"{reason}); set model.encoder.weights_path=<file> to a local torchvision "
                f"state dict, or model.encoder.pretrained=false"
            ) from e
    else:
        model = tvm.get_model(name, weights=None)
    return cut(model), out_dim


def _resnet_trunk(m: nn.Module) -> nn.Module:
    return nn.Sequential(*list(m.children())[:-2])  # drop avgpool and fc


def _vgg_trunk(m: nn.Module) -> nn.Module:
    return m.features[:-1]  # conv5 + ReLU before the last pool, as in the paper: 14x14 at 224 px


def _features(m: nn.Module) -> nn.Module:
    return m.features


def _tv(name: str, cut: Callable[[nn.Module], nn.Module], out_dim: int) -> Callable[..., Any]:
    return partial(_torchvision, name, cut, out_dim)


# name -> builder(pretrained=, weights_path=, channels=, coord_channels=) -> (trunk, D)
BACKBONES: dict[str, Callable[..., tuple[nn.Module, int]]] = {
    "small_cnn": _small_cnn,
    "resnet18": _tv("resnet18", _resnet_trunk, 512),
    "resnet34": _tv("resnet34", _resnet_trunk, 512),
    "resnet50": _tv("resnet50", _resnet_trunk, 2048),
    "resnet101": _tv("resnet101", _resnet_trunk, 2048),
    "resnet152": _tv("resnet152", _resnet_trunk, 2048),
    "vgg16": _tv("vgg16", _vgg_trunk, 512),
    "vgg19": _tv("vgg19", _vgg_trunk, 512),
    "mobilenet_v3_small": _tv("mobilenet_v3_small", _features, 576),
    "mobilenet_v3_large": _tv("mobilenet_v3_large", _features, 960),
}


class Encoder(nn.Module):
    """Image encoder: (B, 3, H, W) in [0, 1] -> annotation vectors (B, L, D), L = H' * W'.

    Normalises with the ImageNet mean/std itself, so checkpoints need no outside preprocessing.

    Args:
        name: a key of BACKBONES; "small_cnn" is the from-scratch default for 64 px images.
        pretrained: load torchvision's ImageNet weights (needs the network or a warm cache).
        fine_tune: train the backbone; if False it is frozen and kept in eval mode.
        weights_path: a local torchvision state dict for the full model; wins over `pretrained`.
        grid_size: average-pool the map down to grid_size x grid_size; never upsamples.
        channels: small_cnn widths; the last one is D.
        coord_channels: small_cnn only: append normalised x/y planes (CoordConv) so the
            annotation vectors know where they are. Ignored by the torchvision backbones,
            whose first conv is fixed at 3 channels.

    Raises:
        ValueError: an unknown name, weights asked of small_cnn, or a bad grid_size
            (an EncoderConfigError, which the command-line tools print as one line).
        RuntimeError: weights that cannot be fetched or loaded (an EncoderWeightsError).
    """

    def __init__(
        self,
        name: str = "small_cnn",
        pretrained: bool = False,
        fine_tune: bool = True,
        weights_path: str | None = None,
        grid_size: int | None = None,
        channels: list[int] | tuple[int, ...] = (16, 32, 64),
        coord_channels: bool = True,
    ) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise EncoderConfigError(
                f"unknown encoder {name!r}; valid names: {', '.join(BACKBONES)}"
            )
        if grid_size is not None and int(grid_size) < 1:
            raise EncoderConfigError(f"grid_size must be a positive int or None, got {grid_size}")
        self.name = name
        self.fine_tune = fine_tune
        self.grid_size = None if grid_size is None else int(grid_size)
        self.coord_channels = bool(coord_channels) and name == "small_cnn"
        self.backbone, self.out_dim = BACKBONES[name](
            pretrained=pretrained,
            weights_path=weights_path or None,  # `weights_path=` on the command line gives ""
            channels=channels,
            coord_channels=self.coord_channels,
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if not fine_tune:
            self.backbone.requires_grad_(False)
        self._grids: dict[tuple[int, int], tuple[int, int]] = {}  # input size -> grid, cached
        self.train()  # applies the frozen-backbone eval mode below

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        if not self.fine_tune:
            self.backbone.eval()  # frozen BatchNorm keeps its running statistics
        return self

    def _check_grid(self, Hf: int, Wf: int, H: int, W: int) -> None:
        g = self.grid_size
        if g is not None and (g > Hf or g > Wf):
            raise EncoderConfigError(
                f"grid_size={g} is larger than the {Hf}x{Wf} map {self.name} gives at {H}x{W} "
                f"px; upsampling would only copy cells, so use grid_size<={min(Hf, Wf)} or "
                f"larger images"
            )

    def _stem(self, images: Tensor) -> Tensor:
        B, C, H, W = images.shape  # (B, 3, H, W) in [0, 1]
        if C != 3:
            raise EncoderConfigError(
                f"encoder expects RGB images (B, 3, H, W), got {tuple(images.shape)}"
            )
        x = (images - self.mean) / self.std
        if self.coord_channels:
            coords = coord_grid(H, W, x.device, x.dtype).expand(B, -1, -1, -1)
            x = torch.cat([x, coords], dim=1)  # (B, 5, H, W)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)  # oneDNN convs: ~2x faster NHWC
        return x

    def forward(self, images: Tensor) -> Tensor:
        """Encode images (B, 3, H, W) float in [0, 1] into annotation vectors (B, L, D)."""
        H, W = images.shape[-2:]
        x = self._stem(images)
        with torch.set_grad_enabled(self.fine_tune and torch.is_grad_enabled()):
            fmap = self.backbone(x)  # (B, D, H', W'); no graph through a frozen backbone
        _, _, Hf, Wf = fmap.shape  # conv grid
        self._check_grid(Hf, Wf, H, W)
        if self.grid_size is not None and (Hf, Wf) != (self.grid_size, self.grid_size):
            fmap = F.adaptive_avg_pool2d(fmap, self.grid_size)  # (B, D, g, g)
        return fmap.flatten(2).transpose(1, 2)  # (B, D, L) -> (B, L, D)

    @torch.no_grad()
    def grid_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """The (H', W') grid this encoder gives for images of `image_size` (side, or (H, W))."""
        if isinstance(image_size, Sequence):
            H, W = (int(s) for s in image_size)
        else:
            H = W = int(image_size)
        if (H, W) not in self._grids:
            self._grids[H, W] = self._dry_run(H, W)
        return self._grids[H, W]

    def _dry_run(self, H: int, W: int) -> tuple[int, int]:
        p = next(self.backbone.parameters())
        modes = {m: m.training for m in self.backbone.modules()}
        self.backbone.eval()  # the dry run must not move BatchNorm running statistics
        try:
            fmap = self.backbone(
                self._stem(torch.zeros(1, 3, H, W, device=p.device, dtype=p.dtype))
            )
        finally:
            for m, training in modes.items():
                m.training = training
        Hf, Wf = fmap.shape[-2:]
        self._check_grid(Hf, Wf, H, W)
        return (Hf, Wf) if self.grid_size is None else (self.grid_size, self.grid_size)
