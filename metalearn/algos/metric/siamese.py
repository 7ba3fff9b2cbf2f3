"""Siamese networks (Koch, Zemel & Salakhutdinov 2015): same-or-different verification of pairs,
then one-shot classification by the most similar support image.

A twin network (the shared embedding, `model`) maps both images of a pair to h1, h2; the pair's
probability of showing the same class is p = sigmoid(sum_j alpha_j |h1_j - h2_j| + b), with the
weights alpha and bias b learned (paper, section 3.1). Training minimises binary cross-entropy
on same/different pairs (section 3.2) under random affine distortions of the training images
(section 3.3: rotation in [-10, 10] degrees, shear in [-0.3, 0.3], scale in [0.8, 1.2],
translation of 2 of 105 pixels, each component kept with probability 0.5; translations are
scaled with the image: about half a pixel at 28x28). One-shot classification assigns a query
the class of the most similar support image (section 4.1).

What differs from the paper, and why:
- The twin is the model: conv4 at 28x28 by default (the other learners' embedding, BatchNorm
  with per-task statistics), not Koch's 38M-parameter network of four large convolutions and a
  4096-unit sigmoid layer on 105x105 images, which is out of reach of a CPU run; its features
  go straight into the weighted L1 distance.
- Pairs come from the training episodes (`train_ways`-way, one support image per class and
  `train_query` queries per class): every query against every support image, same class -> 1,
  else 0. An N-way episode holds one same pair per N - 1 different ones; with `balance` the
  two kinds weigh equally (each the mean over its pairs), as in the paper's balanced pairs and
  in fangpin/siamese-pytorch (mydataset.py: same and different pairs alternate). Different
  pairs come from the classes of one episode, drawn from all training classes.
- Adam at a constant rate replaces Koch's SGD with momentum, per-layer learning rates and
  L2 penalties, decayed by 1% an epoch.

With K > 1 shots a class's similarity is its best support image's (the max over its shots),
so the prediction is always the class of the most similar support image, as in the paper. The
scores (logits) are the log-odds log p / (1 - p) of that best pair: their softmax over the N
classes is the posterior that class c is the match when exactly one class matches and the N
verifications are independent (p_c prod_{j != c} (1 - p_j), normalised, is odds_c / sum odds),
so calibration reads the verifier's own confidence. The loss that `evaluate` reports is the
training objective: the (balanced) pair cross-entropy of the episode's query-support pairs.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algos.learner import AlgoConfig
from metalearn.algos.metric.episodic import EpisodicLearner, check_outer_lr
from metalearn.algos.objectives import score
from metalearn.data.augment import random_affine
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError, DataError

# Koch et al. 2015, section 3.3; the translation is 2 pixels of Omniglot's 105, as a fraction
DISTORTIONS = {"rotation": 10.0, "shear": 0.3, "scale": 0.2, "translate": 2 / 105, "p": 0.5}


@dataclass
class SiameseConfig(AlgoConfig):
    """The pair objective's weighting, the distortions and the training episodes' shape."""

    name: str = "siamese"
    outer_lr: float = 1e-3  # Adam step size (the paper: SGD with momentum, per-layer rates)
    balance: bool = True  # same and different pairs weigh equally (false: every pair once)
    distortions: bool = True  # Koch's random affine distortions of every training image
    train_ways: int | None = None  # ways of the training episodes pairs come from (None: data's)
    train_query: int | None = None  # queries per class in them (None: data.query)

    def train_shape(self) -> tuple[int | None, int | None, int | None]:
        return self.train_ways, None, self.train_query

    def __post_init__(self) -> None:
        check_outer_lr(self)


def pair_logits(distance: nn.Linear, support_z: Tensor, query_z: Tensor) -> Tensor:
    """The log-odds that each query and support image show the same class (paper, eq. 1 before
    its sigmoid): alpha . |h_q - h_s| + b. support_z (T, S, D), query_z (T, M, D) -> (T, M, S)."""
    if support_z.shape[-1] != query_z.shape[-1] or support_z.shape[-1] != distance.in_features:
        raise ValueError(
            f"support embeddings of size {support_z.shape[-1]} and query embeddings of size "
            f"{query_z.shape[-1]} do not match the distance's {distance.in_features} weights"
        )
    dtype = torch.promote_types(support_z.dtype, torch.float32)  # fp32 under bf16, fp64 kept
    with torch.autocast(support_z.device.type, enabled=False):
        support_z, query_z = support_z.to(dtype), query_z.to(dtype)
        gaps = (query_z[:, :, None] - support_z[:, None]).abs()  # (T, M, S, D)
        return gaps @ distance.weight[0].to(dtype) + distance.bias[0].to(dtype)


def class_log_odds(pairs: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """Each class's best support image: pairs (T, M, S), support_y (T, S) -> (T, M, N), the
    max of the log-odds over the class's shots."""
    member = F.one_hot(support_y, ways).bool()  # (T, S, N)
    masked = pairs[..., None].masked_fill(~member[:, None], -torch.inf)  # (T, M, S, N)
    return masked.amax(dim=2)


def pair_loss(pairs: Tensor, same: Tensor, balance: bool) -> Tensor:
    """Binary cross-entropy of each task's pairs (T, M, S) against `same` (T, M, S) -> (T,);
    with `balance` the mean over same pairs and the mean over different pairs count half each."""
    target = same.to(pairs.dtype)
    losses = F.binary_cross_entropy_with_logits(pairs, target, reduction="none").flatten(1)
    if not balance:
        return losses.mean(1)
    target = target.flatten(1)
    positive = (losses * target).sum(1) / target.sum(1)
    negative = (losses * (1 - target)).sum(1) / (1 - target).sum(1)
    return (positive + negative) / 2


class Siamese(EpisodicLearner):
    """Scores are each class's best pair log-odds; the loss is the pair cross-entropy."""

    def __init__(self, cfg: SiameseConfig, model: nn.Module, kind: str, task_batching: str):
        super().__init__(cfg, model, kind, task_batching)
        if not hasattr(model, "embedding_dim"):
            raise ConfigError(
                f"algo=siamese weighs the gaps between embedding vectors, which "
                f"model={type(model).__name__} does not give; use model=conv4 or model=resnet12"
            )
        device = next(model.parameters()).device
        self.distance = nn.Linear(model.embedding_dim, 1).to(device)  # alpha (D,) and b

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"distance": self.distance}

    def scores(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, ways: int) -> Tensor:
        return class_log_odds(pair_logits(self.distance, support_z, query_z), support_y, ways)

    def _pairs(self, batch: TaskBatch, distort: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(pair log-odds (T, M, S), same-class mask (T, M, S), class scores (T, M, N))."""
        support_x, query_x = batch.support.x, batch.query.x
        if distort:  # each image its own distortion, so a pair's two images differ (3.3)
            support_x = random_affine(support_x.flatten(0, 1), **DISTORTIONS).view_as(support_x)
            query_x = random_affine(query_x.flatten(0, 1), **DISTORTIONS).view_as(query_x)
        support_z, query_z = self._embed(support_x, query_x)
        pairs = pair_logits(self.distance, support_z, query_z)
        same = batch.query.y[:, :, None] == batch.support.y[:, None, :]
        return pairs, same, class_log_odds(pairs, batch.support.y, batch.ways)

    def meta_loss(self, batch: TaskBatch, iteration: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        pairs, same, logits = self._pairs(batch, self.cfg.distortions)
        loss = pair_loss(pairs, same, self.cfg.balance).mean()  # equal pairs per task
        accuracy = (logits.argmax(-1) == batch.query.y).float().mean()
        return loss, {"loss": loss, "score": accuracy}

    def evaluate(self, batch: TaskBatch, steps: list[int]) -> dict[str, Tensor]:
        """Per-task pair loss and one-shot accuracy, (T, 1), and the class log-odds as logits
        (T, 1, Q, N); `steps` does not apply (no inner loop)."""
        with torch.no_grad():
            pairs, same, logits = self._pairs(batch, distort=False)
            losses = pair_loss(pairs.float(), same, self.cfg.balance)
        logits = logits.float()
        pairs_ = zip(logits, batch.query.y, strict=True)
        scores = torch.stack([score(self.kind, lg, y) for lg, y in pairs_])
        return {"loss": losses[:, None], "score": scores[:, None], "logits": logits[:, None]}

    def predict(self, support: Split, query_x: Tensor, steps: int | None = None) -> Tensor:
        """Class log-odds (M, N) for one task's queries; each class 0..N-1 needs a support image."""
        ways = int(support.y.max()) + 1
        missing = sorted(set(range(ways)) - set(support.y.tolist()))
        if missing:
            raise DataError(
                f"classes {missing} have no support image, so nothing to compare queries with; "
                f"label the support set's classes 0..N-1"
            )
        return super().predict(support, query_x, steps)
