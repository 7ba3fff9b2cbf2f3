"""The foundations of gradient-based meta-RL against their definitions: the Gaussian policy,
returns and GAE with masks, rllab's linear feature baseline, conjugate gradient on
Fisher-vector products and TRPO's step (rllab's ConjugateGradientOptimizer)."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from metalearn.errors import ConfigError
from metalearn.models.policy import GaussianMLPPolicy, GaussianPolicyConfig, gaussian_entropy


def tiny_policy(hidden=(3,), seed=0) -> GaussianMLPPolicy:
    torch.manual_seed(seed)
    return GaussianMLPPolicy(GaussianPolicyConfig(hidden_sizes=list(hidden)), (2,), 2).double()


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
