"""The sequence models of the black-box learners (sequence.py): each reads a task's support set
as a sequence of (embedding, label) steps and scores its queries; `mann` and `lstm` also score
every step of a Santoro et al. (2016) training sequence (`sequence`).

Shape letters: T tasks, S = N*K support examples, M queries, L steps, D embedding, H hidden.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # the type only: sequence.py builds these cores from its config
    from metalearn.algos.blackbox.sequence import SequenceConfig


def previous_labels(labels: Tensor) -> Tensor:
    """y_{t-1} at each step t (T, L, N): the labels one step late, zeros at the first step."""
    return F.pad(labels[:, :-1], (0, 0, 1, 0))


def offset_inputs(support_z: Tensor, labels: Tensor, query_z: Tensor) -> tuple[Tensor, Tensor]:
    """Santoro et al.'s input order: (x_t, y_{t-1}) over the support set (T, S, D + N), zeros
    for the first label; each query comes with the last support label (T*M, D + N)."""
    previous = previous_labels(labels)  # y_{t-1}: (T, S, N)
    last = labels[:, -1:].expand(-1, query_z.shape[1], -1)
    return torch.cat([support_z, previous], -1), torch.cat([query_z, last], -1).flatten(0, 1)


class LSTMCore(nn.Module):
    """MANN-style: (x_t, y_{t-1}) through an LSTM; a query is one step from the support's end."""

    def __init__(self, cfg: SequenceConfig, dim: int, ways: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, cfg.hidden, batch_first=True)
        self.out = nn.Linear(cfg.hidden, ways)

    def forward(self, support_z: Tensor, labels: Tensor, query_z: Tensor) -> Tensor:
        inputs, x = offset_inputs(support_z, labels, query_z)
        _, (h, c) = self.lstm(inputs)  # (1, T, H) each
        tasks, queries = query_z.shape[:2]
        state = tuple(s.repeat_interleave(queries, dim=1) for s in (h, c))
        out, _ = self.lstm(x[:, None], state)  # one step per query
        return self.out(out[:, 0]).view(tasks, queries, -1)

    def sequence(self, z: Tensor, labels: Tensor) -> Tensor:
        """Logits at every step (T, L, N) of (x_t, y_{t-1}): one LSTM call (protocol=santoro)."""
        out, _ = self.lstm(torch.cat([z, previous_labels(labels)], -1))  # (T, L, H)
        return self.out(out)


class MemoryCore(nn.Module):
    """MANN (Santoro et al. 2016): an LSTM controller reading (x_t, y_{t-1}) and an external
    memory of `memory_slots` rows of `memory_width`, read by `read_heads` cosine-similarity
    heads and written by least-recently-used access (LRUA, their eq. 3-8): each head writes
    its key to a mix, gated by a learned sigmoid, of the rows it read last and the least-used
    row, which is erased first; usage decays by 0.95 per step. The memory does the binding
    of an example to the label that arrives after it, which a plain LSTM learns slowly."""

    decay = 0.95  # gamma, the usage decay of LRUA

    def __init__(self, cfg: SequenceConfig, dim: int, ways: int) -> None:
        super().__init__()
        self.slots, self.width, self.heads = cfg.memory_slots, cfg.memory_width, cfg.read_heads
        self.controller = nn.LSTMCell(dim + self.heads * self.width, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, self.heads * self.width)
        self.gate = nn.Linear(cfg.hidden, self.heads)
        self.out = nn.Linear(cfg.hidden + self.heads * self.width, ways)

    def initial_state(self, batch: int, like: Tensor) -> dict[str, Tensor]:
        zeros = like.new_zeros
        return {
            "h": zeros(batch, self.controller.hidden_size),
            "c": zeros(batch, self.controller.hidden_size),
            "memory": zeros(batch, self.slots, self.width) + 1e-6,
            "usage": zeros(batch, self.slots),
            "read_weights": zeros(batch, self.heads, self.slots),
            "reads": zeros(batch, self.heads * self.width),
        }

    def step(self, x: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """One time step for a batch (B, D + N): the output features (B, H + heads * width)."""
        h, c = self.controller(torch.cat([x, state["reads"]], -1), (state["h"], state["c"]))
        key = torch.tanh(self.key(h)).view(-1, self.heads, self.width)  # (B, heads, width)
        alpha = torch.sigmoid(self.gate(h))[..., None]  # (B, heads, 1)
        # the `heads` least-used rows (of the previous usage), the least used of all erased
        least = state["usage"].topk(self.heads, dim=-1, largest=False).indices  # (B, heads)
        least_used = torch.zeros_like(state["usage"]).scatter(1, least, 1.0)  # (B, slots)
        erase = torch.zeros_like(least_used).scatter(1, least[:, :1], 1.0)
        write = alpha * state["read_weights"] + (1 - alpha) * least_used[:, None]  # (B, heads, S)
        memory = state["memory"] * (1 - erase[..., None]) + write.transpose(1, 2) @ key
        similarity = F.cosine_similarity(key[:, :, None], memory[:, None], dim=-1, eps=1e-6)
        read_weights = similarity.softmax(-1)  # (B, heads, slots)
        reads = (read_weights @ memory).flatten(1)
        usage = self.decay * state["usage"] + read_weights.sum(1) + write.sum(1)
        state = {"h": h, "c": c, "memory": memory, "usage": usage,
                 "read_weights": read_weights, "reads": reads}  # fmt: skip
        return torch.cat([h, reads], -1), state

    def forward(self, support_z: Tensor, labels: Tensor, query_z: Tensor) -> Tensor:
        inputs, x = offset_inputs(support_z, labels, query_z)
        state = self.initial_state(inputs.shape[0], inputs)
        for t in range(inputs.shape[1]):
            _, state = self.step(inputs[:, t], state)
        tasks, queries = query_z.shape[:2]
        state = {k: v.repeat_interleave(queries, dim=0) for k, v in state.items()}
        features, _ = self.step(x, state)
        return self.out(features).view(tasks, queries, -1)

    def sequence(self, z: Tensor, labels: Tensor) -> Tensor:
        """Logits at every step (T, L, N) of (x_t, y_{t-1}) (protocol=santoro)."""
        inputs = torch.cat([z, previous_labels(labels)], -1)  # (T, L, D + N)
        state = self.initial_state(inputs.shape[0], inputs)
        features = []
        for t in range(inputs.shape[1]):
            out, state = self.step(inputs[:, t], state)
            features.append(out)
        return self.out(torch.stack(features, 1))


class SNAILCore(nn.Module):
    """Mishra et al. (2018), Omniglot: attention(64, 32), TC(128), attention(256, 128), TC(128),
    attention(512, 256), then a 1x1 convolution to the labels; each block concatenates its
    output to its input. `hidden` is the TC filters, key_size and value_size the first
    attention's sizes (the others scale as in the paper).

    Every query is the last position of its own sequence (support set, query). The support
    positions are causal, so they do not depend on the query: they run once per task, and each
    query needs only its own position, computed against the support's cached activations
    (`extend`) - the same numbers as one full sequence per query (tested), M times cheaper.
    """

    def __init__(self, cfg: SequenceConfig, dim: int, ways: int) -> None:
        super().__init__()
        k, v = cfg.key_size, cfg.value_size
        plan = [(k, v), "tc", (4 * k, 4 * v), "tc", (8 * k, 8 * v)]  # attention (key, value)
        channels, blocks = dim, []
        for step in plan:
            if step == "tc":
                blocks.append(TCBlock(channels, cfg.max_length, cfg.hidden))
            else:
                blocks.append(AttentionBlock(channels, *step))
            channels += blocks[-1].added
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Linear(channels, ways)  # the paper's 1x1 convolution, at one position

    def forward(self, support_z: Tensor, labels: Tensor, query_z: Tensor) -> Tensor:
        support = torch.cat([support_z, labels], -1).transpose(1, 2)  # (T, C, S)
        no_label = labels.new_zeros(*query_z.shape[:2], labels.shape[-1])
        query = torch.cat([query_z, no_label], -1)  # (T, M, C)
        for block in self.blocks:
            support, query = block.extend(support, query)
        return self.out(query)  # (T, M, N)


class TCBlock(nn.Module):
    """ceil(log2 L) dense layers with dilations 1, 2, 4, ...: gated (tanh * sigmoid) causal
    convolutions of kernel 2 (position t sees t and t - dilation), concatenated to the input."""

    def __init__(self, channels: int, length: int, filters: int) -> None:
        super().__init__()
        depth = max(1, math.ceil(math.log2(length)))
        self.convs = nn.ModuleList(
            nn.Conv1d(channels + i * filters, 2 * filters, 2, dilation=2**i) for i in range(depth)
        )
        self.added = depth * filters

    def forward(self, x: Tensor) -> Tensor:  # (B, C, L) -> (B, C + added, L)
        for conv in self.convs:
            x = self._layer(conv, x)
        return x

    def extend(self, support: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """The block on the support positions (T, C, S), and at one more position after them
        for each query (T, M, C): every layer's support output is computed once."""
        length = support.shape[-1]
        for conv in self.convs:
            d = conv.dilation[0]
            # the position d back is a support position (or the zero padding before it)
            back = (
                support[:, :, length - d] if d <= length else support.new_zeros(support.shape[:2])
            )
            w = conv.weight  # (2F, C, 2): tap 0 looks d back, tap 1 at the query itself
            out = query @ w[:, :, 1].T + (back @ w[:, :, 0].T)[:, None] + conv.bias
            f, g = out.chunk(2, dim=-1)
            query = torch.cat([query, torch.tanh(f) * torch.sigmoid(g)], -1)
            support = self._layer(conv, support)
        return support, query

    @staticmethod
    def _layer(conv: nn.Conv1d, x: Tensor) -> Tensor:
        f, g = conv(F.pad(x, (conv.dilation[0], 0))).chunk(2, dim=1)  # causal: pad the past
        return torch.cat([x, torch.tanh(f) * torch.sigmoid(g)], 1)


class AttentionBlock(nn.Module):
    """Causal single-head soft attention; its read is concatenated to the input."""

    def __init__(self, channels: int, key_size: int, value_size: int) -> None:
        super().__init__()
        self.query = nn.Linear(channels, key_size)
        self.key = nn.Linear(channels, key_size)
        self.value = nn.Linear(channels, value_size)
        self.added = value_size

    def forward(self, x: Tensor) -> Tensor:  # (B, C, L)
        h = x.transpose(1, 2)  # (B, L, C)
        read = F.scaled_dot_product_attention(
            self.query(h), self.key(h), self.value(h), is_causal=True
        )
        return torch.cat([x, read.transpose(1, 2)], 1)

    def extend(self, support: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """The block on the support positions (T, C, S), and each query (T, M, C) attending
        to them and to itself; the support's keys and values are computed once for both."""
        h = support.transpose(1, 2)
        keys, values = self.key(h), self.value(h)  # (T, S, K), (T, S, V)
        read = F.scaled_dot_product_attention(self.query(h), keys, values, is_causal=True)
        q, k_self, v_self = self.query(query), self.key(query), self.value(query)
        scale = q.shape[-1] ** -0.5
        scores = torch.cat([q @ keys.transpose(1, 2), (q * k_self).sum(-1, keepdim=True)], -1)
        weights = (scores * scale).softmax(-1)  # (T, M, S + 1)
        query_read = weights[..., :-1] @ values + weights[..., -1:] * v_self
        support = torch.cat([support, read.transpose(1, 2)], 1)
        return support, torch.cat([query, query_read], -1)


class TransformerCore(nn.Module):
    """A causal pre-norm transformer over support (x, y) tokens, then query (x, ?) tokens that
    attend to the support set and to themselves only."""

    def __init__(self, cfg: SequenceConfig, dim: int, ways: int) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, cfg.hidden)
        self.unknown = nn.Parameter(torch.zeros(ways))  # the label input of a query
        layer = nn.TransformerEncoderLayer(
            cfg.hidden, cfg.heads, 2 * cfg.hidden, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.out = nn.Linear(cfg.hidden, ways)

    def forward(self, support_z: Tensor, labels: Tensor, query_z: Tensor) -> Tensor:
        shots, queries = support_z.shape[1], query_z.shape[1]
        unknown = self.unknown.expand(*query_z.shape[:2], -1)
        tokens = torch.cat(
            [torch.cat([support_z, labels], -1), torch.cat([query_z, unknown], -1)], 1
        )  # (T, S + M, D + N)
        length = shots + queries
        # True = masked: support causal among itself; each query sees the support and itself
        mask = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu(1)
        mask[shots:, shots:] = ~torch.eye(queries, dtype=torch.bool, device=tokens.device)
        h = self.encoder(self.embed(tokens), mask=mask)
        return self.out(self.norm(h[:, shots:]))  # (T, M, N)


CORES = {
    "mann": MemoryCore,
    "lstm": LSTMCore,
    "snail": SNAILCore,
    "icl_transformer": TransformerCore,
}
