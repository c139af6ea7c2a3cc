"""The LSTM decoder of Show, Attend and Tell (Xu et al. 2015, §3.1.2)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
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
    # (B, T-1, 2) a window's p_t (row, col) in cells, attentions with a window only; (B, T-1, h, 2)
    # for h windowed heads
    positions: Tensor | None = None
    sampled: Tensor | None = None  # (B, T-1) bool: looked at one cell a_s, hard attention only


class PackedOutput(NamedTuple):
    """Teacher-forced outputs for the real words only, one row per (caption, step) pair.

    Rows are in time-major order over captions sorted by length, as in a `PackedSequence`:
    step 0 of every caption, then step 1 of those still going, and so on. `rows` and `steps`
    say where each row belongs in the padded (B, T-1) layout.
    """

    logits: Tensor  # (N, V)
    alphas: Tensor  # (N, L)
    locations: Tensor  # (N,)
    location_log_probs: Tensor | None  # (N,) hard attention only
    entropies: Tensor | None  # (N,) hard attention only
    positions: Tensor | None  # (N, 2) attentions with a window only ((N, h, 2) for h heads)
    targets: Tensor  # (N,) the word each row predicts, never `<pad>`
    rows: Tensor  # (N,) the caption (row of the input batch) of each packed row
    steps: Tensor  # (N,) its step t
    # (N,) bool, hard attention only: the step looked at one cell a_s rather than the expected
    # context (one coin per caption in training, so constant along a caption)
    sampled: Tensor | None = None


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

    def input_gates(self, emb: Tensor) -> Tensor:
        """The word's share of the LSTM gates, E y W_ihᵀ + biases, for any leading shape.

        It does not depend on the recurrence, so teacher forcing computes it for all steps in
        one large matmul instead of one small one per step.
        """
        m = self.embed.embedding_dim
        return F.linear(emb, self.lstm.weight_ih[:, :m], self.lstm.bias_ih + self.lstm.bias_hh)

    def recurrent_weight(self) -> Tensor:
        """[W_ih (context part) | W_hh], so that each step's gates are one matmul of [x; h]."""
        m = self.embed.embedding_dim
        return torch.cat([self.lstm.weight_ih[:, m:], self.lstm.weight_hh], dim=1)

    def advance(
        self,
        gates_in: Tensor,
        state: tuple[Tensor, ...],
        annotations: Tensor,
        memory: object,
        recurrent: Tensor,
        location: Tensor | None = None,
    ) -> tuple[tuple[Tensor, ...], Tensor, AttentionOutput, Tensor]:
        """One LSTM step: attend with h_{t-1}, gate, then update the state.

        The cell is `nn.LSTMCell`'s (same weights, gate order i, f, g, o), written out so that
        the word's share of the gates can be computed ahead for all steps.

        Args:
            gates_in: `input_gates(E y_{t-1})`, (B, 4H).
            state: (h_{t-1}, c_{t-1}), plus h̃_{t-1} with input feeding.
            annotations: a, (B, L, D).
            memory: `attention.prepare(annotations)`.
            recurrent: `recurrent_weight()`, computed once per sequence.
            location: (B,) cells to force, for hard attention.

        Returns:
            (h_t, c_t), the gated context ẑ_t (B, D), the attention output and β_t (B,).
        """
        h, c = state[:2]
        att = self.attention(h, annotations, memory, location)  # scores use h_{t-1}
        beta = torch.sigmoid(self.f_beta(h)) if self.f_beta is not None else h.new_ones(len(h), 1)
        z = beta * att.context  # (B, D) ẑ_t = β_t Σ_i α_ti a_i (soft) or β_t a_{s_t} (hard)
        # Input feeding: last step's attentional vector tells the LSTM where it looked before.
        x = [z, state[2], h] if self.input_feeding else [z, h]
        gates = torch.addmm(gates_in, torch.cat(x, dim=-1), recurrent.t())  # (B, 4H)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if not self.input_feeding:
            return (h, c), z, att, beta.squeeze(-1)
        feed = torch.tanh(self.W_c(torch.cat([z, h], dim=-1)))  # (B, H) h̃_t
        return (h, c, feed), z, att, beta.squeeze(-1)

    def output(self, emb: Tensor, h: Tensor, z: Tensor) -> Tensor:
        """Logits of p(y_t); works on (B, m) or on whole sequences (B, T, m)."""
        if self.deep_output:
            return self.L_o(self.dropout(self.out_act(emb + self.L_h(h) + self.L_z(z))))
        return self.L_o(self.dropout(h))

    def step(
        self,
        y_prev: Tensor,
        state: tuple[Tensor, ...],
        annotations: Tensor,
        memory: object,
        recurrent: Tensor | None = None,
    ) -> DecoderStep:
        """Decode one word given the previous one, for inference.

        Args:
            y_prev: (B,) the previous words.
            state: the decoder state.
            annotations: a, (B, L, D).
            memory: `attention.prepare(annotations)`.
            recurrent: `recurrent_weight()`; pass it to compute it once per caption, not per step.
        """
        emb = self.embed(y_prev)  # (B,) -> (B, m)
        recurrent = self.recurrent_weight() if recurrent is None else recurrent
        state, z, att, beta = self.advance(
            self.input_gates(emb), state, annotations, memory, recurrent
        )
        return DecoderStep(self.output(emb, state[0], z), state, att, beta)

    def packed(
        self, annotations: Tensor, captions: Tensor, locations: Tensor | None = None
    ) -> PackedOutput:
        """Teacher forcing over the real words only, the batch shrinking as captions end.

        Captions are sorted by length, so the captions still going at step t are a prefix of
        the batch: step t runs on that prefix alone (views, no copies), and padding costs no
        attention, LSTM or output-layer work. The word embeddings' share of the gates and the
        output layer run once over all words.

        Args:
            annotations: a (B, L, D).
            captions: (B, T) token ids `<start> w_1 .. w_n <end> <pad>..`.
            locations: (B, T-1) cells to force at each step (hard attention only).
        """
        targets = captions[:, 1:]  # (B, T-1)
        lengths = (targets != PAD_ID).sum(dim=1)  # steps per caption
        order = lengths.argsort(descending=True, stable=True)
        steps = torch.arange(targets.shape[1], device=captions.device)
        live = steps.unsqueeze(1) < lengths[order].unsqueeze(0)  # (T-1, B) time-major
        counts = live.sum(dim=1).tolist()  # captions still going at each step; one sync
        # Training batches come sorted (`collate_captions`): then there is nothing to gather.
        presorted = torch.equal(order, torch.arange(len(order), device=order.device))
        a = annotations if presorted else annotations[order]
        memory = self.attention.prepare(a)  # once per image, not once per step
        state = self.init_state(a)
        recurrent = self.recurrent_weight()
        emb = self.embed(captions[order, :-1].t()[live])  # (N, m), time-major packed
        gates_in = self.input_gates(emb).split(counts)  # all words at once, then per step
        forced = locations[order] if locations is not None else None
        hs, zs, atts = [], [], []
        for t, n in enumerate(counts):
            if n == 0:
                break
            if n < len(state[0]):  # the shortest captions ended: drop them from the batch
                state = tuple(x[:n] for x in state)
                a = a[:n]
                memory = self.attention.select(memory, slice(0, n))
            force = forced[:n, t] if forced is not None else None
            state, z, att, _ = self.advance(gates_in[t], state, a, memory, recurrent, force)
            hs.append(state[0])
            zs.append(z)
            atts.append(att)
        # The output layer has no recurrence: one matmul over all words.
        logits = self.output(emb, torch.cat(hs), torch.cat(zs))  # (N, V)

        def packed(field: str) -> Tensor | None:
            values = [getattr(x, field) for x in atts]
            return None if values[0] is None else torch.cat(values)

        grid_rows = order.expand(len(steps), -1)  # (T-1, B): the input row of each slot
        grid_steps = steps.unsqueeze(1).expand_as(grid_rows)
        return PackedOutput(
            logits,
            packed("alpha"),
            packed("location"),
            packed("log_prob"),
            packed("entropy"),
            packed("position"),
            targets[order].t()[live],
            grid_rows[live],
            grid_steps[live],
            packed("sampled"),
        )

    def forward(
        self, annotations: Tensor, captions: Tensor, locations: Tensor | None = None
    ) -> DecoderOutput:
        """Teacher forcing over whole captions, in the padded (B, T-1) layout.

        The steps after a caption's `<end>` are not computed: there the logits and α are 0,
        the locations -1, the hard-attention terms 0 and the window positions NaN.

        Args:
            annotations: a (B, L, D).
            captions: (B, T) token ids `<start> w_1 .. w_n <end> <pad>..`.
            locations: (B, T-1) cells to force at each step (hard attention only).
        """
        out = self.packed(annotations, captions, locations)
        B, T = captions.shape

        def padded(x: Tensor | None, fill: float) -> Tensor | None:
            if x is None:
                return None
            grid = x.new_full((B, T - 1, *x.shape[1:]), fill)
            return grid.index_put((out.rows, out.steps), x)

        return DecoderOutput(
            padded(out.logits, 0.0),
            padded(out.alphas, 0.0),
            padded(out.locations, -1),
            padded(out.location_log_probs, 0.0),
            padded(out.entropies, 0.0),
            padded(out.positions, math.nan),
            padded(out.sampled, False),
        )
