"""The LSTM decoder of Show, Attend and Tell (Xu et al. 2015, §3.1.2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from caption.data.vocab import PAD_ID
from caption.models.attention import AttentionOutput
from caption.models.multihead import MultiHeadAttention


class DecoderStep(NamedTuple):
    logits: Tensor  # (B, V) unnormalised p(y_t)
    state: tuple[Tensor, ...]  # (h_t, c_t), plus h̃_t with input feeding; each (B, H)
    attention: AttentionOutput  # α_t, the cell looked at, and the hard estimator's terms
    beta: Tensor  # (B,) the gate on the context


class DecoderOutput(NamedTuple):
    logits: Tensor  # (B, T-1, V) predicting captions[:, 1:]
    alphas: Tensor  # (B, T-1, L)
    locations: Tensor  # (B, T-1) the cell looked at per word
    location_log_probs: Tensor | None  # (B, T-1) log p(s_t | a), hard attention only
    entropies: Tensor | None  # (B, T-1) H[α_t], hard attention only
    positions: Tensor | None = None  # (B, T-1, 2) local attention's p_t (row, col) in cells


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
        heads: h attention heads (1: the paper's single attention).
        input_feeding: feed the previous attentional vector h̃_{t-1} = tanh(W_c [ẑ_{t-1}; h_{t-1}])
            into the LSTM with the next word (Luong et al. 2015).
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
        heads: int = 1,
        input_feeding: bool = False,
    ) -> None:
        super().__init__()
        D, H, m = annotation_dim, hidden_dim, embed_dim
        self.hidden_dim = H
        self.embed = nn.Embedding(vocab_size, m, padding_idx=PAD_ID)  # E
        if heads == 1:
            self.attention = attention(score=score, query_dim=H, key_dim=D)
        else:
            self.attention = MultiHeadAttention(attention, score, H, D, heads)
        self.input_feeding = input_feeding
        self.W_c = nn.Linear(D + H, H) if input_feeding else None
        self.lstm = nn.LSTMCell(m + D + H * input_feeding, H)
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

    def init_state(self, annotations: Tensor) -> tuple[Tensor, ...]:
        """(h_0, c_0) from the mean annotation vector, or zeros; plus h̃_0 = 0 with input feeding."""
        B, L, D = annotations.shape
        zeros = annotations.new_zeros(B, self.hidden_dim)
        if self.init_from_mean:
            mean = annotations.mean(dim=1)  # (B, D)
            h, c = self.init_h(mean), self.init_c(mean)
        else:
            h, c = zeros, zeros.clone()
        return (h, c, zeros) if self.input_feeding else (h, c)

    def advance(
        self,
        emb: Tensor,
        state: tuple[Tensor, ...],
        annotations: Tensor,
        memory: object,
        location: Tensor | None = None,
    ) -> tuple[tuple[Tensor, ...], Tensor, AttentionOutput, Tensor]:
        """One LSTM step: attend with h_{t-1}, gate, then update the state.

        Args:
            emb: E y_{t-1}, (B, m).
            state: (h_{t-1}, c_{t-1}), plus h̃_{t-1} with input feeding.
            annotations: a, (B, L, D).
            memory: `attention.prepare(annotations)`.
            location: (B,) cells to force, for hard attention.

        Returns:
            (h_t, c_t), the gated context ẑ_t (B, D), the attention output and β_t (B,).
        """
        h, c = state[:2]
        att = self.attention(h, annotations, memory, location)  # scores use h_{t-1}
        beta = torch.sigmoid(self.f_beta(h)) if self.f_beta is not None else h.new_ones(len(h), 1)
        z = beta * att.context  # (B, D) ẑ_t = β_t Σ_i α_ti a_i (soft) or β_t a_{s_t} (hard)
        if not self.input_feeding:
            h, c = self.lstm(torch.cat([emb, z], dim=-1), (h, c))
            return (h, c), z, att, beta.squeeze(-1)
        # Input feeding: last step's attentional vector tells the LSTM where it looked before.
        h, c = self.lstm(torch.cat([emb, z, state[2]], dim=-1), (h, c))
        feed = torch.tanh(self.W_c(torch.cat([z, h], dim=-1)))  # (B, H) h̃_t
        return (h, c, feed), z, att, beta.squeeze(-1)

    def output(self, emb: Tensor, h: Tensor, z: Tensor) -> Tensor:
        """Logits of p(y_t); works on (B, m) or on whole sequences (B, T, m)."""
        if self.deep_output:
            return self.L_o(self.dropout(self.out_act(emb + self.L_h(h) + self.L_z(z))))
        return self.L_o(self.dropout(h))

    def step(
        self, y_prev: Tensor, state: tuple[Tensor, ...], annotations: Tensor, memory: object
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
            stacked("position"),
        )
