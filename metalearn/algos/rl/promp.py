"""ProMP, Proximal Meta-Policy Search (Rothfuss et al. 2019).

Two changes to MAML-TRPO. The inner step follows the low-variance curvature (LVC) objective,
pi_theta(a|s) / pi_old(a|s) A, pi_old the policy that sampled the pre-update trajectories
(eq. 12): at theta = old its gradient is REINFORCE's, but its Hessian also holds the
score-function outer product grad log pi grad log pi^T A, so that the meta-gradient through the
inner step accounts for the pre-update sampling distribution, with less variance than DiCE.
The outer step is PPO's clipped objective on the post-update likelihood ratio against the
post-update sampling policy, plus a penalty eta * KL(pi_old || pi_theta) between the
pre-update sampling policy and the current pre-update policy (the trust region between
consecutive outer steps, eq. 13), minimised by `promp_steps` Adam steps on each meta-batch
(the trainer's outer optimiser, through `meta_losses`), re-adapting from the current theta at
every step. With `adaptive_inner_kl` the coefficient is halved when the KL falls under
target / 1.5 and doubled above 1.5 target after each meta-batch.

As jonasrothfuss/ProMP `meta_policy_search/meta_algos/pro_mp.py` (`ProMP.build_graph`: the
inner `likelihood_ratio_sym` objective, the clipped outer objective, the inner KL per step
times its coefficient, averaged; `optimize_policy`, `_adapt_kl_coeff`) and
`optimizers/maml_first_order_optimizer.py` (`MAMLPPOOptimizer`: Adam, `max_epochs` full-batch
steps). Defaults are their point-mass and HalfCheetah run scripts
(`run_scripts/pro-mp_run_point_mass.py`, `pro-mp_run_mujoco.py`): alpha 0.1, Adam 1e-3, 5 steps,
clip 0.3, KL coefficient 5e-4 (fixed), target 0.01, 20 trajectories, gamma 0.99, lambda 1.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from metalearn.algos.rl.meta_policy_search import MetaPolicyConfig, MetaPolicySearch
from metalearn.algos.rl.trajectories import Trajectories, log_prob, mean_kl, mean_over_steps
from metalearn.errors import ConfigError


@dataclass
class ProMPConfig(MetaPolicyConfig):
    """The LVC inner step and a clipped, KL-penalised outer objective stepped by Adam."""

    name: str = "promp"
    outer_lr: float = 1e-3  # Adam's step size
    promp_steps: int = 5  # outer steps per meta-batch, without resampling (num_promp_steps)
    clip_eps: float = 0.3  # the post-update likelihood ratio is clipped to [1 - eps, 1 + eps]
    inner_kl_coef: float = 5e-4  # eta: the weight of KL(pre-update sampling || pre-update)
    adaptive_inner_kl: bool = False  # halve or double eta after each meta-batch ...
    target_inner_kl: float = 0.01  # ... to keep that KL near this

    REFERENCE: ClassVar[dict[str, Any]] = {
        "source": "jonasrothfuss/ProMP run_scripts/pro-mp_run_point_mass.py",
        "inner_lr": 0.1,
        "inner_steps": 1,
        "trajectories": 20,
        "gamma": 0.99,
        "gae_lambda": 1.0,
        "outer_lr": 1e-3,
        "promp_steps": 5,
        "clip_eps": 0.3,
        "inner_kl_coef": 5e-4,
        "adaptive_inner_kl": False,
        "target_inner_kl": 0.01,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner_steps < 1:
            raise ConfigError(
                f"algo.inner_steps must be >= 1 for ProMP (its objective is built on the "
                f"pre-update steps; algo=pretrained_trpo trains without adaptation), got "
                f"{self.inner_steps}"
            )
        if not self.outer_lr > 0 or self.promp_steps < 1:
            raise ConfigError(
                f"algo.outer_lr must be positive and algo.promp_steps >= 1, got {self.outer_lr} "
                f"and {self.promp_steps}"
            )
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"algo.clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.inner_kl_coef < 0 or not self.target_inner_kl > 0:
            raise ConfigError(
                f"algo.inner_kl_coef must be >= 0 and algo.target_inner_kl positive, got "
                f"{self.inner_kl_coef} and {self.target_inner_kl}"
            )


class ProMP(MetaPolicySearch):
    """ProMP: LVC inner steps, `promp_steps` clipped and KL-penalised Adam steps per batch."""

    steps_itself = False  # the trainer backpropagates each step's loss and steps Adam
    inner_objective = "likelihood_ratio"  # LVC: pi_theta / pi_old A

    def __init__(self, cfg: ProMPConfig, model, kind: str, task_batching: str) -> None:
        super().__init__(cfg, model, kind, task_batching)
        self.inner_kl_coefs = [cfg.inner_kl_coef] * cfg.inner_steps  # one per inner step

    def objective(self, stages: list[Trajectories]) -> tuple[Tensor, Tensor]:
        """ProMP's loss at the current weights, and the inner KL of each inner step (K,)."""
        chain = self.adapted(self.model.params(), stages)
        post, eps = stages[-1], self.cfg.clip_eps
        ratio = torch.exp(log_prob(self.model, chain[-1], post) - post.log_probs)
        advantages = post.advantages
        clipped = torch.minimum(ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages)
        surrogate = -mean_over_steps(clipped, post.valid).mean()
        # KL(pi_old_k || pi_theta_k) on stage k's trajectories, k < K: the pre-update policies
        pre_update = zip(chain[:-1], stages[:-1], strict=True)
        inner_kls = torch.stack([mean_kl(self.model, p, s) for p, s in pre_update])
        coefs = torch.tensor(self.inner_kl_coefs, dtype=inner_kls.dtype, device=inner_kls.device)
        return surrogate + (coefs * inner_kls).mean(), inner_kls

    def meta_losses(self, batch, iteration: int = 0) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """The loss of each of the `promp_steps` outer steps on one meta-batch (the trainer steps
        Adam after each); then the KL coefficients' update, as ProMP's `optimize_policy`."""
        stages = self.sample_meta_batch(batch)
        sampled = self.sampled_metrics(stages)
        for _ in range(self.cfg.promp_steps):
            loss, inner_kls = self.objective(stages)
            metrics = {"loss": loss.detach(), "inner_kl": inner_kls.detach().mean(), **sampled}
            yield loss, metrics | {"inner_kl_coef": torch.tensor(self.inner_kl_coefs).mean()}
        if self.cfg.adaptive_inner_kl:  # the KL after the last step (ProMP's compute_stats)
            with torch.no_grad():
                _, inner_kls = self.objective(stages)
            self.inner_kl_coefs = [
                adapt_kl_coef(c, kl, self.cfg.target_inner_kl)
                for c, kl in zip(self.inner_kl_coefs, inner_kls.tolist(), strict=True)
            ]

    def meta_loss(self, batch, iteration: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """The first outer step's loss on a fresh meta-batch."""
        return next(iter(self.meta_losses(batch, iteration)))

    def state_dict(self) -> dict:
        return super().state_dict() | {"inner_kl_coefs": list(self.inner_kl_coefs)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.inner_kl_coefs = list(state["inner_kl_coefs"])

    def nonfinite_causes(self, gradient: bool) -> list[str]:
        return [f"the inner step (algo.inner_lr={self.cfg.inner_lr}: lower it)"]


def adapt_kl_coef(coef: float, kl: float, target: float) -> float:
    """ProMP's `_adapt_kl_coeff`: halve under target / 1.5, double over 1.5 target."""
    if kl < target / 1.5:
        return coef / 2
    if kl > target * 1.5:
        return coef * 2
    return coef
