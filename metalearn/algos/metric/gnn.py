"""Few-shot graph neural networks (Garcia & Bruna 2018): label propagation on a learned graph.

Each query makes one graph (the paper's few-shot setting, one image to classify per task): node
0 is the query, nodes 1..N*K the support set, each node an embedding concatenated with its
label's one-hot (the query's label is unknown: uniform 1/N as in the paper, or zeros as in the
authors' code; `query_label`). Each layer learns an adjacency from the nodes' features,
A_ij = softmax over j != i of MLP(|x_i - x_j|) (paper, section 4), and a graph convolution maps
[x_i, sum_j A_ij x_j] (the operator family {I, A}) to new features concatenated to the old
ones (dense connections). A last adjacency and graph convolution give N logits, read at the
query node and trained by cross-entropy.

Followed: the authors' code, vgsatorras/few-shot-gnn (models/gnn_iclr.py: `Wcompute`, `Gconv`,
`GNN_nl_omniglot`; models/models.py: `MetricNN`, `EmbeddingOmniglot`): two layers of nf/2 = 48
new features each; the adjacency MLP as their 1x1 convolutions, of widths (2, 1.5, 1, 1) x its
input width (the last one's: x the previous layer's), each with BatchNorm and leaky ReLU (slope
0.01), dropout 0.3 in the last one only, self-edges masked before the softmax (the last 1x1
convolution's bias is left out: the softmax over j cancels it, so its gradient is zero); BatchNorm
after every graph convolution, the last included (their Omniglot model); leaky ReLU between
layers.

Differences, all deliberate:
- the embedding is the project's `model` (conv4) followed by their `fc_last` head: a linear map
  without bias to `embedding_size` (their 64 on Omniglot), BatchNorm and leaky ReLU;
- metalearn episodes hold Q queries per class, so every query gets its own graph (B = T*N*Q
  graphs of N*K + 1 nodes, the support nodes repeated per graph, in one batched call) and no
  query sees another through the graph. At evaluation (their `.eval()`) this head's BatchNorm
  uses the running statistics of meta-training and dropout is off, so given the embeddings one
  query's logits do not depend on another's; in meta-training, as in theirs, the meta-batch's
  graphs share BatchNorm's batch statistics. The conv4 embedding keeps the project's per-task
  batch statistics (transductive, as for every metric learner here);
- their query nodes' label features are zeros (`zero_pad`); the paper's and our default, 1/N.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algos.learner import AlgoConfig
from metalearn.algos.metric.episodic import EpisodicLearner, check_outer_lr
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError

QUERY_LABELS = ("uniform", "zeros")
# the adjacency MLP's widths as multiples of its base width (their Omniglot `ratio`)
EDGE_RATIOS = (2.0, 1.5, 1.0, 1.0)
# at evaluation, graphs go through in chunks of about this many node pairs (memory: 20-way
# graphs have 441 pairs of up to 264 features each; results are the same, BatchNorm being fixed)
EVAL_PAIRS = 1 << 16


@dataclass
class GNNConfig(AlgoConfig):
    """The graph network's sizes; the embedding network is the model (conv4)."""

    name: str = "gnn"
    outer_lr: float = 1e-3  # Adam step size (their Omniglot runs: 1e-3, halved every 10^4)
    embedding_size: int = 64  # node embedding: linear map of the model's output (theirs: 64)
    hidden: int = 96  # their nf: each graph layer adds hidden // 2 features
    layers: int = 2  # graph layers before the last (adjacency, graph convolution) pair
    adjacency_dropout: float = 0.3  # dropout in the last adjacency MLP (theirs: 0.3)
    query_label: str = "uniform"  # the query node's label features: uniform 1/N or zeros
    train_query: int | None = None  # query examples per class in meta-training (None: data.query)

    REFERENCE: ClassVar[dict[str, Any]] = {
        "source": "vgsatorras/few-shot-gnn (models/gnn_iclr.py GNN_nl_omniglot, models.py)",
        "query_label": "zeros",
        "embedding_size": 64,
        "hidden": 96,
        "layers": 2,
        "adjacency_dropout": 0.3,
    }

    def train_shape(self) -> tuple[int | None, int | None, int | None]:
        return None, None, self.train_query

    def __post_init__(self) -> None:
        check_outer_lr(self)
        for key in ("embedding_size", "layers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"algo.{key} must be at least 1, got {getattr(self, key)}")
        if self.hidden < 2:
            raise ConfigError(
                f"algo.hidden must be at least 2 (layers add hidden // 2), got {self.hidden}"
            )
        if not 0 <= self.adjacency_dropout < 1:
            raise ConfigError(
                f"algo.adjacency_dropout must be in [0, 1), got {self.adjacency_dropout}"
            )
        if self.query_label not in QUERY_LABELS:
            raise ConfigError(
                f"algo.query_label must be one of {', '.join(QUERY_LABELS)}, "
                f"got {self.query_label!r}"
            )


class Adjacency(nn.Module):
    """Their Wcompute: (B, n, F) nodes -> (B, n, n) row-stochastic A, A_ii = 0."""

    def __init__(self, in_features: int, width: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        features = in_features
        for i, ratio in enumerate(EDGE_RATIOS):
            out = int(width * ratio)
            layers += [nn.Linear(features, out), nn.BatchNorm1d(out), nn.LeakyReLU()]
            if i == 0 and dropout > 0:
                layers.append(nn.Dropout(dropout))
            features = out
        self.mlp = nn.Sequential(*layers)  # 1x1 convolutions over (i, j) pairs in theirs
        self.out = nn.Linear(features, 1, bias=False)  # a bias would cancel in the softmax

    def forward(self, x: Tensor) -> Tensor:
        graphs, nodes = x.shape[:2]
        pairs = (x[:, :, None] - x[:, None]).abs()  # (B, n, n, F): |x_i - x_j|
        logits = self.out(self.mlp(pairs.flatten(0, 2))).view(graphs, nodes, nodes)
        self_edge = torch.eye(nodes, dtype=torch.bool, device=x.device)
        return torch.softmax(logits.masked_fill(self_edge, -torch.inf), dim=-1)


class GraphConv(nn.Module):
    """Their Gconv with the operators {I, A}: x_i -> BN(W [x_i, sum_j A_ij x_j] + b)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(2 * in_features, out_features)
        self.norm = nn.BatchNorm1d(out_features)  # over every node of every graph

    def forward(self, adjacency: Tensor, x: Tensor) -> Tensor:  # (B, n, n), (B, n, F)
        h = self.linear(torch.cat([x, adjacency @ x], dim=-1))  # (B, n, out)
        return self.norm(h.flatten(0, 1)).view_as(h)


class GraphNetwork(nn.Module):
    """Their GNN_nl_omniglot: (B, n, F0) nodes -> (B, N) logits at node 0 (the query)."""

    def __init__(self, in_features: int, cfg: GNNConfig, ways: int) -> None:
        super().__init__()
        growth = cfg.hidden // 2
        widths = [in_features + growth * i for i in range(cfg.layers + 1)]
        self.adjacencies = nn.ModuleList(Adjacency(f, f, 0.0) for f in widths[:-1])
        self.convs = nn.ModuleList(GraphConv(f, growth) for f in widths[:-1])
        self.last_adjacency = Adjacency(widths[-1], widths[-2], cfg.adjacency_dropout)
        self.last_conv = GraphConv(widths[-1], ways)

    def forward(self, x: Tensor) -> Tensor:
        for adjacency, conv in zip(self.adjacencies, self.convs, strict=True):
            x = torch.cat([x, F.leaky_relu(conv(adjacency(x), x))], dim=-1)  # dense connections
        return self.last_conv(self.last_adjacency(x), x)[:, 0]


class GNN(EpisodicLearner):
    """Logits from one graph per query: the query node's output after the graph layers."""

    needs_ways = True  # build.py passes the ways: the width of the label features and logits

    def __init__(self, cfg: GNNConfig, model: nn.Module, kind: str, task_batching: str, *, ways):
        super().__init__(cfg, model, kind, task_batching)
        self.ways = ways
        device = next(model.parameters()).device
        self.projection = nn.Sequential(  # their EmbeddingOmniglot's fc_last, bn_last, leaky
            nn.Linear(model.embedding_dim, cfg.embedding_size, bias=False),
            nn.BatchNorm1d(cfg.embedding_size),
            nn.LeakyReLU(),
        ).to(device)
        self.graph = GraphNetwork(cfg.embedding_size + ways, cfg, ways).to(device)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"projection": self.projection, "graph": self.graph}

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Inside, this head's BatchNorm uses its running statistics and dropout is off (their
        `metric_nn.eval()` at test time): each query's logits depend on its own graph alone."""
        modules = list(self.extra_modules().values())
        for module in modules:
            module.eval()
        try:
            yield
        finally:
            for module in modules:
                module.train()

    def graphs(self, support_z: Tensor, support_y: Tensor, query_z: Tensor) -> Tensor:
        """Embeddings (T, S, D), labels (T, S), queries (T, M, D) -> (T*M, 1 + S, E + N) nodes,
        each query first and the task's support set after it."""
        tasks, shots, _ = support_z.shape
        queries = query_z.shape[1]
        z = torch.cat([support_z, query_z], dim=1).flatten(0, 1)
        z = self.projection(z).view(tasks, shots + queries, -1)  # (T, S + M, E)
        labels = F.one_hot(support_y, self.ways).to(z.dtype)  # (T, S, N)
        fill = 1.0 / self.ways if self.cfg.query_label == "uniform" else 0.0
        unknown = torch.full((tasks, queries, self.ways), fill, dtype=z.dtype, device=z.device)
        support = torch.cat([z[:, :shots], labels], dim=-1)  # (T, S, E + N)
        query = torch.cat([z[:, shots:], unknown], dim=-1)  # (T, M, E + N)
        support = support[:, None].expand(-1, queries, -1, -1)  # (T, M, S, E + N)
        return torch.cat([query[:, :, None], support], dim=2).flatten(0, 1)

    def scores(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, ways: int) -> Tensor:
        if ways != self.ways:
            raise ConfigError(
                f"algo=gnn was built for {self.ways}-way tasks and got {ways}-way ones: its label "
                f"features and logits have a fixed width; train a {ways}-way model"
            )
        nodes = self.graphs(support_z, support_y, query_z)  # (T*M, n, E + N)
        if self.graph.training:  # one call: BatchNorm's statistics over the meta-batch (theirs)
            logits = self.graph(nodes)
        else:  # each graph on its own: chunks give the same logits with less memory
            chunk = max(1, EVAL_PAIRS // nodes.shape[1] ** 2)
            logits = torch.cat([self.graph(part) for part in nodes.split(chunk)])
        return logits.view(*query_z.shape[:2], ways)  # (T, M, N)

    def evaluate(self, batch: TaskBatch, steps: list[int]) -> dict[str, Tensor]:
        with self.evaluating():
            return super().evaluate(batch, steps)

    def predict(self, support: Split, query_x: Tensor, steps: int | None = None) -> Tensor:
        with self.evaluating():
            return super().predict(support, query_x, steps)
