"""A plain ReLU multilayer perceptron (MAML's sinusoid network is 1-40-40-1)."""

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from metalearn.errors import ConfigError


@dataclass
class MLPConfig:
    """Fully connected layers with ReLU between them."""

    name: str = "mlp"
    hidden_sizes: list[int] = field(default_factory=lambda: [40, 40])  # widths of hidden layers

    def __post_init__(self) -> None:
        if not self.hidden_sizes or any(h < 1 for h in self.hidden_sizes):
            raise ConfigError(
                f"model.hidden_sizes must be positive widths, got {self.hidden_sizes}"
            )


class MLP(nn.Module):
    """x (B, in) -> (B, out); with out_features == 0 it returns the last hidden layer.

    The hidden layers are `body`, the output layer `head`, as in conv4: ANIL adapts the head.
    """

    convolutional = False
    recurrent = False
    learned_optimizer = False  # build.py: what algo=l2o meta-trains

    def __init__(
        self, cfg: MLPConfig, in_shape: tuple[int, ...], out_features: int, **_layout: bool
    ) -> None:  # layout flags (fused_batchnorm, channels_last) do not apply to an MLP
        super().__init__()
        sizes = [math.prod(in_shape), *cfg.hidden_sizes]  # images are flattened
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-1], out_features) if out_features > 0 else None
        self.embedding_dim = sizes[-1]

    def forward(self, x: Tensor, embed_only: bool = False) -> Tensor:  # (B, *in_shape) -> (B, out)
        z = self.body(x.flatten(1))
        return z if self.head is None or embed_only else self.head(z)


@dataclass
class IdentityConfig:
    """No layers: the inputs themselves (a neural process's x features; ConvCNP needs it)."""

    name: str = "identity"


class Identity(nn.Module):
    """x (B, in) -> x flattened; with out_features > 0, one linear layer (linear regression)."""

    convolutional = False
    recurrent = False
    learned_optimizer = False

    def __init__(
        self, cfg: IdentityConfig, in_shape: tuple[int, ...], out_features: int, **_layout: bool
    ) -> None:
        super().__init__()
        self.embedding_dim = math.prod(in_shape)
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features > 0 else None
        # an empty buffer: learners that add modules find the model's device from it
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    def forward(self, x: Tensor, embed_only: bool = False) -> Tensor:
        z = x.flatten(1)
        return z if self.head is None or embed_only else self.head(z)
