"""A Gaussian MLP policy for continuous actions: pi(a | s) = N(mu_theta(s), diag(exp(log_std))^2).

The mean is an MLP of the observation; the log standard deviation is one learned vector,
independent of the state, as in rllab's `GaussianMLPPolicy` and the MAML authors'
`MAMLGaussianMLPPolicy` (cbfinn/maml_rl
`sandbox/rocky/tf/policies/maml_minimal_gauss_mlp_policy.py`): Xavier-uniform weights, zero
biases, log std initialised to log(init_std) and floored at log(min_std). pytorch-maml-rl's
`maml_rl/policies/normal_mlp.py` is the same network in torch.

The distribution's math (log-probability, KL divergence) is in plain functions of its
parameters, and the module's methods take an explicit parameter dict (`functional_call`), so
that adapted (fast) parameters, `vmap` over tasks and `torch.func.grad` all work unchanged.

Shape letters: B observations (any leading shape), D observation features, A action dimensions.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.errors import ConfigError

Params = dict[str, Tensor]
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


@dataclass
class GaussianPolicyConfig:
    """An MLP for the mean and a learned, state-independent log standard deviation."""

    name: str = "gaussian_mlp"
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])  # widths of hidden layers
    activation: str = "tanh"  # 'tanh' or 'relu' (the MAML paper's policy: [100, 100], relu)
    init_std: float = 1.0  # the standard deviation before training (rllab's init_std)
    min_std: float = 1e-6  # a floor on the standard deviation (rllab's min_std)

    def __post_init__(self) -> None:
        if not self.hidden_sizes or any(h < 1 for h in self.hidden_sizes):
            raise ConfigError(
                f"model.hidden_sizes must be positive widths, got {self.hidden_sizes}"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"model.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if not self.init_std > 0 or not self.min_std > 0 or self.min_std > self.init_std:
            raise ConfigError(
                f"model.init_std and model.min_std must be positive with min_std <= init_std, "
                f"got init_std={self.init_std}, min_std={self.min_std}"
            )


def gaussian_log_prob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """log N(actions; mean, exp(log_std)^2), summed over the action dimensions: (B, A) -> (B,)."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_kl(mean_p: Tensor, log_std_p: Tensor, mean_q: Tensor, log_std_q: Tensor) -> Tensor:
    """KL(p || q) of two diagonal Gaussians, summed over the action dimensions: (B,).

    The closed form of rllab's `DiagonalGaussian.kl_sym` (without its 1e-8 in the denominator):
    log(sigma_q / sigma_p) + (sigma_p^2 + (mu_p - mu_q)^2) / (2 sigma_q^2) - 1/2.
    """
    var_ratio = torch.exp(2 * (log_std_p - log_std_q))
    mahalanobis = ((mean_p - mean_q) * torch.exp(-log_std_q)) ** 2
    return (log_std_q - log_std_p + 0.5 * (var_ratio + mahalanobis - 1)).sum(-1)


def gaussian_entropy(log_std: Tensor) -> Tensor:
    """The entropy of a diagonal Gaussian, summed over the action dimensions: (B, A) -> (B,)."""
    return (log_std + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)


class GaussianMLPPolicy(nn.Module):
    """observations (B, D) -> (mean (B, A), log_std (B, A)); parameters `body.*`, `mean.*` and
    `log_std` (A,)."""

    convolutional = False
    recurrent = False
    learned_optimizer = False
    policy = True  # checks.py: a meta-RL learner's Gaussian policy, no supervised network

    def __init__(
        self, cfg: GaussianPolicyConfig, in_shape: tuple[int, ...], out_features: int, **_layout
    ) -> None:  # layout flags (fused_batchnorm, channels_last) do not apply to an MLP
        super().__init__()
        if out_features < 1:
            raise ConfigError("model=gaussian_mlp needs an action dimension (a continuous env)")
        sizes = [math.prod(in_shape), *cfg.hidden_sizes]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), ACTIVATIONS[cfg.activation]()]
        self.body = nn.Sequential(*layers)
        self.mean = nn.Linear(sizes[-1], out_features)
        self.log_std = nn.Parameter(torch.full((out_features,), math.log(cfg.init_std)))
        self.min_log_std = math.log(cfg.min_std)
        for module in self.modules():  # maml_rl's create_MLP: xavier_initializer, zeros
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, observations: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.mean(self.body(observations))  # (B, A)
        log_std = self.log_std.clamp(min=self.min_log_std)  # rllab: tf.maximum(std, min_std)
        return mean, log_std.expand_as(mean)

    def params(self) -> Params:
        """The module's own parameters as a dict: the starting point of adaptation."""
        return dict(self.named_parameters())

    def distribution(self, params: Params, observations: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log_std), each (B, A), of the policy with parameters `params`."""
        return functional_call(self, params, (observations,))

    def log_prob(self, params: Params, observations: Tensor, actions: Tensor) -> Tensor:
        """log pi(actions | observations) (B,) under `params`."""
        return gaussian_log_prob(*self.distribution(params, observations), actions)

    def kl(self, old: Params, new: Params, observations: Tensor) -> Tensor:
        """KL(pi_old(. | s) || pi_new(. | s)) (B,) on each observation: TRPO's constraint."""
        return gaussian_kl(
            *self.distribution(old, observations), *self.distribution(new, observations)
        )

    def sample(self, params: Params, observations: Tensor, noise: Tensor) -> Tensor:
        """Actions mean + std * noise (B, A), with the caller's standard normals `noise`."""
        mean, log_std = self.distribution(params, observations)
        return mean + torch.exp(log_std) * noise
