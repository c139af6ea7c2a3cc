"""The LSTM decoder of Show, Attend and Tell (Xu et al. 2015, §3.1.2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from caption.data.vocab import PAD_ID
from caption.models.attention import AttentionOutput


class DecoderStep(NamedTuple):
    logits: Tensor  # (B, V) unnormalised p(y_t)
    state: tuple[Tensor, Tensor]  # (h_t, c_t), each (B, H)
    attention: AttentionOutput  # α_t, the cell looked at, and the hard estimator's terms
    beta: Tensor  # (B,) the gate on the context


class DecoderOutput(NamedTuple):
    logits: Tensor  # (B, T-1, V) predicting captions[:, 1:]
    alphas: Tensor  # (B, T-1, L)
    locations: Tensor  # (B, T-1) the cell looked at per word
    location_log_probs: Tensor | None  # (B, T-1) log p(s_t | a), hard attention only
    entropies: Tensor | None  # (B, T-1) H[α_t], hard attention only


class Decoder(nn.Module):
    """An LSTM that attends over the annotation vectors before every word.

    Each paper ingredient can be switched off, to measure what it is worth.

    Args:
        vocab_size: V.
        annotation_dim: D, the size of an annotation vector a_i.
        attention: builds the attention given `score`, `query_dim` and `key_dim`.
        score: builds the score function f_att (passed on to `attention`).
        embed_dim: m, the word embedding size (also the deep output's hidden size).
        hidden_dim: H, the LSTM size.
        dropout: dropout before the output layer.
        init_from_mean: h_0, c_0 = MLPs of the mean annotation (else zeros).
        gate: scale the context by a scalar β_t = σ(f_β(h_{t-1})).
        deep_output: p(y_t) ∝ exp(L_o(E y_{t-1} + L_h h_t + L_z ẑ_t)) (else L_o h_t).
        deep_output_activation: `tanh` before L_o (the authors' code) or `none` (the paper).
    """

    def __init__(
        self,
        vocab_size: int,
        annotation_dim: int,
        attention: Callable[..., nn.Module],
        score: Callable[..., nn.Module],
        embed_dim: int = 128,
        hidden_dim: int = 256,
        dropout: float = 0.5,
        init_from_mean: bool = True,
        gate: bool = True,
        deep_output: bool = True,
        deep_output_activation: str = "none",
    ) -> None:
        super().__init__()
        D, H, m = annotation_dim, hidden_dim, embed_dim
        self.hidden_dim = H
        self.embed = nn.Embedding(vocab_size, m, padding_idx=PAD_ID)  # E
        self.attention = attention(score=score, query_dim=H, key_dim=D)
        self.lstm = nn.LSTMCell(m + D, H)
        self.init_from_mean = init_from_mean
        if init_from_mean:
            self.init_h = nn.Sequential(nn.Linear(D, H), nn.Tanh())  # f_init,h
            self.init_c = nn.Sequential(nn.Linear(D, H), nn.Tanh())  # f_init,c
        self.f_beta = nn.Linear(H, 1) if gate else None
        self.dropout = nn.Dropout(dropout)
        self.deep_output = deep_output
        if deep_output:
            self.L_h = nn.Linear(H, m, bias=False)
            self.L_z = nn.Linear(D, m, bias=False)
            self.out_act = {"none": nn.Identity, "tanh": nn.Tanh}[deep_output_activation]()
            self.L_o = nn.Linear(m, vocab_size)
        else:
            self.L_o = nn.Linear(H, vocab_size)

    def init_state(self, annotations: Tensor) -> tuple[Tensor, Tensor]:
        """(h_0, c_0) from the mean annotation vector, or zeros."""
        B, L, D = annotations.shape
        if not self.init_from_mean:
            h = annotations.new_zeros(B, self.hidden_dim)
            return h, h.clone()
        mean = annotations.mean(dim=1)  # (B, D)
        return self.init_h(mean), self.init_c(mean)

    def advance(
        self,
        emb: Tensor,
        state: tuple[Tensor, Tensor],
        annotations: Tensor,
        memory: object,
        location: Tensor | None = None,
    ) -> tuple[tuple[Tensor, Tensor], Tensor, AttentionOutput, Tensor]:
        """One LSTM step: attend with h_{t-1}, gate, then update the state.

        Args:
            emb: E y_{t-1}, (B, m).
            state: (h_{t-1}, c_{t-1}).
            annotations: a, (B, L, D).
            memory: `attention.prepare(annotations)`.
            location: (B,) cells to force, for hard attention.

        Returns:
            (h_t, c_t), the gated context ẑ_t (B, D), the attention output and β_t (B,).
        """
        h, c = state
        att = self.attention(h, annotations, memory, location)  # scores use h_{t-1}
        beta = torch.sigmoid(self.f_beta(h)) if self.f_beta is not None else h.new_ones(len(h), 1)
        z = beta * att.context  # (B, D) ẑ_t = β_t Σ_i α_ti a_i (soft) or β_t a_{s_t} (hard)
        h, c = self.lstm(torch.cat([emb, z], dim=-1), (h, c))
        return (h, c), z, att, beta.squeeze(-1)

    def output(self, emb: Tensor, h: Tensor, z: Tensor) -> Tensor:
        """Logits of p(y_t); works on (B, m) or on whole sequences (B, T, m)."""
        if self.deep_output:
            return self.L_o(self.dropout(self.out_act(emb + self.L_h(h) + self.L_z(z))))
        return self.L_o(self.dropout(h))

    def step(
        self, y_prev: Tensor, state: tuple[Tensor, Tensor], annotations: Tensor, memory: object
    ) -> DecoderStep:
        """Decode one word given the previous one, for inference."""
        emb = self.embed(y_prev)  # (B,) -> (B, m)
        state, z, att, beta = self.advance(emb, state, annotations, memory)
        return DecoderStep(self.output(emb, state[0], z), state, att, beta)

    def forward(
        self, annotations: Tensor, captions: Tensor, locations: Tensor | None = None
    ) -> DecoderOutput:
        """Teacher forcing over whole captions.

        Args:
            annotations: a (B, L, D).
            captions: (B, T) token ids `<start> w_1 .. w_n <end> <pad>..`.
            locations: (B, T-1) cells to force at each step (hard attention only).
        """
        B, T = captions.shape
        memory = self.attention.prepare(annotations)  # once per image, not once per step
        state = self.init_state(annotations)
        emb = self.embed(captions[:, :-1])  # (B, T-1, m) E y_{t-1}
        hs, zs, atts = [], [], []
        for t in range(T - 1):
            forced = locations[:, t] if locations is not None else None
            state, z, att, _ = self.advance(emb[:, t], state, annotations, memory, forced)
            hs.append(state[0])
            zs.append(z)
            atts.append(att)
        # The output layer has no recurrence: one batched matmul over all steps.
        logits = self.output(emb, torch.stack(hs, 1), torch.stack(zs, 1))  # (B, T-1, V)

        def stacked(field: str) -> Tensor | None:
            values = [getattr(a, field) for a in atts]
            return None if values[0] is None else torch.stack(values, 1)

        return DecoderOutput(
            logits,
            stacked("alpha"),
            stacked("location"),
            stacked("log_prob"),
            stacked("entropy"),
        )
