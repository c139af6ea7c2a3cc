"""The captioner: an encoder, an attending decoder, the training loss and inference."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from caption.data.images import MAX_PIXELS
from caption.models.attention import CaptionSteps
from caption.models.decoder import Decoder, DecoderOutput
from caption.models.decoding import (
    STRATEGIES,
    Generated,
    beam_search,
    forbidden_words,
    sequential,
)
from caption.models.self_attention import AnnotationSelfAttention


class Losses(NamedTuple):
    loss: Tensor  # what is minimised
    nll: Tensor  # mean negative log-likelihood per word
    # Σ_i (1 − Σ_t α_ti)², the doubly stochastic penalty before λ, averaged over captions (for
    # logging); the loss adds λ × its sum over captions / words, the NLL's normalisation.
    attention_reg: Tensor


class Captioner(nn.Module):
    """Show, Attend and Tell: image -> annotation vectors -> attending LSTM -> words.

    Args:
        encoder: images (B, 3, S, S) in [0, 1] -> annotations (B, L, D); has `out_dim`.
        attention: builds the attention (`model/attention`), see `Decoder`.
        score: builds the score function (`model/score`).
        vocab_size: V.
        doubly_stochastic: λ of the penalty λ Σ_i (1 - Σ_t α_ti)² (0 switches it off): the
            authors' alpha_c, see `loss` for the normalisation.
        encoder_self_attention: self-attention over the annotation vectors before decoding,
            built by `caption.models.build` from `model.encoder_self_attention` (None: off).
        **decoder_kwargs: the remaining `Decoder` options.
    """

    def __init__(
        self,
        encoder: nn.Module,
        attention: Callable[..., nn.Module],
        score: Callable[..., nn.Module],
        vocab_size: int,
        doubly_stochastic: float = 1.0,
        encoder_self_attention: AnnotationSelfAttention | None = None,
        **decoder_kwargs: Any,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        if encoder_self_attention is None:  # off: the paper decodes the annotations as they are
            encoder_self_attention = AnnotationSelfAttention(encoder.out_dim, layers=0)
        self.self_attention = encoder_self_attention
        self.decoder = Decoder(vocab_size, encoder.out_dim, attention, score, **decoder_kwargs)
        self.doubly_stochastic = doubly_stochastic

    @property
    def image_size(self) -> int:
        """The side S of the square images this model takes (its encoder's, saved with it)."""
        return self.encoder.image_size

    def prepare(
        self, image: Image.Image | str | Path, max_pixels: int | None = MAX_PIXELS
    ) -> Tensor:
        """An image (PIL, or a file's path) as this model's input, uint8 (3, S, S): resized
        whole to its square as in training (see `Encoder.prepare`)."""
        return self.encoder.prepare(image, max_pixels)

    def encode(self, images: Tensor) -> Tensor:
        """Annotation vectors a (B, L, D) of uint8 or [0, 1] float images (B, 3, S, S).

        3-D inputs are taken to be annotation vectors already, read from a feature cache of
        the frozen encoder; only the trainable self-attention then runs on them.
        """
        if images.dim() == 3:
            annotations = images.float()
        else:
            if images.dtype == torch.uint8:
                images = images.float().div_(255)
            annotations = self.encoder(images)
        if self.self_attention.layers:
            annotations = self.self_attention(annotations, self.grid(images))
        return annotations

    def grid(self, images: Tensor) -> tuple[int, int]:
        """The (H', W') grid of the annotation vectors for these images or cached annotations."""
        if images.dim() == 3:  # cached annotations of square images: L = S * S
            side = math.isqrt(images.shape[1])
            return side, side
        return self.encoder.grid_shape(images.shape[-1])

    def forward(
        self, images: Tensor, captions: Tensor, locations: Tensor | None = None
    ) -> DecoderOutput:
        """Teacher-forced logits (B, T-1, V), alphas (B, T-1, L) and what the attention chose."""
        return self.decoder(self.encode(images), captions, locations)

    def loss(
        self,
        images: Tensor,
        captions: Tensor,
        locations: Tensor | None = None,
        totals: Tensor | None = None,
    ) -> Losses:
        """Masked word NLL, the doubly stochastic penalty and, in training, the attention's
        own `surrogate` (for hard attention, the term that makes the gradient the Monte Carlo
        estimator of ∂L_s/∂W, Xu et al. eq. 12).

        Normalisation: every term is summed over the captions and divided by the number of
        words W, so that the loss scale does not depend on caption lengths. The loss is thus
        the authors' objective (eq. 14 as in arctic-captions: the per-caption summed NLL plus
        alpha_c Σ_i (1 − Σ_t α_ti)², averaged over captions) times captions / W, a positive
        constant: `doubly_stochastic` is exactly the authors' alpha_c, and NLL and penalty keep
        their relative weight. For hard attention the same factor scales the estimator
        1/N Σ_n [..]; with N > 1 samples per image, every sample's words count in W.

        Args:
            images: (B, 3, S, S).
            captions: (B, T) `<start> .. <end> <pad>..`.
            locations: (B, T-1) cells to force, for hard attention (tests use it to enumerate);
                with N > 1 samples, (B·N, T-1) forces each sample's path (image-major).
            totals: (2,) the words and images of the whole data-parallel step, all ranks
                together, each image counted once, to divide by instead of this batch's own:
                then the sum of the ranks' losses (and gradients) is that of their combined
                batch. None: this batch alone.
        """
        annotations = self.encode(images)
        attention = self.decoder.attention
        N = attention.samples if self.training else 1  # location samples per image
        if N > 1:  # the N samples of an image share one encoding
            annotations = annotations.repeat_interleave(N, dim=0)
            captions = captions.repeat_interleave(N, dim=0)
            if locations is not None and len(locations) != len(captions):
                locations = locations.repeat_interleave(N, dim=0)
        # Packed: only real words are decoded and scored, so padding cannot count.
        out = self.decoder.packed(annotations, captions, locations)
        B, L = annotations.shape[:2]  # B = images × N
        # W and the caption count of the whole step; `totals` counts each image once.
        n_words = len(out.targets) if totals is None else totals[0] * N
        n_captions = B if totals is None else totals[1] * N
        token_nll = F.cross_entropy(out.logits, out.targets, reduction="none")  # (n,)
        nll = token_nll.sum() / n_words
        steps = CaptionSteps(
            B, out.rows, token_nll, out.location_log_probs, out.entropies, out.sampled
        )
        # Σ_t α_ti over the real steps: each location should be looked at about once.
        mass = steps.per_caption(out.alphas)  # (B, L)
        penalty = ((1.0 - mass) ** 2).sum(dim=1)  # (B,) Σ_i (1 − Σ_t α_ti)²
        loss = nll + self.doubly_stochastic * penalty.sum() / n_words  # the NLL's normalisation
        # The attention's own signal (hard attention's estimator); it learns only in training.
        surrogate = attention.surrogate(steps) if self.training else None
        if surrogate is not None:
            loss = loss - surrogate.sum() / n_words
        return Losses(loss, nll, penalty.sum() / n_captions)

    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        strategy: str = "beam",
        beam_size: int = 3,
        max_len: int = 20,
        temperature: float = 1.0,
        length_penalty: float = 0.0,
        allow_unk: bool = False,
        block_trigrams: bool = False,
    ) -> Generated:
        """Caption a batch of images; returns the words with their attention.

        Args:
            images: (B, 3, S, S), uint8 or [0, 1] float.
            strategy: `greedy`, `beam` or `sample`.
            beam_size: live hypotheses per image, for `beam`; any size works, and 1 is greedy
                decoding (see `caption.models.decoding.beam_search` for what the search keeps
                and returns).
            max_len: the most words per caption, `<end>` included.
            temperature: softmax temperature, for `sample`.
            length_penalty: for `beam`, rank finished captions by log p / len^this, len counting
                `<end>` (0 = raw log p).
            allow_unk: let `<unk>` be generated; by default it is forbidden like `<pad>` and
                `<start>`, since a caption reading "a <unk> on a <unk>" tells a user nothing.
            block_trigrams: never extend a caption with a word that would repeat one of its
                trigrams ("a man in a red shirt and a red shirt"), in every strategy.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        annotations, grid = self.encode(images), self.grid(images)
        forbidden = forbidden_words(allow_unk)
        if strategy == "beam" and beam_size > 1:
            return beam_search(
                self.decoder,
                annotations,
                grid,
                beam_size,
                max_len,
                length_penalty,
                forbidden,
                block_trigrams,
            )
        return sequential(
            self.decoder,
            annotations,
            grid,
            max_len,
            sample=strategy == "sample",
            temperature=temperature,
            forbidden=forbidden,
            block_trigrams=block_trigrams,
        )
