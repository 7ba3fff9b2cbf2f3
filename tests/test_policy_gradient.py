"""The foundations of gradient-based meta-RL against their definitions: the Gaussian policy,
returns and GAE with masks, rllab's linear feature baseline, conjugate gradient on
Fisher-vector products and TRPO's step (rllab's ConjugateGradientOptimizer)."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from metalearn.algos.rl.advantages import (
    center_advantages,
    discounted_returns,
    fit_linear_baseline,
    gae,
    linear_baseline_values,
    predict_linear_baseline,
)
from metalearn.algos.rl.trpo import (
    conjugate_gradient,
    fisher_vector_product,
    flatten,
    surrogate_loss,
    trpo_step,
    unflatten,
)
from metalearn.errors import ConfigError, TrainingError
from metalearn.models.policy import GaussianMLPPolicy, GaussianPolicyConfig, gaussian_entropy


def tiny_policy(hidden=(3,), seed=0) -> GaussianMLPPolicy:
    torch.manual_seed(seed)
    return GaussianMLPPolicy(GaussianPolicyConfig(hidden_sizes=list(hidden)), (2,), 2).double()


def ragged_valid(lengths: list[int], horizon: int) -> torch.Tensor:
    """valid (len(lengths), H): each row a prefix of the given length."""
    return torch.arange(horizon)[None, :] < torch.tensor(lengths)[:, None]


# ---------------------------------------------------------------- the Gaussian MLP policy


def test_policy_starts_at_unit_std_and_its_math_is_torch_normals():
    policy = tiny_policy(hidden=(64, 64))
    assert torch.equal(policy.log_std, torch.zeros(2, dtype=torch.float64))  # init_std 1.0
    assert all((m.bias == 0).all() for m in policy.modules() if isinstance(m, torch.nn.Linear))
    params = policy.params()
    other = {k: v + 0.1 * torch.randn_like(v) for k, v in params.items()}
    obs, actions = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    mean, log_std = policy.distribution(params, obs)
    new_mean, new_log_std = policy.distribution(other, obs)
    old, new = Normal(mean, log_std.exp()), Normal(new_mean, new_log_std.exp())
    assert torch.allclose(policy.log_prob(params, obs, actions), old.log_prob(actions).sum(-1))
    assert torch.allclose(policy.kl(params, other, obs), kl_divergence(old, new).sum(-1))
    assert torch.allclose(policy.kl(params, params, obs), torch.zeros(5, dtype=torch.float64))
    assert torch.allclose(gaussian_entropy(new_log_std), new.entropy().sum(-1))
    noise = torch.randn(5, 2, dtype=torch.float64)
    assert torch.allclose(policy.sample(other, obs, noise), new_mean + new_log_std.exp() * noise)
    floored = {**params, "log_std": torch.full((2,), -50.0, dtype=torch.float64)}
    assert torch.allclose(policy.distribution(floored, obs)[1], torch.tensor(1e-6).log().double())


def test_policy_methods_vmap_over_parameter_dicts_of_tasks():
    policy = tiny_policy(hidden=(8,))
    params = policy.params()
    per_task = [{k: v + 0.2 * torch.randn_like(v) for k, v in params.items()} for _ in range(3)]
    stacked = {k: torch.stack([p[k] for p in per_task]) for k in params}
    obs, actions = torch.randn(3, 6, 2).double(), torch.randn(3, 6, 2).double()
    mapped = torch.vmap(policy.log_prob)(stacked, obs, actions)  # (T, B)
    looped = torch.stack([policy.log_prob(per_task[t], obs[t], actions[t]) for t in range(3)])
    assert torch.allclose(mapped, looped)
    kls = torch.vmap(policy.kl, in_dims=(None, 0, 0))(params, stacked, obs)
    assert torch.allclose(kls[1], policy.kl(params, per_task[1], obs[1]))
    grads = torch.func.grad(lambda p: policy.log_prob(p, obs[0], actions[0]).sum())(params)
    policy.zero_grad()
    policy.log_prob(params, obs[0], actions[0]).sum().backward()
    assert all(torch.allclose(grads[k], p.grad) for k, p in policy.named_parameters())


@pytest.mark.parametrize(
    "overrides",
    [{"hidden_sizes": []}, {"activation": "gelu"}, {"init_std": 0.0}, {"min_std": 2.0}],
)
def test_impossible_policy_settings_are_config_errors(overrides: dict):
    with pytest.raises(ConfigError, match="model."):
        GaussianPolicyConfig(**overrides)


# ---------------------------------------------------------------- returns and advantages


def per_path_reference(rewards, values, lengths, gamma, lam):
    """rllab's process_samples, one path at a time: the slow, obvious loops."""
    out = torch.zeros_like(rewards)
    for i, length in enumerate(lengths):
        b = [*values[i, :length].tolist(), 0.0]  # V = 0 after the path's last step
        deltas = [rewards[i, t] + gamma * b[t + 1] - b[t] for t in range(length)]
        for t in range(length):
            out[i, t] = sum((gamma * lam) ** (s - t) * deltas[s] for s in range(t, length))
    return out


def test_gae_matches_rllabs_per_path_loop_and_ignores_everything_after_done():
    lengths, horizon, gamma = [7, 3, 1, 7], 7, 0.99
    valid = ragged_valid(lengths, horizon)
    rewards, values = torch.randn(4, horizon).double(), torch.randn(4, horizon).double()
    advantages = gae(rewards, values, valid, gamma, 0.9)
    reference = per_path_reference(rewards, values, lengths, gamma, 0.9)
    assert torch.allclose(advantages, reference)
    garbage = torch.where(valid, 0.0, 1e6).double()  # rewards and values past the end
    assert torch.equal(gae(rewards + garbage, values - garbage, valid, gamma, 0.9), advantages)
    assert (advantages[~valid] == 0).all() and (
        discounted_returns(rewards, valid, 0.9)[~valid] == 0
    ).all()


def test_gae_with_lambda_one_is_the_discounted_return_minus_the_baseline():
    lengths, gamma = [10, 4, 6], 0.95
    valid = ragged_valid(lengths, 10)
    rewards, values = torch.randn(3, 10).double(), torch.randn(3, 10).double()
    returns = discounted_returns(rewards, valid, gamma)
    assert returns[1, 0].item() == pytest.approx(
        sum(gamma**t * rewards[1, t].item() for t in range(4))
    )
    assert torch.allclose(gae(rewards, values, valid, gamma, 1.0), (returns - values) * valid)


def test_gae_with_lambda_zero_is_the_one_step_td_error():
    lengths, gamma = [5, 2], 0.9
    valid = ragged_valid(lengths, 5)
    rewards, values = torch.randn(2, 5).double(), torch.randn(2, 5).double()
    advantages = gae(rewards, values, valid, gamma, 0.0)
    assert advantages[0, 2].item() == pytest.approx(
        (rewards[0, 2] + gamma * values[0, 3] - values[0, 2]).item()
    )
    last = rewards[1, 1] - values[1, 1]  # the episode ended: no bootstrap from V(s_2)
    assert advantages[1, 1].item() == pytest.approx(last.item())
    assert advantages[0, 4].item() == pytest.approx((rewards[0, 4] - values[0, 4]).item())


def test_centred_advantages_have_zero_mean_and_unit_std_per_task_over_valid_steps():
    valid = torch.stack([ragged_valid([5, 2, 4], 5), ragged_valid([1, 5, 5], 5)])  # (T, N, H)
    advantages = torch.randn(2, 3, 5).double() * torch.tensor([1.0, 30.0]).double()[:, None, None]
    centred = center_advantages(advantages + 7.0, valid)
    for t in range(2):
        values = centred[t][valid[t]]
        assert values.mean().item() == pytest.approx(0.0, abs=1e-9)
        assert values.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    assert (centred[~valid] == 0).all()


def test_the_linear_baseline_recovers_returns_linear_in_its_features_per_task():
    tasks, n, horizon = 3, 4, 100  # t / 100 spans [0, 1): the time features are well posed
    observations = torch.randn(tasks, n, horizon, 2, generator=torch.Generator().manual_seed(0))
    valid = torch.stack([ragged_valid([100, 33, 95, 100], horizon)] * tasks)
    t = torch.arange(horizon) / 100.0
    w = torch.randn(tasks, 8, generator=torch.Generator().manual_seed(1))  # F = 2 D + 4
    linear = (
        torch.einsum("tnhd,td->tnh", observations, w[:, :2])
        + torch.einsum("tnhd,td->tnh", observations**2, w[:, 2:4])
        + w[:, None, None, 4] * t + w[:, None, None, 5] * t**2 + w[:, None, None, 6] * t**3
        + w[:, None, None, 7]
    )  # fmt: skip
    returns = torch.where(valid, linear, 1e4)  # what lies past the episodes' ends never counts
    coeffs = fit_linear_baseline(observations, returns, valid)
    assert coeffs.shape == (tasks, 8) and coeffs.dtype == torch.float32
    assert torch.allclose(coeffs, w, atol=1e-3)  # reg 1e-5 biases it only a little
    exact = fit_linear_baseline(observations, returns, valid, reg_coeff=0.0)
    assert torch.allclose(exact, w, atol=1e-5)
    values = predict_linear_baseline(coeffs, observations, valid)
    assert torch.allclose(values[valid], linear[valid], atol=1e-4) and (values[~valid] == 0).all()
    assert torch.equal(linear_baseline_values(observations, returns, valid), values)
    with pytest.raises(TrainingError, match="NaN or infinite returns"):
        fit_linear_baseline(observations, returns * torch.nan, valid)


# ---------------------------------------------------------------- Fisher-vector products and CG


def kl_problem(observations: int = 3):
    """A tiny float64 policy, its flat parameters and the mean KL from them (held fixed)."""
    policy = tiny_policy()
    params = policy.params()
    old = flatten(params).detach()
    obs = torch.randn(observations, 2, generator=torch.Generator().manual_seed(2)).double()
    fixed = {k: v.detach() for k, v in params.items()}

    def mean_kl(x: torch.Tensor) -> torch.Tensor:
        return policy.kl(fixed, unflatten(x, params), obs).mean()

    return policy, params, old, obs, mean_kl


def test_the_fisher_vector_product_is_the_kl_hessian_times_the_vector():
    *_, old, _, mean_kl = kl_problem()
    fisher = torch.autograd.functional.hessian(mean_kl, old)  # (P, P), P = 19
    assert fisher.shape == (19, 19) and fisher.abs().max() > 0.1
    fvp = fisher_vector_product(mean_kl, old, damping=1e-5)
    for seed in range(3):
        v = torch.randn(19, generator=torch.Generator().manual_seed(seed)).double()
        assert torch.allclose(fvp(v), fisher @ v + 1e-5 * v, atol=1e-12)


def test_conjugate_gradient_solves_the_damped_fisher_system():
    policy, params, old, obs, mean_kl = kl_problem()
    actions = torch.randn(3, 2, generator=torch.Generator().manual_seed(3)).double()
    advantages = torch.tensor([1.0, -0.5, 2.0]).double()
    old_logp = policy.log_prob(params, obs, actions).detach()

    def loss(x):
        logp = policy.log_prob(unflatten(x, params), obs, actions)
        return surrogate_loss(logp, old_logp, advantages, torch.ones(3))

    x = old.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(x), x)
    damped = torch.autograd.functional.hessian(mean_kl, old) + 1e-5 * torch.eye(19).double()
    solution = conjugate_gradient(fisher_vector_product(mean_kl, old), g)  # 10 iterations
    assert (damped @ solution - g).square().sum() < 1e-10  # CG's residual tolerance
    assert torch.allclose(solution, torch.linalg.solve(damped, g), rtol=1e-4, atol=1e-6)
    a = torch.randn(5, 5, generator=torch.Generator().manual_seed(4)).double()
    spd, b = a @ a.T + 0.1 * torch.eye(5).double(), torch.ones(5).double()
    assert torch.allclose(spd @ conjugate_gradient(lambda v: spd @ v, b, iters=5), b)


# ---------------------------------------------------------------- the TRPO step


def trpo_problem(samples: int = 64):
    """A policy-gradient problem: advantages reward the first action dimension."""
    policy = tiny_policy(hidden=(8,))
    params = policy.params()
    fixed = {k: v.detach().clone() for k, v in params.items()}
    generator = torch.Generator().manual_seed(5)
    obs = torch.randn(samples, 2, generator=generator).double()
    noise = torch.randn(samples, 2, generator=generator).double()
    actions = policy.sample(fixed, obs, noise)
    advantages, old_logp = noise[:, 0], policy.log_prob(fixed, obs, actions)
    valid = torch.ones(samples)

    def loss(p):
        return surrogate_loss(policy.log_prob(p, obs, actions), old_logp, advantages, valid)

    def mean_kl(p):
        return policy.kl(fixed, p, obs).mean()

    return params, fixed, loss, mean_kl


def test_a_trpo_step_improves_the_surrogate_within_the_trust_region():
    params, fixed, loss, mean_kl = trpo_problem()
    new, record = trpo_step(params, loss, mean_kl, max_kl=0.01)
    assert record["accepted"] == 1.0
    kl = mean_kl(new).item()
    assert kl <= 0.01 and kl > 0.002  # a real step, near the trust region's edge
    assert loss(new).item() < loss(fixed).item() - 1e-3
    assert record["kl"] == pytest.approx(kl) and record["loss_after"] == pytest.approx(
        loss(new).item()
    )
    assert all(torch.equal(params[k], fixed[k]) for k in params)  # the input is untouched
    smaller, _ = trpo_step(params, loss, mean_kl, max_kl=0.001)
    assert mean_kl(smaller).item() <= 0.001 < kl


@pytest.mark.parametrize("failure", ["loss never improves", "kl never within max_kl"])
def test_a_trpo_step_restores_the_parameters_when_no_step_is_acceptable(failure: str):
    params, fixed, loss, mean_kl = trpo_problem()
    old = flatten(fixed)
    if failure == "loss never improves":  # same gradient at the start, a wall around it
        bad_loss, bad_kl = lambda p: loss(p) + 1e6 * ((flatten(p) - old) ** 2).sum(), mean_kl
    else:  # same Fisher matrix, but 0.02 above any step's KL
        bad_loss, bad_kl = loss, lambda p: mean_kl(p) + 0.02
    new, record = trpo_step(params, bad_loss, bad_kl, max_kl=0.01)
    assert record["accepted"] == 0.0 and record["backtracks"] == 14.0
    assert all(torch.equal(new[k], fixed[k]) for k in params)
    assert record["loss_after"] == record["loss_before"]
