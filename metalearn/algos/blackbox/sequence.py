"""Black-box supervised meta-learners: a sequence model reads a task's labelled support set and
predicts its queries' labels in its forward pass (no gradient step at test time).

- `mann` (Santoro et al. 2016): an LSTM controller reads (x_t, y_{t-1}) over the support set
  (each label arrives one step after its example, so the example must be held in memory to be
  bound to its label) and reads and writes an external memory by least-recently-used access;
  each query is one more step from the support's final state, given the last support label.
  `lstm` is the same without the external memory (their LSTM baseline).
- `snail` (Mishra et al. 2018): temporal-convolution (dense blocks of dilated causal
  convolutions) and causal-attention blocks over the support (x, y) pairs followed by one
  query (x, 0), the query's label read at the last position.
- `icl_transformer` (general-purpose in-context learning, Kirsch et al. 2022): a causal
  transformer over (x, y) tokens of the support set and (x, unknown) tokens of the queries;
  each query attends to the support set and itself only.

Every image is embedded by the shared image network (`model=conv4`, ...) and the labels enter
as one-hot vectors; queries never see each other or their own labels, so accuracies compare
directly with every other learner's on the same fixed episodes. In meta-training the support
set comes in a new random order per task (labels are already random per task), so nothing can
be read off positions; at test it comes in the sampler's order.

`algo.protocol=santoro` (mann and lstm) meta-trains as Santoro et al. (2016) do:
each task is one sequence of `instances` examples of each class in random order, every step
t gets (x_t, y_{t-1}) and every step's prediction of y_t is scored. Evaluation stays the
standard one above, so test accuracies compare with every other learner's.

Shape letters: T tasks, S = N*K support examples, M queries, D embedding, H hidden.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algos.blackbox.cores import CORES
from metalearn.algos.learner import AlgoConfig
from metalearn.algos.metric.episodic import EpisodicLearner, check_outer_lr
from metalearn.data.tasks import TaskBatch
from metalearn.errors import ConfigError

PROTOCOLS = ("episodic", "santoro")
SANTORO_CORES = ("mann", "lstm")  # the cores with a `sequence` method
INSTANCES = (1, 2, 3, 4, 5, 10)  # the presentations of a class Santoro et al.'s Table 1 reports


@dataclass
class SequenceConfig(AlgoConfig):
    """A sequence model over labelled support examples; sizes of its core."""

    name: str = "icl_transformer"  # 'mann', 'lstm', 'snail' or 'icl_transformer'
    # configs/algo/<name>.yaml for the other names this class serves: what they change
    VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {
        "lstm": {"hidden": 256},
        "mann": {"hidden": 200},  # Santoro et al.'s controller
        "snail": {},
    }
    outer_lr: float = 1e-3  # Adam step size
    train_ways: int | None = None  # ways in meta-training (None: data.ways)
    train_query: int | None = None  # query examples per class in meta-training (None: data.query)
    hidden: int = 128  # LSTM units (mann); model width (icl_transformer); TC filters (snail)
    layers: int = 4  # transformer layers (icl_transformer)
    heads: int = 4  # attention heads (icl_transformer)
    key_size: int = 64  # attention key size (snail)
    value_size: int = 32  # attention value size (snail)
    max_ways: int = 0  # label one-hot width (0: the training ways): the most ways it can test
    max_length: int = 26  # snail: sequence length its TC blocks' receptive field spans (5x5+1)
    memory_slots: int = 128  # mann: rows of the external memory
    memory_width: int = 40  # mann: width of a memory row
    read_heads: int = 4  # mann: read (and write) heads
    # meta-training: 'episodic' (support set, then each query scored) or 'santoro' (mann, lstm:
    # Santoro et al.'s sequences of `instances` examples per class, every step scored)
    protocol: str = "episodic"
    instances: int = 10  # santoro: examples of each class in one training sequence
    train_shots: int | None = None  # shots per class in meta-training (None: data.shots)

    def train_shape(self) -> tuple[int | None, int | None, int | None]:
        return self.train_ways, self.train_shots, self.train_query

    def shape_advice(self, problem: str) -> str:
        if self.protocol != "santoro":
            return ""
        return (  # the sampler's shape came from algo.instances, not from data.*
            f"algo.protocol=santoro draws algo.instances={self.instances} examples of each "
            f"class per sequence: {problem}. Lower algo.instances instead."
        )

    def __post_init__(self) -> None:
        check_outer_lr(self)
        names = ("hidden", "layers", "heads", "key_size", "value_size", "max_length")
        for key in (*names, "memory_slots", "memory_width", "read_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"algo.{key} must be positive, got {getattr(self, key)}")
        if self.name == "icl_transformer" and self.hidden % self.heads:
            raise ConfigError(
                f"algo.hidden ({self.hidden}) must be a multiple of algo.heads ({self.heads})"
            )
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"algo.protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if self.instances < 2:
            raise ConfigError(f"algo.instances must be >= 2, got {self.instances}")
        if self.protocol == "santoro":
            self._santoro_shape()

    def _santoro_shape(self) -> None:
        """The sampler's training shape for santoro: shots + query = instances per class (the
        learner joins them into one sequence, so only the sum matters; 1 + (instances - 1))."""
        if self.name not in SANTORO_CORES:
            raise ConfigError(
                f"algo.protocol=santoro scores every step of a recurrent core's sequence and "
                f"applies to algo={' or '.join(SANTORO_CORES)}, not algo={self.name}; use "
                f"algo.protocol=episodic"
            )
        shots, query = self.train_shots, self.train_query
        if shots is None and query is None:  # set here, so results.json shows what was drawn
            self.train_shots, self.train_query = 1, self.instances - 1
        elif shots is None or query is None or shots + query != self.instances:
            raise ConfigError(
                f"algo.protocol=santoro draws algo.instances={self.instances} examples per "
                f"class for each training sequence; leave algo.train_shots and "
                f"algo.train_query null (got {shots} and {query})"
            )


class SequenceLearner(EpisodicLearner):
    """The episodic base (embedding, loss, evaluation) with a sequence model as the scorer."""

    family = "blackbox"
    optimizees = False
    needs_ways = True  # build.py passes the training ways: the width of the label one-hots

    def __init__(
        self, cfg: SequenceConfig, model: nn.Module, kind: str, task_batching: str, *, ways: int
    ):
        super().__init__(cfg, model, kind, task_batching)
        self.ways = max(ways, cfg.max_ways)
        dim = model.embedding_dim + self.ways
        device = next(model.parameters()).device
        self.core = CORES[cfg.name](cfg, dim, self.ways).to(device)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"core": self.core}

    def _check_ways(self, ways: int) -> None:
        if ways > self.ways:
            raise ConfigError(
                f"algo={self.cfg.name} was built for {self.ways}-way tasks and got {ways}-way "
                f"ones; its label inputs and outputs have a fixed width (algo.max_ways)"
            )

    def scores(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, ways: int) -> Tensor:
        self._check_ways(ways)
        if self.model.training:  # a new support order per task (T, S)
            order = torch.rand(support_y.shape, device=support_y.device).argsort(1)
            support_z = support_z.gather(1, order[..., None].expand_as(support_z))
            support_y = support_y.gather(1, order)
        labels = F.one_hot(support_y, self.ways).to(support_z.dtype)  # (T, S, max N)
        return self.core(support_z, labels, query_z)[..., :ways]  # (T, M, N): no unused class

    def meta_loss(self, batch: TaskBatch, iteration: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        if self.cfg.protocol == "episodic":
            return super().meta_loss(batch, iteration)
        logits, y = self.sequence_logits(batch)  # (T, L, N), (T, L)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())  # every step scored
        correct = logits.argmax(-1) == y
        metrics = {"loss": loss, "score": correct.float().mean()}  # over all steps
        return loss, metrics | instance_accuracies(correct, y, batch.ways, self.cfg.instances)

    def sequence_logits(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Santoro et al.'s training sequences: each task's support and query examples together
        (`instances` per class, L = N * instances) in a new random order; logits at every step
        (T, L, N) and the labels (T, L)."""
        self._check_ways(batch.ways)
        support_z, query_z = self._embed(batch.support.x, batch.query.x)
        z = torch.cat([support_z, query_z], 1)  # (T, L, D)
        y = torch.cat([batch.support.y, batch.query.y], 1)  # (T, L)
        order = torch.rand(y.shape, device=y.device).argsort(1)
        z, y = z.gather(1, order[..., None].expand_as(z)), y.gather(1, order)
        labels = F.one_hot(y, self.ways).to(z.dtype)  # (T, L, max N)
        return self.core.sequence(z, labels)[..., : batch.ways], y


def instance_accuracies(correct: Tensor, y: Tensor, ways: int, instances: int) -> dict[str, Tensor]:
    """Santoro et al.'s Table 1: accuracy at the k-th presentation of each class in a sequence,
    for k in INSTANCES up to `instances`, from (T, L) correctness and labels."""
    seen = F.one_hot(y, ways).cumsum(1).gather(2, y[..., None])[..., 0]  # (T, L): 1, 2, ...
    return {
        f"instance_acc_{k}": correct[seen == k].float().mean() for k in INSTANCES if k <= instances
    }
