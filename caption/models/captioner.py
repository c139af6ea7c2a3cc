"""The captioner: an encoder, an attending decoder, the training loss and inference."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from caption.data.vocab import END_ID, PAD_ID, START_ID
from caption.models.decoder import Decoder

STRATEGIES = ("greedy", "beam", "sample")


class Generated(NamedTuple):
    tokens: Tensor  # (B, T) word ids, `<end>` included, then `<pad>`
    alphas: Tensor  # (B, T, L) attention weights of each generated word
    log_probs: Tensor  # (B,) log p(caption | image), `<end>` included
    betas: Tensor  # (B, T) the gate of each generated word
    grid: tuple[int, int]  # (H', W'): reshape an alpha row to this to see it over the image


class Losses(NamedTuple):
    loss: Tensor  # what is minimised
    nll: Tensor  # mean negative log-likelihood per word
    attention_reg: Tensor  # doubly stochastic penalty, before its weight λ


class Captioner(nn.Module):
    """Show, Attend and Tell: image -> annotation vectors -> attending LSTM -> words.

    Args:
        encoder: images (B, 3, S, S) in [0, 1] -> annotations (B, L, D); has `out_dim`.
        attention: builds the attention (`model/attention`), see `Decoder`.
        score: builds the score function (`model/score`).
        vocab_size: V.
        doubly_stochastic: λ of the penalty λ Σ_i (1 - Σ_t α_ti)² (0 switches it off).
        **decoder_kwargs: the remaining `Decoder` options.
    """

    def __init__(
        self,
        encoder: nn.Module,
        attention: Callable[..., nn.Module],
        score: Callable[..., nn.Module],
        vocab_size: int,
        doubly_stochastic: float = 1.0,
        **decoder_kwargs,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = Decoder(vocab_size, encoder.out_dim, attention, score, **decoder_kwargs)
        self.doubly_stochastic = doubly_stochastic

    def encode(self, images: Tensor) -> Tensor:
        """Annotation vectors a (B, L, D) of uint8 or [0, 1] float images (B, 3, S, S)."""
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        return self.encoder(images)

    def forward(self, images: Tensor, captions: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forced logits (B, T-1, V) and alphas (B, T-1, L)."""
        return self.decoder(self.encode(images), captions)

    def loss(self, images: Tensor, captions: Tensor) -> Losses:
        """Masked word NLL plus the doubly stochastic attention penalty.

        Args:
            images: (B, 3, S, S).
            captions: (B, T) `<start> .. <end> <pad>..`.
        """
        logits, alphas = self(images, captions)
        targets = captions[:, 1:]  # (B, T-1) predict the next word
        mask = targets != PAD_ID  # padding is not a word: it must not count
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD_ID)
        # Σ_t α_ti over the real steps only: each location should be looked at about once.
        mass = (alphas * mask.unsqueeze(-1)).sum(dim=1)  # (B, T-1, L) -> (B, L)
        reg = ((1.0 - mass) ** 2).sum(dim=1).mean()
        return Losses(nll + self.doubly_stochastic * reg, nll, reg)

    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        strategy: str = "beam",
        beam_size: int = 3,
        max_len: int = 20,
        temperature: float = 1.0,
        length_penalty: float = 0.0,
    ) -> Generated:
        """Caption a batch of images; returns the words with their attention.

        Args:
            images: (B, 3, S, S), uint8 or [0, 1] float.
            strategy: `greedy`, `beam` or `sample`.
            beam_size: beams per image, for `beam`.
            max_len: the most words per caption, `<end>` included.
            temperature: softmax temperature, for `sample`.
            length_penalty: for `beam`, rank finished captions by log p / len^this (0 = raw).
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        annotations = self.encode(images)
        if strategy == "beam" and beam_size > 1:
            out = self._beam(annotations, beam_size, max_len, length_penalty)
        else:
            out = self._sequential(
                annotations, max_len, sample=strategy == "sample", temperature=temperature
            )
        return Generated(*out, grid=self.encoder.grid_shape(images.shape[-1]))

    def _sequential(
        self, annotations: Tensor, max_len: int, sample: bool, temperature: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Greedy decoding, or ancestral sampling at a temperature."""
        B, L, D = annotations.shape
        dec = self.decoder
        keys = dec.attention.keys(annotations)
        state = dec.init_state(annotations)
        y = annotations.new_full((B,), START_ID, dtype=torch.long)
        done = torch.zeros(B, dtype=torch.bool, device=annotations.device)
        log_prob = annotations.new_zeros(B)
        tokens, alphas, betas = [], [], []
        for _ in range(max_len):
            step = dec.step(y, state, annotations, keys)
            logits = _no_specials(step.logits)
            logp = logits.log_softmax(-1)  # (B, V)
            if sample:
                y = torch.multinomial((logits / temperature).softmax(-1), 1).squeeze(1)
            else:
                y = logp.argmax(-1)
            log_prob += torch.where(done, 0.0, logp.gather(1, y[:, None]).squeeze(1))
            y = y.masked_fill(done, PAD_ID)  # finished captions only pad
            tokens.append(y)
            alphas.append(step.alpha.masked_fill(done[:, None], 0.0))
            betas.append(step.beta.masked_fill(done, 0.0))
            done = done | (y == END_ID)
            state = step.state
            if done.all():
                break
        return torch.stack(tokens, 1), torch.stack(alphas, 1), log_prob, torch.stack(betas, 1)

    def _beam(
        self, annotations: Tensor, K: int, max_len: int, length_penalty: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Beam search over all images at once: B*K hypotheses advance as one batch.

        Finished hypotheses stay in the beam, extended by `<pad>` at no cost, so they compete
        with live ones on their summed log-probability. If no hypothesis of an image reaches
        `<end>` within `max_len`, its best unfinished one is returned.
        """
        B, L, D = annotations.shape
        dec = self.decoder
        device = annotations.device
        a = annotations.repeat_interleave(
            K, dim=0
        )  # (B*K, L, D), image b's beams are rows bK..bK+K-1
        keys = dec.attention.keys(a)
        state = dec.init_state(a)
        y = torch.full((B * K,), START_ID, dtype=torch.long, device=device)
        scores = annotations.new_zeros(B, K)
        scores[:, 1:] = float("-inf")  # all beams start equal: keep one, or topk picks K copies
        done = torch.zeros(B, K, dtype=torch.bool, device=device)
        tokens = torch.empty(B, K, 0, dtype=torch.long, device=device)
        alphas = annotations.new_empty(B, K, 0, L)
        betas = annotations.new_empty(B, K, 0)
        offsets = torch.arange(B, device=device).unsqueeze(1) * K  # (B, 1) row of beam 0
        for _ in range(max_len):
            step = dec.step(y, state, a, keys)
            logp = (
                _no_specials(step.logits).log_softmax(-1).view(B, K, -1)
            )  # (B, K, V) log-probs, not logits
            V = logp.shape[-1]
            # A finished hypothesis has one continuation, <pad>, which costs nothing.
            pad_only = torch.full_like(logp[0, 0], float("-inf"))
            pad_only[PAD_ID] = 0.0
            logp = torch.where(done.unsqueeze(-1), pad_only, logp)
            top, idx = (scores.unsqueeze(-1) + logp).view(B, K * V).topk(K, dim=-1)  # (B, K)
            parent = torch.div(idx, V, rounding_mode="floor")  # integer division of indices
            word = idx % V
            rows = (offsets + parent).view(-1)  # (B*K,) flat index of each parent hypothesis
            scores = top
            tokens = torch.cat(
                [
                    tokens.gather(1, parent.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])),
                    word.unsqueeze(-1),
                ],
                dim=-1,
            )
            alphas = torch.cat(
                [
                    alphas[torch.arange(B, device=device)[:, None], parent],
                    step.alpha[rows].view(B, K, 1, L),
                ],
                dim=2,
            )
            betas = torch.cat(
                [
                    betas[torch.arange(B, device=device)[:, None], parent],
                    step.beta[rows].view(B, K, 1),
                ],
                dim=2,
            )
            done = done.gather(1, parent) | (word == END_ID)
            state = (step.state[0][rows], step.state[1][rows])
            y = word.view(-1)
            if done.all():
                break
        lengths = ((tokens != PAD_ID).sum(-1)).clamp(min=1).float()  # (B, K)
        ranked = scores / lengths.pow(length_penalty)
        # Prefer complete captions; fall back to the best unfinished one.
        ranked = torch.where(
            done.any(1, keepdim=True), ranked.masked_fill(~done, float("-inf")), ranked
        )
        best = ranked.argmax(dim=1)  # (B,)
        b = torch.arange(B, device=device)
        keep = tokens[b, best] != PAD_ID  # (B, T) zero out the steps after <end>
        return (
            tokens[b, best],
            alphas[b, best] * keep.unsqueeze(-1),
            scores[b, best],
            betas[b, best] * keep,
        )


def _no_specials(logits: Tensor) -> Tensor:
    """Forbid `<pad>` and `<start>` as generated words: training never asks for them."""
    logits = logits.clone()
    logits[:, [PAD_ID, START_ID]] = float("-inf")
    return logits
