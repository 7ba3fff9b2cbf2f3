"""Matching Networks (Vinyals et al. 2016): attention over the support set by cosine similarity.

P(y | x, S) = sum_i a(x, x_i) y_i with a = softmax of the cosine similarities between the
query's embedding f(x) and each support embedding g(x_i) (paper, eq. 1-2). With full context
embeddings (`fce`, paper section 2.1.2 and appendix A.2), g is a bidirectional LSTM over the
support embeddings and f an attention LSTM that reads the support set for `fce_steps` steps.

The paper's softmax is over raw cosines in [-1, 1], so even a perfect match gets little more
attention than a poor one and the gradients are weak. Later reimplementations multiply the
cosines by a temperature first: wyharveychen/CloserLookFewShot (Chen et al. 2019,
methods/matchingnet.py) a fixed 100 after a ReLU, TADAM (Oreshkin et al. 2018) a learned scale.
`scale`, `learn_scale` and `cosine_relu` offer each; results.json's protocol.reference records
which was used against the CloserLookFewShot one.
"""

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algos.learner import AlgoConfig
from metalearn.algos.metric.episodic import EpisodicLearner, check_outer_lr
from metalearn.errors import ConfigError

# log P(y | x, S) is clamped here so that a class with no attention at all costs a finite loss
LOG_EPS = 1e-12


@dataclass
class MatchingNetConfig(AlgoConfig):
    """Cosine attention over the support set, optionally with full context embeddings."""

    name: str = "matchingnet"
    outer_lr: float = 1e-3  # Adam step size
    fce: bool = False  # full context embeddings: biLSTM over support, attention LSTM over query
    fce_steps: int = 5  # K, the attention LSTM's processing steps over the support set
    scale: float = 100.0  # cosines are multiplied by this before the softmax (paper: 1)
    learn_scale: bool = False  # learn the scale (log-parametrised, started at `scale`)
    cosine_relu: bool = True  # negative cosines count as 0 (CloserLookFewShot's relu(cos))
    train_ways: int | None = None  # ways in meta-training (None: data.ways)
    train_query: int | None = None  # query examples per class in meta-training (None: data.query)

    REFERENCE: ClassVar[dict[str, Any]] = {
        "source": "wyharveychen/CloserLookFewShot (methods/matchingnet.py: relu(cos) * 100)",
        "scale": 100.0,
        "learn_scale": False,
        "cosine_relu": True,
    }

    def train_shape(self) -> tuple[int | None, int | None, int | None]:
        return self.train_ways, None, self.train_query

    def __post_init__(self) -> None:
        check_outer_lr(self)
        if self.fce_steps < 1:
            raise ConfigError(f"algo.fce_steps must be at least 1, got {self.fce_steps}")
        if not self.scale > 0:
            raise ConfigError(f"algo.scale must be positive, got {self.scale}")


class Temperature(nn.Module):
    """A learned positive scale for the cosines: exp of a learned log-scale."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self) -> Tensor:
        return self.log_scale.exp()


class SupportContext(nn.Module):
    """g: g(x_i, S) = g'(x_i) + forward h_i + backward h_i of a biLSTM over the support set."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)

    def forward(self, support_z: Tensor) -> Tensor:  # (T, S, D) -> (T, S, D)
        out, _ = self.lstm(support_z)
        forward, backward = out.chunk(2, dim=-1)
        return support_z + forward + backward


class QueryAttention(nn.Module):
    """f: an LSTM that attends over g(S) for K steps (appendix A.2, eq. 3-6).

    h_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1}); h_k += f'(x);
    r_k = sum_i softmax(h_k . g(x_i)) g(x_i).
    """

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(dim, 2 * dim)  # the state holds [h, r], as in the paper
        self.steps = steps
        self.dim = dim

    def forward(self, query_z: Tensor, support_g: Tensor) -> Tensor:  # (T, M, D), (T, S, D)
        tasks, queries, dim = query_z.shape
        x = query_z.reshape(tasks * queries, dim)
        h = torch.zeros(tasks * queries, dim, dtype=x.dtype, device=x.device)
        r = torch.zeros_like(h)
        c = torch.zeros(tasks * queries, 2 * dim, dtype=x.dtype, device=x.device)
        for _ in range(self.steps):
            hr, c = self.cell(x, (torch.cat([h, r], dim=-1), c))
            h = hr[:, :dim] + x
            attention = torch.softmax(
                (h.view(tasks, queries, dim) @ support_g.transpose(1, 2)), dim=-1
            )  # (T, M, S)
            r = (attention @ support_g).reshape(tasks * queries, dim)
        return h.view(tasks, queries, dim)


class MatchingNet(EpisodicLearner):
    """Scores are log P(y | x, S): cross-entropy on them is the paper's negative log-likelihood."""

    def __init__(self, cfg: MatchingNetConfig, model: nn.Module, kind: str, task_batching: str):
        super().__init__(cfg, model, kind, task_batching)
        self.context: dict[str, nn.Module] = {}
        if cfg.fce:
            device = next(model.parameters()).device
            dim = model.embedding_dim
            self.context = {
                "support_lstm": SupportContext(dim).to(device),
                "query_lstm": QueryAttention(dim, cfg.fce_steps).to(device),
            }
        if cfg.learn_scale:
            device = next(model.parameters()).device
            self.context["temperature"] = Temperature(cfg.scale).to(device)

    def extra_modules(self) -> dict[str, nn.Module]:
        return self.context

    def scores(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, ways: int) -> Tensor:
        with torch.autocast(support_z.device.type, enabled=False):
            support_z, query_z = support_z.float(), query_z.float()
            if self.cfg.fce:
                support_z = self.context["support_lstm"](support_z)
                query_z = self.context["query_lstm"](query_z, support_z)
            cosine = F.normalize(query_z, dim=-1) @ F.normalize(support_z, dim=-1).transpose(1, 2)
            if self.cfg.cosine_relu:
                cosine = cosine.relu()
            scale = self.context["temperature"]() if self.cfg.learn_scale else self.cfg.scale
            attention = torch.softmax(scale * cosine, dim=-1)  # (T, M, S)
            onehot = F.one_hot(support_y, ways).to(attention.dtype)  # (T, S, N)
            return (attention @ onehot).clamp_min(LOG_EPS).log()  # (T, M, N)
