"""Prototypical Networks (Snell et al. 2017): classify queries by the nearest class mean."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metalearn.algos.learner import AlgoConfig
from metalearn.algos.metric.episodic import EpisodicLearner, check_outer_lr


@dataclass
class ProtoNetConfig(AlgoConfig):
    """Embedding learner: only the outer optimiser and the training episode shape."""

    name: str = "protonet"
    outer_lr: float = 1e-3  # Adam step size
    train_ways: int | None = None  # ways in meta-training (None: data.ways; the paper uses 60)
    train_query: int | None = None  # query examples per class in meta-training (None: data.query)

    def train_shape(self) -> tuple[int | None, int | None, int | None]:
        return self.train_ways, None, self.train_query

    def __post_init__(self) -> None:
        check_outer_lr(self)


def class_means(support_z: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """support_z (T, N*K, D), support_y (T, N*K) -> prototypes (T, N, D), in any label order."""
    onehot = F.one_hot(support_y, ways).to(support_z.dtype)  # (T, N*K, N)
    return onehot.transpose(1, 2) @ support_z / onehot.sum(1).unsqueeze(-1)


def prototype_logits(support_z: Tensor, support_y: Tensor, query_z: Tensor, ways: int) -> Tensor:
    """Negative squared Euclidean distance of each query to each class mean (paper, eq. 1-2).

    support_z (T, N*K, D), support_y (T, N*K), query_z (T, M, D) -> logits (T, M, N).
    """
    with torch.autocast(support_z.device.type, enabled=False):  # distances in fp32 under bf16
        support_z, query_z = support_z.float(), query_z.float()
        prototypes = class_means(support_z, support_y, ways)  # (T, N, D)
        # |q - p|^2 = |q|^2 - 2 q.p + |p|^2: one batched matmul instead of an (M, N, D) tensor
        cross = query_z @ prototypes.transpose(1, 2)  # (T, M, N)
        query_sq = query_z.square().sum(-1, keepdim=True)  # (T, M, 1)
        return 2 * cross - query_sq - prototypes.square().sum(-1)[:, None]


class ProtoNet(EpisodicLearner):
    """Logits are negative squared distances to the class means of the support embeddings."""

    outer_schedule = "constant"  # the experiments halve it every 2000 episodes (trainer.lr_decay)

    def scores(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, ways: int) -> Tensor:
        return prototype_logits(support_z, support_y, query_z, ways)
