"""MAML-TRPO (Finn et al. 2017, section 5.3) and E-MAML (Stadie et al. 2018, `exploration`).

MAML-TRPO adapts a Gaussian policy to a task by one (or `inner_steps`) REINFORCE step on N
trajectories of the pre-update policy, and meta-learns the initialisation by TRPO on the
post-update trajectories: the surrogate -E[pi_phi(theta)(a|s) / pi_old(a|s) A], with phi the
adapted parameters (the meta-gradient goes through the inner step, second order), minimised
within a trust region on the mean KL from the post-update sampling policy, KL(pi_old ||
pi_phi(theta)) <= max_kl, by a conjugate-gradient natural-gradient direction and a
backtracking line search (trpo.py). As the authors' code: cbfinn/maml_rl
`sandbox/rocky/tf/algos/maml_npo.py` (`init_opt`: the inner surrogate -mean(log pi A) per task,
the outer likelihood ratio against the post-update policy's `old_dist_info_vars`, the mean KL
of the last step, `kl_constrain_step = -1`) and tristandeleu/pytorch-maml-rl
`maml_rl/metalearners/maml_trpo.py` (`surrogate_loss`: the per-task means over valid steps,
then over tasks; `step`: the Fisher-vector product by double backprop through the adaptation).
Defaults are pytorch-maml-rl's `configs/maml/2d-navigation.yaml`: alpha 0.1, 20 trajectories
per task, gamma 0.99, lambda 1, max KL 0.01, 10 CG iterations, damping 1e-5, 15 backtracks by
0.8.

With `inner_steps: 0` (`algo=pretrained_trpo`) the same TRPO step trains the policy on the
pre-update trajectories of every task, no adaptation: the MAML paper's "pretrained" baseline
(section 5.3, "pretraining one policy on all of the tasks and then fine-tuning"), adapted at test
by the same inner steps as MAML (`test_inner_steps: 1`, `eval.steps`).

E-MAML adds the exploration term that MAML's meta-gradient lacks, the dependence of the
post-update return on the pre-update sampling distribution: the pre-update trajectories'
log-likelihood weighted by the post-update return, as jonasrothfuss/ProMP
`meta_policy_search/meta_algos/trpo_maml.py` (`exploration=True`) builds it: per task,
-mean(R_t) * mean(log pi_theta(a | s) over the pre-update steps), with R_t the post-update
rewards normalised over the whole meta-batch (`samplers/meta_sample_processor.py`,
`adj_avg_rewards`), added to the TRPO surrogate.

The outer step is not a gradient step of an optimiser: the learner takes it itself
(`steps_itself`, `outer_step`), and its state is the policy's weights alone.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from metalearn.algos.rl.meta_policy_search import MetaPolicyConfig, MetaPolicySearch
from metalearn.algos.rl.trajectories import (
    Params,
    Trajectories,
    inner_loss,
    log_prob,
    mean_kl,
    mean_over_steps,
    per_task,
)
from metalearn.algos.rl.trpo import flatten, trpo_step, unflatten
from metalearn.errors import ConfigError


@dataclass
class MAMLTRPOConfig(MetaPolicyConfig):
    """MAML's policy-gradient inner step and a TRPO outer step (E-MAML: `exploration`)."""

    name: str = "maml_trpo"
    max_kl: float = 0.01  # the trust region on the mean KL of the post-update policies
    cg_iters: int = 10  # conjugate-gradient iterations for the natural-gradient direction
    cg_damping: float = 1e-5  # added to the Fisher matrix's diagonal
    backtrack_ratio: float = 0.8  # the line search's shrink factor
    max_backtracks: int = 15  # the line search's tries
    exploration: bool = False  # E-MAML's term (algo=emaml_trpo)

    REFERENCE: ClassVar[dict[str, Any]] = {
        "source": "tristandeleu/pytorch-maml-rl configs/maml/2d-navigation.yaml",
        "inner_lr": 0.1,
        "inner_steps": 1,
        "trajectories": 20,
        "gamma": 0.99,
        "gae_lambda": 1.0,
        "max_kl": 0.01,
        "cg_iters": 10,
        "cg_damping": 1e-5,
        "backtrack_ratio": 0.8,
        "max_backtracks": 15,
    }
    VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {
        "emaml_trpo": {"exploration": True},
        "pretrained_trpo": {"inner_steps": 0, "test_inner_steps": 1},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.max_kl > 0 or not self.cg_damping >= 0:
            raise ConfigError(
                f"algo.max_kl must be positive and algo.cg_damping >= 0, got {self.max_kl} "
                f"and {self.cg_damping}"
            )
        if self.exploration and self.inner_steps < 1:
            raise ConfigError(
                "algo.exploration (E-MAML) weights the pre-update trajectories by the "
                "post-update return: it needs algo.inner_steps >= 1, got 0"
            )
        if self.cg_iters < 1 or self.max_backtracks < 1 or not 0 < self.backtrack_ratio < 1:
            raise ConfigError(
                f"algo.cg_iters and algo.max_backtracks must be >= 1 and algo.backtrack_ratio "
                f"in (0, 1), got {self.cg_iters}, {self.max_backtracks}, {self.backtrack_ratio}"
            )


class MAMLTRPO(MetaPolicySearch):
    """MAML-TRPO, or E-MAML-TRPO with `cfg.exploration`: one TRPO step per meta-batch."""

    steps_itself = True  # the trainer calls outer_step: TRPO's line search, no optimiser
    inner_objective = "log_likelihood"  # REINFORCE, as maml_rl's inner surrogate

    def surrogate(self, params: Params, stages: list[Trajectories]) -> Tensor:
        """TRPO's loss at `params`: minus the post-update likelihood ratio times the advantages,
        per task over its steps, then over tasks; E-MAML adds its exploration term."""
        post = stages[-1]
        ratio = torch.exp(
            log_prob(self.model, self.adapted(params, stages)[-1], post) - post.log_probs
        )
        loss = -mean_over_steps(ratio * post.advantages, post.valid).mean()
        if self.cfg.exploration:
            loss = loss + self.exploration_loss(params, stages)
        return loss

    def exploration_loss(self, params: Params, stages: list[Trajectories]) -> Tensor:
        """E-MAML's term: -mean over tasks of R_t times the mean log-likelihood of the task's
        pre-update trajectories under theta, R_t its mean post-update reward normalised by the
        mean and std of every post-update reward of the meta-batch (ProMP's adj_avg_rewards)."""
        pre, post = stages[0], stages[-1]
        rewards = post.rewards[post.valid.bool()]  # every valid step of the meta-batch
        normalised = (post.rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-8)
        weights = mean_over_steps(normalised, post.valid)  # (T,)
        log_likelihood = mean_over_steps(
            log_prob(self.model, per_task(params, len(weights)), pre), pre.valid
        )
        return -(weights * log_likelihood).mean()

    def kl(self, params: Params, stages: list[Trajectories]) -> Tensor:
        """The mean KL from the post-update sampling policies to those adapted from `params`."""
        return mean_kl(self.model, self.adapted(params, stages)[-1], stages[-1])

    def meta_loss(self, batch, iteration: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """The surrogate on a fresh meta-batch (with its graph): its gradient is the meta-gradient
        that TRPO's step preconditions."""
        stages = self.sample_meta_batch(batch)
        loss = self.surrogate(self.model.params(), stages)
        return loss, {"loss": loss.detach(), **self.sampled_metrics(stages)}

    def outer_step(self, batch, iteration: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """Sample the meta-batch, take one TRPO step on it and set the policy's weights."""
        cfg = self.cfg
        stages = self.sample_meta_batch(batch)
        params = self.model.params()
        new, record = trpo_step(
            params,
            lambda p: self.surrogate(p, stages),
            lambda p: self.kl(p, stages),
            max_kl=cfg.max_kl,
            cg_iters=cfg.cg_iters,
            damping=cfg.cg_damping,
            backtrack_ratio=cfg.backtrack_ratio,
            max_backtracks=cfg.max_backtracks,
            fvp=self.fisher_product(params, stages),
        )
        with torch.no_grad():
            for key, value in params.items():
                value.copy_(new[key])
        loss = torch.tensor(record.pop("loss_before"))
        metrics = {"loss": loss, **self.sampled_metrics(stages)}
        return loss, metrics | {k: torch.tensor(v) for k, v in record.items()}

    def fisher_product(self, params: Params, stages: list[Trajectories]):
        """v -> (F + damping I) v, F the Hessian at theta of the mean KL of the post-update
        policies: F = J^T F_post J, J = dphi/dtheta = prod_k (I - alpha H_k), H_k the Hessian of
        stage k's inner loss. Exact where TRPO uses it (at the sampling weights the KL's
        gradient is zero, so the adaptation's second derivative drops out), and without the
        third derivatives that double backprop through the inner step takes (pytorch-maml-rl's
        `hessian_vector_product`): each product is 2 K Hessian-vector products of the inner
        losses and one of the KL, each one backward pass."""
        policy, lr, tasks = self.model, self.cfg.inner_lr, stages[0].rewards.shape[0]
        theta = per_task({k: v.detach() for k, v in params.items()}, tasks)
        leaves, grads = [], []  # per stage: theta_k (T, ...) and grad L_in(theta_k) with graph
        for played in stages[:-1]:
            leaf = {k: v.clone().requires_grad_() for k, v in theta.items()}

            def task_loss(p: Params, fields: dict[str, Tensor]) -> Tensor:
                return inner_loss(policy, self.inner_objective, p, Trajectories(**fields))

            grad = torch.vmap(torch.func.grad(task_loss))(leaf, vars(played))
            leaves.append(leaf)
            grads.append(grad)
            theta = {k: (leaf[k] - lr * grad[k]).detach() for k in leaf}
        post = {k: v.requires_grad_() for k, v in theta.items()}
        kl_grad = dict(
            zip(
                post,
                torch.autograd.grad(
                    mean_kl(policy, post, stages[-1]), list(post.values()), create_graph=True
                ),
                strict=True,
            )
        )

        def hvp(gradient: Params, at: Params, u: Params) -> Params:
            dot = sum((gradient[k] * u[k]).sum() for k in u)
            return dict(
                zip(at, torch.autograd.grad(dot, list(at.values()), retain_graph=True), strict=True)
            )

        def product(v: Tensor) -> Tensor:
            u = per_task(unflatten(v, params), tasks)
            for leaf, grad in zip(leaves, grads, strict=True):  # J u
                u = {k: u[k] - lr * h for k, h in hvp(grad, leaf, u).items()}
            w = hvp(kl_grad, post, u)  # F_post J u
            for leaf, grad in zip(reversed(leaves), reversed(grads), strict=True):  # J^T (J = J^T)
                w = {k: w[k] - lr * h for k, h in hvp(grad, leaf, w).items()}
            return flatten({k: w[k].sum(0) for k in w}) + self.cfg.cg_damping * v

        return product

    def nonfinite_causes(self, gradient: bool) -> list[str]:
        return [
            f"the inner step (algo.inner_lr={self.cfg.inner_lr}: lower it)",
            f"the trust region (algo.max_kl={self.cfg.max_kl}: lower it)",
        ]

    def memory_advice(self) -> tuple[str, list[str], list[str]]:
        what = f"{self.cfg.name}'s Fisher-vector products through the inner step"
        return (
            what,
            [f"fewer trajectories (algo.trajectories={max(2, self.cfg.trajectories // 2)})"],
            [],
        )
