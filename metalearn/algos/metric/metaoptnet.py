"""MetaOptNet (Lee et al. 2019): a linear classifier solved per task on the support embeddings.

The head is the solution of a convex problem, so it is a differentiable function of the
embeddings and the embedding network is meta-learned through it:

- `metaoptnet_ridge` (R2D2, Bertinetto et al. 2019): ridge regression onto one-hot targets in
  closed form, in the dual because a task has fewer examples than dimensions:
  W = S^T (S S^T + lambda I)^-1 Y.
- `metaoptnet_svm`: the Crammer-Singer multi-class SVM (Lee et al., eq. 8-10), solved in the dual
  for all tasks at once by accelerated projected gradient (FISTA). Writing the dual variables as
  alpha_i = C y_i - gamma_i, every constraint becomes gamma_i in the simplex scaled by C, whose
  projection is exact and differentiable almost everywhere; gradients flow through the fixed
  number of iterations.

Logits are multiplied by a learned scale (the papers' temperature; R2D2's bias is left out: a
constant added to every logit changes no softmax).
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algos.learner import AlgoConfig, OuterOptimizer
from metalearn.algos.metric.episodic import EpisodicLearner, check_outer_lr
from metalearn.errors import ConfigError

HEADS = ("ridge", "svm")


@dataclass
class MetaOptNetConfig(AlgoConfig):
    """The base learner (ridge or SVM) and its regularisation."""

    name: str = "metaoptnet_svm"
    # configs/algo/<name>.yaml for the other names this class serves: what they change
    VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {"metaoptnet_ridge": {"head": "ridge"}}
    outer_lr: float = 1e-3  # outer step size (the paper: SGD 0.1 with momentum, decayed)
    outer_optimizer: str = "adam"  # 'adam' or 'sgd' (the paper's, with momentum and decay)
    momentum: float = 0.9  # SGD momentum (outer_optimizer=sgd)
    weight_decay: float = 0.0  # outer weight decay (the paper: 5e-4)
    head: str = "svm"  # 'ridge' (R2D2) or 'svm' (Crammer-Singer)
    ridge_lambda: float = 50.0  # ridge regularisation lambda (MetaOptNet's R2D2 setting)
    svm_c: float = 0.1  # SVM slack penalty C (the paper: 0.1)
    svm_iterations: int = 30  # FISTA iterations of the dual QP, in training and at test
    scale: float = 1.0  # initial value of the learned logit scale
    train_ways: int | None = None  # ways in meta-training (None: data.ways)
    train_shots: int | None = None  # shots in meta-training (None: data.shots; the paper: 15)
    train_query: int | None = None  # query examples per class in meta-training (None: data.query)

    def train_shape(self) -> tuple[int | None, int | None, int | None]:
        return self.train_ways, self.train_shots, self.train_query

    def outer_optimizer_settings(self) -> OuterOptimizer:
        return OuterOptimizer(self.outer_optimizer, self.momentum, self.weight_decay)

    def __post_init__(self) -> None:
        check_outer_lr(self)
        if self.outer_optimizer not in ("adam", "sgd"):
            raise ConfigError(
                f"algo.outer_optimizer must be 'adam' or 'sgd', got {self.outer_optimizer!r}"
            )
        if self.head not in HEADS:
            raise ConfigError(f"algo.head must be one of {', '.join(HEADS)}, got {self.head!r}")
        for key in ("ridge_lambda", "svm_c", "scale"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"algo.{key} must be positive, got {getattr(self, key)}")
        if self.svm_iterations < 1:
            raise ConfigError(f"algo.svm_iterations must be positive, got {self.svm_iterations}")


def ridge_weights(support_z: Tensor, targets: Tensor, lam: float) -> Tensor:
    """W = S^T (S S^T + lambda I)^-1 Y: support_z (T, S, D), targets (T, S, N) -> (T, D, N)."""
    gram = support_z @ support_z.transpose(1, 2)  # (T, S, S)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return support_z.transpose(1, 2) @ torch.linalg.solve(gram + lam * eye, targets)


def project_simplex(v: Tensor, total: float) -> Tensor:
    """Euclidean projection of each row of v (..., N) onto {g >= 0, sum g = total}.

    The sort-based algorithm (Held et al. 1974; Duchi et al. 2008): with u sorted descending,
    rho is the last index where u_j > (cumsum(u)_j - total) / j, and g = max(v - theta, 0).
    """
    u, _ = v.sort(dim=-1, descending=True)
    cumulative = u.cumsum(-1) - total
    index = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    count = (u - cumulative / index > 0).sum(-1, keepdim=True)  # rho + 1, at least 1
    theta = cumulative.gather(-1, count - 1) / count.to(v.dtype)
    return (v - theta).clamp_min(0)


def svm_dual(kernel: Tensor, onehot: Tensor, c: float, iterations: int) -> Tensor:
    """The Crammer-Singer dual for T tasks at once by FISTA: kernel (T, S, S), onehot (T, S, N)
    -> alpha (T, S, N) minimising 1/2 tr(alpha^T K alpha) - <alpha, Y> subject to
    alpha_i = C y_i - gamma_i with gamma_i >= 0, sum(gamma_i) = C."""
    # step 1/L with L the largest eigenvalue of K, by power iteration (a constant, not learned)
    with torch.no_grad():
        vector = torch.ones_like(kernel[..., :1])
        for _ in range(20):
            vector = F.normalize(kernel @ vector, dim=1)
        lipschitz = (vector * (kernel @ vector)).sum(1, keepdim=True).clamp_min(1e-6)
    step = 1.0 / lipschitz  # (T, 1, 1)

    def project(alpha: Tensor) -> Tensor:
        return c * onehot - project_simplex(c * onehot - alpha, c)

    alpha = project(torch.zeros_like(onehot))
    momentum_point, t = alpha, 1.0
    for _ in range(iterations):
        gradient = kernel @ momentum_point - onehot
        following = project(momentum_point - step * gradient)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        momentum_point = following + ((t - 1) / t_next) * (following - alpha)
        alpha, t = following, t_next
    return alpha


class MetaOptNet(EpisodicLearner):
    """A per-task linear head solved in closed form (ridge) or by a differentiable QP (SVM)."""

    def __init__(self, cfg: MetaOptNetConfig, model: nn.Module, kind: str, task_batching: str):
        super().__init__(cfg, model, kind, task_batching)
        device = next(model.parameters()).device
        self.head = nn.Module()
        self.head.scale = nn.Parameter(torch.tensor(cfg.scale, device=device))

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"head": self.head}

    def scores(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, ways: int) -> Tensor:
        with torch.autocast(support_z.device.type, enabled=False):  # solves in fp32 under bf16
            support_z, query_z = support_z.float(), query_z.float()
            onehot = F.one_hot(support_y, ways).float()  # (T, S, N)
            if self.cfg.head == "ridge":
                weights = ridge_weights(support_z, onehot, self.cfg.ridge_lambda)  # (T, D, N)
                return self.head.scale * (query_z @ weights)
            kernel = support_z @ support_z.transpose(1, 2)  # (T, S, S)
            alpha = svm_dual(kernel, onehot, self.cfg.svm_c, self.cfg.svm_iterations)
            # w_n = sum_i alpha_in z_i, so query logits are (Q S^T) alpha: (T, M, N)
            return self.head.scale * ((query_z @ support_z.transpose(1, 2)) @ alpha)
