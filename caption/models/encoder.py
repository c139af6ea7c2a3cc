"""CNN encoder: images -> a grid of annotation vectors a_i, shape (B, L, D) with L = H' * W'.

The encoder runs a backbone of `caption.models.backbones` (the grid each gives is listed
there) and knows its input: `prepare` turns an image into what it was trained on (resized
whole to the `image_size` square, as training did), and `forward` normalises with the
statistics its weights expect (`mean`, `std`). A checkpoint thus needs no outside
preprocessing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from caption.data.images import MAX_PIXELS, image_tensor, load_image
from caption.models.backbones import EncoderConfigError, get_backbone


def _foldable(conv: nn.Module, bn: nn.Module | None) -> bool:
    """A conv followed by a BatchNorm that normalises with its running statistics."""
    return (
        isinstance(conv, nn.Conv2d)
        and isinstance(bn, nn.BatchNorm2d)
        and not bn.training
        and bn.track_running_stats
        and bn.running_var is not None
    )


def _conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """BN(conv(x)) as one conv, for inference: BatchNorm with running statistics is a per-channel
    affine map, w' = w γ/σ and b' = (b − μ) γ/σ + β, so folding it saves a pass over the
    largest activations of the network (on CPU, as slow as the conv it follows)."""
    scale = bn.running_var.add(bn.eps).rsqrt()  # 1/σ, (C,)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    bias = (bias - bn.running_mean) * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    return conv._conv_forward(x, weight, bias)


def _halving(pool: nn.Module) -> bool:
    """A plain 2x2, stride-2 max-pool, as `SmallCNN` uses."""
    if not isinstance(pool, nn.MaxPool2d) or pool.ceil_mode or pool.return_indices:
        return False
    settings = (pool.kernel_size, pool.stride, pool.padding, pool.dilation)  # ints or pairs
    pairs = tuple(s if isinstance(s, tuple) else (s, s) for s in settings)
    return pairs == ((2, 2), (2, 2), (0, 0), (1, 1))


def _max_pool_2x2(x: Tensor) -> Tensor:
    """`F.max_pool2d(x, 2)` as two elementwise maxima of strided views, for inference: the
    same values, without computing the argmax indices that only the backward needs (about
    1.7x faster on channels-last CPU tensors)."""
    H, W = x.shape[-2:]
    x = x[..., : H - H % 2, : W - W % 2]  # floor mode: an odd last row or column is dropped
    rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def coord_grid(H: int, W: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """CoordConv planes (1, 2, H, W): x then y, each running over [-1, 1]."""
    ys = torch.linspace(-1.0, 1.0, H, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, W, device=device, dtype=dtype)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y]).unsqueeze(0)


class Encoder(nn.Module):
    """Image encoder: (B, 3, H, W) in [0, 1] -> annotation vectors (B, L, D), L = H' * W'.

    Knows its input: `image_size`, the square it is fed (`prepare` makes one), and `mean` /
    `std` (1, 3, 1, 1), its backbone's normalisation, which `forward` applies itself. The
    trunk is a sequence of blocks (`blocks()`); the top k of them can be fine-tuned while the
    rest stay frozen, in eval mode, and run without an autograd graph.

    Args:
        name: a key of `backbones.BACKBONES`; "small_cnn" is the from-scratch default for
            80 px images.
        pretrained: load ImageNet weights: torchvision's (from `$TORCH_HOME/hub/checkpoints`,
            downloaded there if absent) or, for efficientnet_lite0, the ones shipped in the
            `pretrained` extra.
        fine_tune: train the whole backbone; if False it is frozen and kept in eval mode.
        weights_path: a local state dict for the full model; wins over `pretrained`.
        grid_size: average-pool the map down to grid_size x grid_size; never upsamples.
        channels: small_cnn widths; the last one is D.
        coord_channels: small_cnn only: append normalised x/y planes (CoordConv) so the
            annotation vectors know where they are. Ignored by the ImageNet backbones,
            whose first conv is fixed at 3 channels.
        fine_tune_top: k > 0 trains only the last k blocks, whatever `fine_tune` says;
            0 or None leaves it to `fine_tune` (all blocks or none).
        fine_tune_from_epoch: the first epoch (counted from 1) at which those blocks train;
            before it the encoder is frozen. 0 and 1 both mean from the start. The training
            loop applies it by calling `set_epoch(epoch)` at the start of each epoch.
        lr: a learning rate of its own for the encoder's parameters (None: the optimizer's).
            Read by the training loop for the encoder's optimizer param group.
        image_size: the side S of the square images are resized to, in training and after
            (None: the backbone's `native_image_size`). The config sets it from
            `data.image_size`, so checkpoints carry it.

    Raises:
        ValueError: an unknown name, weights asked of small_cnn, a bad grid_size,
            image_size or fine-tuning setting (an EncoderConfigError; `build_model` names
            its config key).
        RuntimeError: weights that cannot be fetched or loaded (an EncoderWeightsError).
        ImportError: efficientnet_lite0 without the `pretrained` extra (EncoderDependencyError).
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
        fine_tune_top: int | None = None,
        fine_tune_from_epoch: int = 0,
        lr: float | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        spec = get_backbone(name)
        if grid_size is not None and int(grid_size) < 1:
            raise EncoderConfigError(f"grid_size must be a positive int or None, got {grid_size}")
        if fine_tune_top is not None and int(fine_tune_top) < 0:
            raise EncoderConfigError(f"fine_tune_top must be >= 0 or null, got {fine_tune_top}")
        if int(fine_tune_from_epoch) < 0:
            raise EncoderConfigError(
                f"fine_tune_from_epoch must be >= 0, got {fine_tune_from_epoch}"
            )
        if lr is not None and not float(lr) > 0:
            raise EncoderConfigError(f"lr must be a positive float or null, got {lr}")
        if image_size is not None and int(image_size) < 1:
            raise EncoderConfigError(f"image_size must be a positive int or null, got {image_size}")
        self.name = name
        self.grid_size = None if grid_size is None else int(grid_size)
        self.coord_channels = bool(coord_channels) and name == "small_cnn"
        self.native_image_size = spec.native_image_size
        self.image_size = self.native_image_size if image_size is None else int(image_size)
        trunk = spec.build(
            pretrained=pretrained,
            weights_path=weights_path or None,  # `weights_path=` on the command line gives ""
            channels=channels,
            coord_channels=self.coord_channels,
        )
        self.backbone, self.out_dim = trunk.net, trunk.out_dim
        self._starts, self._block_names = trunk.starts, trunk.names
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        n = len(self._starts)
        top = int(fine_tune_top or 0)
        if top > n:
            raise EncoderConfigError(
                f"fine_tune_top={top} but {name} has {n} blocks ({', '.join(self._block_names)})"
            )
        self.fine_tune_top = top or (n if fine_tune else 0)  # the blocks that train, once due
        self.fine_tune_from_epoch = int(fine_tune_from_epoch)
        self.lr = None if lr is None else float(lr)
        self._grids: dict[tuple[int, int], tuple[int, int]] = {}  # input size -> grid, cached
        self.trainable_top = 0
        self.set_trainable_top(self.fine_tune_top if self.fine_tune_from_epoch <= 1 else 0)

    def prepare(
        self, image: Image.Image | str | Path, max_pixels: int | None = MAX_PIXELS
    ) -> Tensor:
        """An image as this encoder's input: uint8 (3, S, S), S = `image_size`.

        The whole image is resized to the square (PIL bicubic, never cropped or padded), in
        8-bit RGB and upright, exactly as training's `ImageBank` read its images.

        Args:
            image: an open PIL image, or the path of an image file.
            max_pixels: for a path, refuse larger images from their header (see
                `caption.data.images.read_rgb`).

        Raises:
            CaptionError: a path that is missing, not an image, corrupt or too large.
            OSError, SyntaxError, ValueError: PIL's errors for a corrupt open image.
        """
        if isinstance(image, Image.Image):
            return image_tensor(image, self.image_size)
        return load_image(image, self.image_size, max_pixels)

    @property
    def fine_tune(self) -> bool:
        """Whether any block trains now."""
        return self.trainable_top > 0

    @property
    def block_names(self) -> tuple[str, ...]:
        """A name per block of `blocks()`, bottom to top (e.g. stem, layer1..layer4)."""
        return self._block_names

    def blocks(self) -> list[nn.Module]:
        """The trunk's blocks, bottom (input) to top (the output map).

        ResNet: stem, layer1..layer4; VGG: conv1..conv5 (a stage ends with its pool);
        MobileNetV3: each module of `features`; EfficientNet-Lite0: stem, stage0..stage6, head;
        small_cnn: one block per width, then the final conv. A multi-layer block is a fresh
        nn.Sequential over the backbone's own layers (not registered, so state dicts keep
        their keys; its own `training` flag is a snapshot taken now).
        """
        layers = list(self.backbone)
        blocks: list[nn.Module] = []
        for a, b in itertools.pairwise([*self._starts, len(layers)]):
            block = layers[a] if b - a == 1 else nn.Sequential(*layers[a:b])
            block.training = layers[a].training  # a fresh wrapper reports its layers' mode
            blocks.append(block)
        return blocks

    def _split(self) -> int:
        """Index in `backbone` of the first trainable layer (len(backbone) when frozen)."""
        k = self.trainable_top
        return self._starts[len(self._starts) - k] if k else len(self.backbone)

    def set_trainable_top(self, k: int) -> None:
        """Train the last `k` blocks (0: none, len(blocks()): all); freeze the rest.

        Frozen blocks get requires_grad=False and stay in eval mode, so their BatchNorm
        statistics do not move; trainable ones follow the encoder's train/eval mode.
        """
        n = len(self._starts)
        if not 0 <= int(k) <= n:
            raise EncoderConfigError(f"{self.name} has {n} blocks; cannot train the top {k}")
        self.trainable_top = int(k)
        split = self._split()
        for i, layer in enumerate(self.backbone):
            layer.requires_grad_(i >= split)
        self.train(self.training)  # re-apply eval mode to the frozen blocks

    def set_epoch(self, epoch: int) -> bool:
        """Apply `fine_tune_from_epoch` for `epoch` (counted from 1); True if the set changed.

        Idempotent: call it at the start of every epoch, including after a resume.
        """
        due = self.fine_tune_top if epoch >= self.fine_tune_from_epoch else 0
        if due == self.trainable_top:
            return False
        self.set_trainable_top(due)
        return True

    def tunable_parameters(self) -> list[nn.Parameter]:
        """The parameters of the top `fine_tune_top` blocks: what the optimizer should hold.

        Includes blocks still frozen until `fine_tune_from_epoch`: with `zero_grad(
        set_to_none=True)` they have no grad and optimizers skip them until they unfreeze.
        """
        k = self.fine_tune_top
        if not k:
            return []
        start = self._starts[len(self._starts) - k]
        return [p for layer in list(self.backbone)[start:] for p in layer.parameters()]

    def native_grid(self) -> tuple[int, int]:
        """The grid at `native_image_size` (after `grid_size` pooling), e.g. (14, 14) for VGG."""
        return self.grid_shape(self.native_image_size)

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        split = self._split()
        if split == len(self.backbone):
            self.backbone.eval()  # frozen BatchNorm keeps its running statistics
        else:
            for layer in list(self.backbone)[:split]:
                layer.eval()
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
        # Written straight into the layout the first conv reads: oneDNN convs run ~2x faster
        # channels-last (NHWC) on CPU.
        cpu = images.device.type == "cpu"
        layout = torch.channels_last if cpu else torch.contiguous_format
        shape = (B, 3 + 2 * self.coord_channels, H, W)
        x = torch.empty(shape, dtype=images.dtype, device=images.device, memory_format=layout)
        x[:, :3] = (images - self.mean) / self.std
        if self.coord_channels:
            x[:, 3:] = coord_grid(H, W, x.device, x.dtype)  # (B, 5, H, W) with the x, y planes
        return x

    def _layers(self) -> Iterator[tuple[bool, nn.Module]]:
        split = self._split()
        for i, layer in enumerate(self.backbone):
            yield i >= split, layer

    def forward(self, images: Tensor) -> Tensor:
        """Encode images (B, 3, H, W) float in [0, 1] into annotation vectors (B, L, D)."""
        H, W = images.shape[-2:]
        x = self._stem(images)
        grad = torch.is_grad_enabled()
        layers = list(self._layers())
        i = 0
        while i < len(layers):
            trainable, layer = layers[i]
            following = layers[i + 1][1] if i + 1 < len(layers) else None
            i += 1
            with torch.set_grad_enabled(grad and trainable):  # no graph through frozen blocks
                if torch.is_grad_enabled():
                    x = layer(x)
                elif _foldable(layer, following):  # inference: BatchNorm folded into the conv
                    x = _conv_bn(layer, following, x)
                    i += 1  # the BatchNorm is done too
                elif _halving(layer):
                    x = _max_pool_2x2(x)
                else:
                    x = layer(x)
        fmap = x  # (B, D, H', W')
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
