"""The shared body of episodic embedding learners: embed each task, score queries, one loss.

ProtoNet, Matching Networks, Relation Networks and MetaOptNet differ only in how a task's
support embeddings turn into scores for its queries (`scores`), in the loss on those scores,
and in any modules of their own next to the embedding network (`extra_modules`).
"""

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algos.learner import Learner
from metalearn.algos.objectives import score
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError


def check_outer_lr(cfg: Any) -> None:
    if not 0 < cfg.outer_lr < math.inf:
        raise ConfigError(
            f"algo.outer_lr must be a positive, finite learning rate, got {cfg.outer_lr}"
        )


class EpisodicLearner(Learner):
    """The forward pass over the support set is the inner loop; nothing is adapted per task.

    Subclasses define `scores(support_z, support_y, query_z, ways) -> (T, M, N)`, higher for
    the more likely class; by default these are logits for cross-entropy.
    """

    family = "metric"
    optimizees = False
    pretrains = False
    needs_train_classes = False
    needs_ways = False
    needs_head = False  # the model is the embedding
    reinforcement = False
    batches_tasks = False
    differentiates_inner_loop = False  # no gradient through gradients: fused BatchNorm is safe
    inner_loop = False
    first_order_switch = False
    checkpoint_switch = False
    outer_schedule = "constant"
    compiled = "meta_loss"
    name = "episodic"

    def __init__(self, cfg: Any, model: nn.Module, kind: str, task_batching: str) -> None:
        if kind != "classification":
            raise ConfigError(
                f"algo={cfg.name} classifies; pick a classification data set (omniglot)"
            )
        self.cfg = cfg
        self.model = model
        self.kind = kind

    def extra_modules(self) -> dict[str, nn.Module]:
        """Meta-learned modules besides the embedding network (Relation Networks' relation
        module, Matching Networks' context LSTMs), saved and restored with it."""
        return {}

    def parameters(self) -> list[nn.Parameter]:
        params = list(self.model.parameters())
        for module in self.extra_modules().values():
            params += list(module.parameters())
        return params

    def embed(self, x: Tensor) -> Tensor:
        """One task's inputs (B, ...) -> embeddings (B, D) (Relation Networks: feature maps)."""
        return self.model(x)

    def _embed(self, support_x: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
        """Embed each task's support and query together: BatchNorm sees one task's batch."""
        shots = support_x.shape[1]
        x = torch.cat([support_x, query_x], dim=1)  # (T, N*K + M, ...)
        # A loop, not vmap: a meta-batch is usually one large episode, and a plain batch keeps
        # the channels-last layout that makes CPU convolutions fast.
        z = torch.stack([self.embed(task) for task in x])  # (T, N*K + M, ...)
        return z[:, :shots], z[:, shots:]

    def scores(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, ways: int) -> Tensor:
        raise NotImplementedError

    def task_loss(self, scores: Tensor, y: Tensor) -> Tensor:
        """(M, N) scores against (M,) labels: cross-entropy unless the paper says otherwise."""
        return F.cross_entropy(scores, y)

    def logits(self, batch: TaskBatch) -> Tensor:
        support_z, query_z = self._embed(batch.support.x, batch.query.x)
        return self.scores(support_z, batch.support.y, query_z, batch.ways)

    def meta_loss(self, batch: TaskBatch, iteration: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.logits(batch)  # (T, M, N)
        loss = self.task_loss(logits.flatten(0, 1), batch.query.y.flatten())
        accuracy = (logits.argmax(-1) == batch.query.y).float().mean()
        return loss, {"loss": loss, "score": accuracy}

    def evaluate(self, batch: TaskBatch, steps: list[int]) -> dict[str, Tensor]:
        """Per-task query loss and accuracy, (T, 1), and the query logits (T, 1, Q, C); `steps`
        does not apply (no inner loop)."""
        with torch.no_grad():
            logits = self.logits(batch).float()
        pairs = list(zip(logits, batch.query.y, strict=True))
        losses = torch.stack([self.task_loss(lg, y) for lg, y in pairs])
        scores = torch.stack([score(self.kind, lg, y) for lg, y in pairs])
        return {"loss": losses[:, None], "score": scores[:, None], "logits": logits[:, None]}

    def predict(self, support: Split, query_x: Tensor, steps: int | None = None) -> Tensor:
        """Scores for one task's query inputs; `steps` does not apply (no inner loop)."""
        with torch.no_grad():
            support_z, query_z = self._embed(support.x[None], query_x[None])
            ways = int(support.y.max()) + 1
            return self.scores(support_z, support.y[None], query_z, ways)[0]

    def state_dict(self) -> dict:
        extra = {name: m.state_dict() for name, m in self.extra_modules().items()}
        return {"model": self.model.state_dict(), **extra}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for name, module in self.extra_modules().items():
            module.load_state_dict(state[name])
