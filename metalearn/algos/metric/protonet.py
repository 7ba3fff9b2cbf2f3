"""Prototypical Networks (Snell et al. 2017): classify queries by the nearest class mean."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algos.objectives import score
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError


@dataclass
class ProtoNetConfig:
    """Embedding learner: only the outer optimiser and the training episode shape."""

    name: str = "protonet"
    outer_lr: float = 1e-3  # Adam step size
    train_ways: int | None = None  # ways in meta-training (None: data.ways; the paper uses 60)
    train_query: int | None = None  # query examples per class in meta-training (None: data.query)

    def __post_init__(self) -> None:
        if not self.outer_lr > 0:
            raise ConfigError(
                f"algo.outer_lr must be a positive learning rate, got {self.outer_lr}"
            )


def prototype_logits(support_z: Tensor, support_y: Tensor, query_z: Tensor, ways: int) -> Tensor:
    """Negative squared Euclidean distance of each query to each class mean (paper, eq. 1-2).

    support_z (T, N*K, D), support_y (T, N*K), query_z (T, M, D) -> logits (T, M, N).
    """
    with torch.autocast(support_z.device.type, enabled=False):  # distances in fp32 under bf16
        support_z, query_z = support_z.float(), query_z.float()
        onehot = F.one_hot(support_y, ways).float()  # (T, N*K, N)
        prototypes = onehot.transpose(1, 2) @ support_z / onehot.sum(1).unsqueeze(-1)  # (T, N, D)
        # |q - p|^2 = |q|^2 - 2 q.p + |p|^2: one batched matmul instead of an (M, N, D) tensor
        cross = query_z @ prototypes.transpose(1, 2)  # (T, M, N)
        query_sq = query_z.square().sum(-1, keepdim=True)  # (T, M, 1)
        return 2 * cross - query_sq - prototypes.square().sum(-1)[:, None]


class ProtoNet:
    """The forward pass over the support set is the inner loop; nothing is adapted per task."""

    needs_head = False  # the model is the embedding
    differentiates_inner_loop = False  # no gradient through gradients: fused BatchNorm is safe
    outer_schedule = "constant"  # the experiments halve it every 2000 episodes (trainer.lr_decay)

    def __init__(
        self, cfg: ProtoNetConfig, model: nn.Module, kind: str, task_batching: str
    ) -> None:
        if kind != "classification":
            raise ConfigError("algo=protonet classifies; pick a classification data set (omniglot)")
        self.cfg = cfg
        self.model = model
        self.kind = kind

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def _embed(self, support_x: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
        """Embed each task's support and query together: BatchNorm sees one task's batch."""
        shots = support_x.shape[1]
        x = torch.cat([support_x, query_x], dim=1)  # (T, N*K + M, ...)
        # A loop, not vmap: a meta-batch is usually one large episode, and a plain batch keeps
        # the channels-last layout that makes CPU convolutions fast.
        z = torch.stack([self.model(task) for task in x])  # (T, N*K + M, D)
        return z[:, :shots], z[:, shots:]

    def logits(self, batch: TaskBatch) -> Tensor:
        support_z, query_z = self._embed(batch.support.x, batch.query.x)
        return prototype_logits(support_z, batch.support.y, query_z, batch.ways)

    def meta_loss(self, batch: TaskBatch, iteration: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.logits(batch)  # (T, M, N)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query.y.flatten())
        accuracy = (logits.argmax(-1) == batch.query.y).float().mean()
        return loss, {"loss": loss, "score": accuracy}

    def evaluate(self, batch: TaskBatch, steps: list[int]) -> dict[str, Tensor]:
        """Per-task query loss and accuracy, (T, 1); `steps` does not apply (no inner loop)."""
        with torch.no_grad():
            logits = self.logits(batch).float()
        losses = torch.stack(
            [F.cross_entropy(lg, y) for lg, y in zip(logits, batch.query.y, strict=True)]
        )
        scores = torch.stack(
            [score(self.kind, lg, y) for lg, y in zip(logits, batch.query.y, strict=True)]
        )
        return {"loss": losses[:, None], "score": scores[:, None]}

    def predict(self, support: Split, query_x: Tensor, steps: int | None = None) -> Tensor:
        """Logits for one task's query inputs; `steps` does not apply (no inner loop)."""
        with torch.no_grad():
            support_z, query_z = self._embed(support.x[None], query_x[None])
            ways = int(support.y.max()) + 1
            return prototype_logits(support_z, support.y[None], query_z, ways)[0]

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
