"""Pre-training baselines: Baseline and Baseline++ (Chen et al. 2019) and RFS (Tian et al. 2020).

No meta-learning: the embedding is trained by ordinary classification over every meta-train
class (a linear head, or for Baseline++ a cosine-similarity head), with optional augmentation
and, for RFS-distill, self-distillation from an earlier model (Born-again, Furlanello et al.
2018). At test time a new classifier is fitted on each task's support embeddings, with the
embedding frozen:

- `baseline`, `baselinepp` (Chen et al., section 3.1-3.2): a new linear (or cosine) layer
  trained by SGD (learning rate 0.01, momentum 0.9, dampening 0.9, weight decay 0.001) for 100
  epochs of mini-batches of 4 support examples; all tasks of a batch at once, each with its own
  layer;
- `rfs` (Tian et al., section 3): multinomial logistic regression on L2-normalised embeddings
  with scikit-learn's defaults (L2 penalty, C = 1, unpenalised intercept), solved to convergence
  by accelerated gradient descent (the problem is strongly convex).
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algos.learner import AlgoConfig, Learner, OuterOptimizer
from metalearn.algos.metric.episodic import check_outer_lr
from metalearn.algos.objectives import score
from metalearn.data.augment import augment
from metalearn.data.tasks import LabelledBatch, Split, TaskBatch
from metalearn.errors import ConfigError

TEST_HEADS = ("sgd", "logistic")
CLASSIFIERS = ("linear", "cosine")


@dataclass
class BaselineConfig(AlgoConfig):
    """Pre-training (classifier, optimiser, augmentation, distillation) and the test-time head."""

    name: str = "baseline"
    # configs/algo/<name>.yaml for the other names this class serves: what they change
    VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {
        "baselinepp": {"classifier": "cosine"},
        "rfs": {  # Tian et al. 2020's recipe
            "batch_size": 64,
            "outer_lr": 0.05,
            "outer_optimizer": "sgd",
            "weight_decay": 5e-4,
            "test_head": "logistic",
        },
    }
    classifier: str = "linear"  # 'linear' (Baseline, RFS) or 'cosine' (Baseline++)
    cosine_scale: float | None = None  # Baseline++'s scale (None: 2 up to 200 classes, else 10)
    batch_size: int = 16  # examples per pre-training step (Chen et al.: 16; RFS: 64)
    outer_lr: float = 1e-3  # learning rate of pre-training
    outer_optimizer: str = "adam"  # 'adam' (Chen et al.) or 'sgd' (RFS: momentum 0.9)
    momentum: float = 0.9  # SGD momentum (outer_optimizer=sgd)
    weight_decay: float = 0.0  # pre-training weight decay (RFS: 5e-4)
    augment: bool = False  # random crop (padding), flip and colour jitter in pre-training
    crop_padding: int = 8  # random-crop padding in pixels (RFS: 8 at 84x84)
    flip: bool = True  # horizontal flips (with augment)
    jitter: float = 0.4  # colour-jitter strength (with augment; RFS: 0.4)
    test_head: str = "sgd"  # 'sgd' (Chen et al.) or 'logistic' (RFS)
    test_epochs: int = 100  # 'sgd': epochs over the support set
    test_batch_size: int = 4  # 'sgd': support examples per step
    test_lr: float = 0.01  # 'sgd': learning rate
    logistic_c: float = 1.0  # 'logistic': inverse L2 strength, scikit-learn's C
    logistic_iterations: int = 300  # 'logistic': accelerated gradient iterations
    distill_from: str | None = None  # RFS-distill: the teacher's checkpoint (an earlier run)
    distill_weight: float = 0.5  # weight of the distillation term; 1 - this weights CE
    distill_temperature: float = 4.0  # softmax temperature of distillation (Hinton et al.)

    def outer_optimizer_settings(self) -> OuterOptimizer:
        return OuterOptimizer(self.outer_optimizer, self.momentum, self.weight_decay)

    def __post_init__(self) -> None:
        check_outer_lr(self)
        if self.classifier not in CLASSIFIERS:
            raise ConfigError(
                f"algo.classifier must be one of {', '.join(CLASSIFIERS)}, got {self.classifier!r}"
            )
        if self.test_head not in TEST_HEADS:
            raise ConfigError(
                f"algo.test_head must be one of {', '.join(TEST_HEADS)}, got {self.test_head!r}"
            )
        if self.outer_optimizer not in ("adam", "sgd"):
            raise ConfigError(
                f"algo.outer_optimizer must be 'adam' or 'sgd', got {self.outer_optimizer!r}"
            )
        for key in ("batch_size", "test_epochs", "test_batch_size", "logistic_iterations"):
            if getattr(self, key) < 1:
                raise ConfigError(f"algo.{key} must be positive, got {getattr(self, key)}")
        for key in ("test_lr", "logistic_c", "distill_temperature"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"algo.{key} must be positive, got {getattr(self, key)}")
        if not 0 <= self.distill_weight <= 1:
            raise ConfigError(f"algo.distill_weight must be in [0, 1], got {self.distill_weight}")


class CosineClassifier(nn.Module):
    """Baseline++'s head: logits = scale * cos(w_c, z) (Chen et al., section 3.2)."""

    def __init__(self, dim: int, classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) * dim**-0.5)
        self.scale = scale

    def forward(self, z: Tensor) -> Tensor:
        return self.scale * F.normalize(z, dim=-1) @ F.normalize(self.weight, dim=-1).T


def fit_sgd_head(
    support_z: Tensor, support_y: Tensor, ways: int, cfg: BaselineConfig, scale: float | None
) -> tuple[Tensor, Tensor]:
    """Chen et al.'s test-time head for T tasks at once: weights (T, D, N) and biases (T, N).

    scale None: a linear layer; else a cosine layer of that scale (no bias). The initial head
    and the mini-batches come from a fixed generator and are the same for every task, so a
    task's head does not depend on the tasks evaluated beside it (eval.batch_size).
    """
    tasks, size, dim = support_z.shape
    generator = torch.Generator(device="cpu").manual_seed(0)
    bound = dim**-0.5  # nn.Linear's initialisation: U(-1/sqrt(D), 1/sqrt(D))

    def uniform(*shape: int) -> Tensor:
        u = torch.rand(*shape, generator=generator).to(support_z.device)
        return bound * (2 * u - 1)

    weight = uniform(dim, ways).expand(tasks, dim, ways).clone()
    bias = uniform(ways).expand(tasks, ways).clone()
    velocity = [torch.zeros_like(weight), torch.zeros_like(bias)]
    dampening, momentum, decay = 0.9, 0.9, 1e-3
    first = True
    with torch.enable_grad():
        for _ in range(cfg.test_epochs):
            order = torch.randperm(size, generator=generator).to(support_z.device)
            for start in range(0, size, cfg.test_batch_size):
                rows = order[start : start + cfg.test_batch_size]
                weight.requires_grad_(True)
                bias.requires_grad_(True)
                logits = head_logits(support_z[:, rows], weight, bias, scale)
                loss = F.cross_entropy(logits.flatten(0, 1), support_y[:, rows].flatten())
                # per-task mean gradients; a cosine layer has no bias (its gradient is zero)
                grads = torch.autograd.grad(loss * tasks, [weight, bias], allow_unused=True)
                grads = [torch.zeros_like(bias) if g is None else g for g in grads]
                with torch.no_grad():
                    for i, (param, grad) in enumerate(zip((weight, bias), grads, strict=True)):
                        grad = grad + decay * param
                        velocity[i] = (
                            grad if first else momentum * velocity[i] + (1 - dampening) * grad
                        )
                    weight = (weight - cfg.test_lr * velocity[0]).detach()
                    bias = (bias - cfg.test_lr * velocity[1]).detach()
                first = False
    return weight, bias


def head_logits(z: Tensor, weight: Tensor, bias: Tensor, scale: float | None) -> Tensor:
    """z (T, M, D), weight (T, D, N), bias (T, N) -> logits (T, M, N)."""
    if scale is None:
        return z @ weight + bias[:, None]
    return scale * F.normalize(z, dim=-1) @ F.normalize(weight, dim=1)


def fit_logistic(support_z: Tensor, support_y: Tensor, ways: int, c: float, iterations: int):
    """Multinomial logistic regression, minimising sum_i CE_i + ||W||^2 / (2C) with a free
    intercept (scikit-learn's objective), for T tasks at once by FISTA. -> (T, D, N), (T, N)."""
    tasks, size, dim = support_z.shape
    x = torch.cat([support_z, torch.ones_like(support_z[..., :1])], dim=-1)  # (T, S, D+1)
    targets = F.one_hot(support_y, ways).to(x.dtype)
    penalty = torch.ones(dim + 1, 1, dtype=x.dtype, device=x.device)
    penalty[-1] = 0  # the intercept is not penalised
    # smoothness: the softmax cross-entropy's Hessian is at most 1/2 x x^T per example
    lipschitz = 0.5 * torch.linalg.matrix_norm(x, ord=2) ** 2 + 1 / c  # (T,)
    step = (1 / lipschitz)[:, None, None]
    params = torch.zeros(tasks, dim + 1, ways, dtype=x.dtype, device=x.device)
    point, t = params, 1.0
    for _ in range(iterations):
        gradient = x.transpose(1, 2) @ (torch.softmax(x @ point, -1) - targets) + (
            penalty * point / c
        )
        following = point - step * gradient
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        point = following + ((t - 1) / t_next) * (following - params)
        params, t = following, t_next
    return params[:, :-1], params[:, -1]


class Baseline(Learner):
    """Supervised pre-training over all meta-train classes; a new head per task at test."""

    family = "pretraining"
    optimizees = False
    pretrains = True  # the trainer feeds LabelledBatch, not episodes
    needs_train_classes = True  # build passes train_classes
    needs_ways = False
    needs_head = False  # the classifier over the meta-train classes is this algorithm's own
    reinforcement = False
    batches_tasks = False
    differentiates_inner_loop = False
    inner_loop = False
    first_order_switch = False
    checkpoint_switch = False
    outer_schedule = "constant"
    compiled = "meta_loss"

    def __init__(
        self,
        cfg: BaselineConfig,
        model: nn.Module,
        kind: str,
        task_batching: str,
        *,
        train_classes: int,
        teacher: nn.Module | None = None,
    ) -> None:
        if kind != "classification":
            raise ConfigError(
                f"algo={cfg.name} classifies; pick a classification data set (omniglot)"
            )
        self.cfg, self.model, self.kind, self.teacher = cfg, model, kind, teacher
        device = next(model.parameters()).device
        dim = model.embedding_dim
        if cfg.classifier == "cosine":
            self.scale = cfg.cosine_scale or (2.0 if train_classes <= 200 else 10.0)
            self.classifier: nn.Module = CosineClassifier(dim, train_classes, self.scale)
        else:
            self.scale = None
            self.classifier = nn.Linear(dim, train_classes)
        self.classifier.to(device)

    def parameters(self) -> list[nn.Parameter]:
        return [*self.model.parameters(), *self.classifier.parameters()]

    def meta_loss(
        self, batch: LabelledBatch, iteration: int = 0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy over the meta-train classes (plus distillation for RFS-distill)."""
        x = batch.x
        if self.cfg.augment:
            x = augment(
                x, padding=self.cfg.crop_padding, flip=self.cfg.flip, jitter=self.cfg.jitter
            )
        logits = self.classifier(self.model(x))
        loss = F.cross_entropy(logits, batch.y)
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher(x)
            temperature, weight = self.cfg.distill_temperature, self.cfg.distill_weight
            distill = F.kl_div(
                F.log_softmax(logits / temperature, -1),
                F.log_softmax(target / temperature, -1),
                log_target=True,
                reduction="batchmean",
            ) * (temperature**2)
            loss = (1 - weight) * loss + weight * distill
        accuracy = (logits.argmax(-1) == batch.y).float().mean()
        return loss, {"loss": loss, "score": accuracy}

    def _task_logits(self, support: Split, query_x: Tensor, ways: int) -> Tensor:
        """Fit the test-time head on the frozen support embeddings: (T, M, N) logits."""
        with torch.no_grad():
            z = [self.model(torch.cat([s, q])) for s, q in zip(support.x, query_x, strict=True)]
            z = torch.stack(z).float()  # (T, S + M, D)
        shots = support.x.shape[1]
        support_z, query_z = z[:, :shots], z[:, shots:]
        if self.cfg.test_head == "logistic":
            support_z, query_z = F.normalize(support_z, dim=-1), F.normalize(query_z, dim=-1)
            weight, bias = fit_logistic(
                support_z, support.y, ways, self.cfg.logistic_c, self.cfg.logistic_iterations
            )
            return head_logits(query_z, weight, bias, None)
        weight, bias = fit_sgd_head(support_z, support.y, ways, self.cfg, self.scale)
        return head_logits(query_z, weight, bias, self.scale)

    def evaluate(self, batch: TaskBatch, steps: list[int]) -> dict[str, Tensor]:
        """Per-task query loss and accuracy, (T, 1), and the query logits (T, 1, Q, C), of the
        head fitted to each support set."""
        logits = self._task_logits(batch.support, batch.query.x, batch.ways)
        pairs = list(zip(logits, batch.query.y, strict=True))
        losses = torch.stack([F.cross_entropy(lg, y) for lg, y in pairs])
        scores = torch.stack([score(self.kind, lg, y) for lg, y in pairs])
        return {"loss": losses[:, None], "score": scores[:, None], "logits": logits[:, None]}

    def predict(self, support: Split, query_x: Tensor, steps: int | None = None) -> Tensor:
        ways = int(support.y.max()) + 1
        support = Split(support.x[None], support.y[None])
        return self._task_logits(support, query_x[None], ways)[0]

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "classifier": self.classifier.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.classifier.load_state_dict(state["classifier"])
