"""Trajectories of a Gaussian policy on a batch of tasks, one parameter dict per task, and the
policy-gradient inner step that adapts the parameters on them.

This is the sampler and sample processor of the gradient-based meta-RL learners (MAML-TRPO,
E-MAML, ProMP), as the authors' code has them: cbfinn/maml_rl
`sandbox/rocky/tf/algos/batch_maml_polopt.py` (sample N trajectories per task with the current
pre- or post-update policy, then `process_samples` per task: discounted returns, rllab's linear
feature baseline fitted on the task's own trajectories, GAE, advantages centred per task) and
jonasrothfuss/ProMP `meta_policy_search/samplers/meta_sample_processor.py` (the same, plus the
meta-batch-normalised rewards that E-MAML weights its exploration term by). The inner step is
maml_rl's `MAMLGaussianMLPPolicy.compute_updated_dists` and ProMP's `MAMLAlgo._adapt_sym`:
phi = theta - alpha * grad L_in(theta), one gradient per task, here `torch.func.grad` under
`vmap` over the tasks, so that the outer objective differentiates through it.

Shape letters: T tasks, N trajectories per task, H the horizon, D observation features, A action
dimensions. Parameter dicts hold one tensor per task: (T, ...) (`per_task`).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from metalearn.algos.rl.advantages import (
    center_advantages,
    discounted_returns,
    gae,
    linear_baseline_values,
)
from metalearn.envs.navigation import rollout
from metalearn.models.policy import GaussianMLPPolicy, gaussian_kl, gaussian_log_prob

Params = dict[str, Tensor]
INNER_OBJECTIVES = ("log_likelihood", "likelihood_ratio")


@dataclass
class Trajectories:
    """N trajectories of each of T tasks, padded to the horizon, as one policy sampled them."""

    observations: Tensor  # (T, N, H, D)
    actions: Tensor  # (T, N, H, A)
    rewards: Tensor  # (T, N, H), zero after an episode ends
    valid: Tensor  # (T, N, H), 1.0 on the steps an episode took
    means: Tensor  # (T, N, H, A): the sampling policy's distribution (fixed: no graph)
    log_stds: Tensor  # (T, N, H, A)
    log_probs: Tensor  # (T, N, H): log pi_old(a | s) of the sampling policy
    advantages: Tensor  # (T, N, H): GAE with the task's linear baseline, centred per task

    def returns(self) -> Tensor:
        """Each task's mean undiscounted return over its N trajectories (T,)."""
        return self.rewards.sum(-1).mean(-1)


def per_task(params: Params, tasks: int) -> Params:
    """The same parameters for each of T tasks: (T, ...) views, through which gradients sum."""
    return {k: v.expand(tasks, *v.shape) for k, v in params.items()}


def distribution(policy: GaussianMLPPolicy, params: Params, observations: Tensor):
    """(mean, log_std), each (T, ..., A), of task t's policy (params (T, ...)) on its own
    observations (T, ..., D)."""
    return torch.vmap(policy.distribution)(params, observations)


def log_prob(policy: GaussianMLPPolicy, params: Params, trajectories: Trajectories) -> Tensor:
    """log pi_phi_t(a | s) (T, N, H) of each task's actions under its own parameters."""
    mean, log_std = distribution(policy, params, trajectories.observations)
    return gaussian_log_prob(mean, log_std, trajectories.actions)


def mean_over_steps(values: Tensor, valid: Tensor) -> Tensor:
    """Each task's mean over the steps its episodes took (T,): (T, N, H) -> (T,)."""
    return (values * valid).sum((-2, -1)) / valid.sum((-2, -1))


def mean_kl(policy: GaussianMLPPolicy, params: Params, trajectories: Trajectories) -> Tensor:
    """The mean over tasks of KL(pi_old || pi_phi_t) averaged over each task's steps: TRPO's
    constraint (pytorch-maml-rl's `surrogate_loss`: per task, then the mean over tasks)."""
    mean, log_std = distribution(policy, params, trajectories.observations)
    kl = gaussian_kl(trajectories.means, trajectories.log_stds, mean, log_std)
    return mean_over_steps(kl, trajectories.valid).mean()


def sample(
    policy: GaussianMLPPolicy,
    params: Params,
    batch,
    stage: int,
    trajectories: int,
    gamma: float,
    gae_lambda: float,
    normalize: bool = True,
) -> Trajectories:
    """Play N trajectories of every task with its own parameters (T, ...) and the batch's
    action noise of this adaptation stage, and process them (no autograd graph)."""
    tasks, horizon = batch.tasks, batch.cfg.horizon
    params = {k: v.detach() for k, v in params.items()}
    noise = batch.action_noise(stage, trajectories)  # (T, N, H, A)
    steps = iter(range(horizon))

    def act(observations: Tensor) -> Tensor:  # (T N, D) -> (T N, A)
        mean, log_std = distribution(policy, params, observations.view(tasks, trajectories, -1))
        actions = mean + log_std.exp() * noise[:, :, next(steps)]
        return actions.reshape(tasks * trajectories, -1)

    with torch.no_grad():
        played = rollout(batch.env(trajectories), act)
        shaped = {k: v.view(tasks, trajectories, *v.shape[1:]) for k, v in played.items()}
        observations, actions = shaped["observations"], shaped["actions"]
        valid = shaped["valid"].to(observations.dtype)
        mean, log_std = distribution(policy, params, observations)
        advantages = process(observations, shaped["rewards"], valid, gamma, gae_lambda, normalize)
    return Trajectories(
        observations=observations,
        actions=actions,
        rewards=shaped["rewards"],
        valid=valid,
        means=mean,
        log_stds=log_std,
        log_probs=gaussian_log_prob(mean, log_std, actions),
        advantages=advantages,
    )


def process(
    observations: Tensor,
    rewards: Tensor,
    valid: Tensor,
    gamma: float,
    gae_lambda: float,
    normalize: bool,
) -> Tensor:
    """rllab's `process_samples` per task: fit the linear baseline on the task's discounted
    returns, GAE on it, then (`normalize`, maml_rl's center_adv) zero mean and unit std."""
    returns = discounted_returns(rewards, valid, gamma)
    values = linear_baseline_values(observations, returns, valid)
    advantages = gae(rewards, values, valid, gamma, gae_lambda)
    return center_advantages(advantages, valid) if normalize else advantages


def inner_loss(
    policy: GaussianMLPPolicy, objective: str, params: Params, trajectories: Trajectories
) -> Tensor:
    """One task's inner policy-gradient loss (a scalar; call under vmap over tasks), the mean
    over its steps of minus

    - `log_likelihood`: log pi_phi(a | s) A, REINFORCE (maml_rl's `surr_objs`, ProMP's
      TRPOMAML inner_type='log_likelihood'), whose gradient is the policy gradient;
    - `likelihood_ratio`: pi_phi(a | s) / pi_old(a | s) A, ProMP's low-variance curvature (LVC)
      objective (Rothfuss et al. 2019, eq. 12): the same gradient at phi = old, and a Hessian
      that keeps the score-function outer product grad log pi grad log pi^T A.
    """
    log_probs = policy.log_prob(params, trajectories.observations, trajectories.actions)
    if objective == "likelihood_ratio":
        weights = torch.exp(log_probs - trajectories.log_probs)
    else:
        weights = log_probs
    valid = trajectories.valid
    return -(weights * trajectories.advantages * valid).sum() / valid.sum()


def adapt(
    policy: GaussianMLPPolicy, params: Params, trajectories: Trajectories, lr: float, objective: str
) -> Params:
    """One inner step per task, phi_t = theta_t - lr * grad L_in(theta_t) (T, ...): differentiable
    (second order) with respect to `params`."""

    def task_loss(task_params: Params, fields: dict[str, Tensor]) -> Tensor:
        return inner_loss(policy, objective, task_params, Trajectories(**fields))

    grads = torch.vmap(torch.func.grad(task_loss))(params, vars(trajectories))
    return {k: v - lr * grads[k] for k, v in params.items()}
