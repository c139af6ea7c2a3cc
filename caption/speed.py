"""Training speed options: mixed precision, channels_last and torch.compile, with fallbacks.

`caption-train` reads them from `trainer.precision`, `trainer.channels_last` and
`trainer.compile`; each is off by default and changes nothing when off.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from caption.errors import CaptionError, first_line

log = logging.getLogger(__name__)

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str | int, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `trainer.precision`, or None for full float32.

    Raises:
        CaptionError: an unknown precision, or fp16 off CUDA (its GradScaler needs CUDA).
    """
    key = str(precision)
    if key not in PRECISIONS:
        raise CaptionError(
            f"trainer.precision: {precision!r} is not one of {', '.join(PRECISIONS)}; "
            "pass trainer.precision=32, bf16 or fp16"
        )
    if key == "fp16" and device.type != "cuda":
        raise CaptionError(
            f"trainer.precision: fp16 needs a CUDA device for its GradScaler, but the device "
            f"is {device}; pass trainer.precision=bf16 (or 32) on this device"
        )
    return PRECISIONS[key]


class Precision:
    """Autocast for the forward pass and, for fp16, a GradScaler around backward and step.

    Args:
        precision: `32`, `bf16` or `fp16` (`trainer.precision`).
        device: the training device.
    """

    def __init__(self, precision: str | int, device: torch.device) -> None:
        self.device = device
        self.dtype = autocast_dtype(precision, device)
        # fp16 gradients underflow without loss scaling; bf16 has float32's exponent range.
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Run matmuls in the low precision; a no-op for float32."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield

    def step(
        self,
        loss: Tensor | None,
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        grad_clip: float | None,
        reduce: Callable[[], None] | None = None,
    ) -> None:
        """Backward, clip the gradient norm, and step; through the GradScaler for fp16.

        Args:
            loss: the batch's loss; None when this process has no batch but must still take
                part in `reduce`.
            optimizer: steps the parameters.
            params: the trainable parameters, whose gradient norm is clipped.
            grad_clip: the norm to clip to (None or 0: no clipping).
            reduce: sums the gradients over data-parallel processes, after backward and
                before clipping.
        """
        optimizer.zero_grad(set_to_none=True)
        if loss is not None:
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if reduce is not None:
            reduce()
        if self.scaler is None:
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            return
        if grad_clip:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        self.scaler.step(optimizer)  # skips the step when a gradient overflowed
        self.scaler.update()


class CompileFallback:
    """Calls a `torch.compile`d function, and the eager one if compiling fails.

    Compilation happens at the first call; if it raises (no C++ compiler, an unsupported op,
    an old GPU), one warning names the cause and every later call runs eagerly.

    Args:
        fn: the eager function.
        name: what it is, for the warning.
        compiler: `torch.compile` (a parameter so that tests can make it fail).
    """

    def __init__(
        self, fn: Callable[..., Any], name: str, compiler: Callable[..., Any] | None = None
    ) -> None:
        self.eager = fn
        self.name = name
        self.compiled: Callable[..., Any] | None = (compiler or torch.compile)(fn, dynamic=True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # any backend failure: the eager path is always correct
                log.warning(
                    "trainer.compile: compiling %s failed (%s); running it eagerly",
                    self.name,
                    first_line(e, 160),
                )
                self.compiled = None
        return self.eager(*args, **kwargs)


def compile_model(model: nn.Module, compiler: Callable[..., Any] | None = None) -> None:
    """Compile the encoder's forward and the decoder's step in place, with eager fallbacks.

    The step (attention, gate, LSTM cell) is where teacher forcing spends its small per-step
    operations; the loop around it keeps its Python control flow, so the shrinking batch
    needs no recompilation beyond the dynamic batch dimension.

    Args:
        model: a `Captioner`.
        compiler: `torch.compile` by default.
    """
    model.encoder.forward = CompileFallback(model.encoder.forward, "the encoder", compiler)
    model.decoder.advance = CompileFallback(model.decoder.advance, "the decoder step", compiler)


def to_channels_last(model: nn.Module) -> None:
    """Store the encoder's conv weights NHWC, the layout fast CPU and tensor-core kernels use."""
    model.encoder.to(memory_format=torch.channels_last)


def images_to_device(images: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    """Move a batch to the device (asynchronously from pinned memory) in the encoder's layout.

    Args:
        images: (B, 3, S, S) images, or (B, L, D) cached annotation vectors.
        device: where the model is.
        channels_last: convert 4-D images to NHWC.
    """
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images
