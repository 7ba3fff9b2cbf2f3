"""The parts of a neural process: set encoders, cross-attention, the latent path, the decoder,
and ConvCNP's SetConv layers and CNN. Sizes follow the Neural-Process-Family (Dubois et al.
2020) scaled to a CPU: width `hidden`, MLPs of `layers` layers.

Shape letters: T tasks, C context points (padded; `mask` (T, C) marks the real ones), Q target
points, X input features, D width, G grid points (ConvCNP).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.data.tasks import TaskBatch
from metalearn.errors import ConfigError

MIN_STD = 0.01  # the NPF's predictive std floor: 0.01 + 0.99 * softplus
LATENT_MIN_STD = 0.1  # Kim et al. 2019: 0.1 + 0.9 * sigmoid


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def masked_mean(r: Tensor, mask: Tensor) -> Tensor:
    """(T, C, D) -> (T, D), the mean over real context points; zeros for an empty context."""
    weights = mask.to(r.dtype)[..., None]
    return (r * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def context_mask(batch: TaskBatch) -> Tensor:
    """(T, C) True for the real context points (GP tasks pad theirs; others have all real)."""
    support = batch.support.x
    if "context" not in batch.info:
        return torch.ones(support.shape[:2], dtype=torch.bool, device=support.device)
    positions = torch.arange(support.shape[1], device=support.device)
    return positions[None] < batch.info["context"][:, None]


def per_point_loglik(mean: Tensor, std: Tensor, y: Tensor, kl: Tensor | None) -> Tensor:
    """(T,) each task's objective per target point from S predictions (S, T, Q) of targets y
    (T, Q): with `kl` (T,), the ELBO (expected log-likelihood less the KL); otherwise the log
    of the mean likelihood over the S draws (one draw: the conditional log-likelihood)."""
    logp = torch.distributions.Normal(mean, std).log_prob(y).sum(-1)  # (S, T)
    if kl is not None:
        return (logp.mean(0) - kl) / y.shape[1]
    return (logp.logsumexp(0) - math.log(mean.shape[0])) / y.shape[1]


def gaussian(raw: Tensor) -> tuple[Tensor, Tensor]:
    """(..., 2) decoder outputs -> mean and std (..., ), std = 0.01 + 0.99 softplus."""
    mean, scale = raw.unbind(-1)
    return mean, MIN_STD + (1 - MIN_STD) * F.softplus(scale)


class CrossAttention(nn.Module):
    """Multi-head attention of target inputs over context points, a transformer block (the NPF's
    'transformer' attention): LayerNorm(q + MHA), then LayerNorm(h + MLP(h)). A task with no
    context gets zeros."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = mlp([dim, dim, dim])

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """query (T, Q, D), keys (T, C, D), values (T, C, D), mask (T, C) -> (T, Q, D)."""
        t, q_len, dim = query.shape
        split = lambda z: z.view(t, z.shape[1], self.heads, dim // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(query)), split(self.k(keys)), split(self.v(values))
        logits = q @ k.transpose(-1, -2) / math.sqrt(dim // self.heads)  # (T, H, Q, C)
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        weights = torch.nan_to_num(logits.softmax(-1), nan=0.0)  # empty context: no weight
        attended = (weights @ v).transpose(1, 2).reshape(t, q_len, dim)
        h = self.norm1(query + self.out(attended))
        h = self.norm2(h + self.ffn(h))
        return h * mask.any(1)[:, None, None].to(h.dtype)


class LatentEncoder(nn.Module):
    """(x, y) pairs -> a diagonal Gaussian over the global latent z: MLP, mean over the set,
    MLP to mean and std (0.1 + 0.9 sigmoid, Kim et al. 2019)."""

    def __init__(self, in_dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.encoder = mlp([in_dim] + [hidden] * layers)
        self.head = mlp([hidden, hidden, 2 * hidden])

    def forward(self, xy: Tensor, mask: Tensor) -> torch.distributions.Normal:
        s = masked_mean(self.encoder(xy), mask)
        mean, raw = self.head(s).chunk(2, -1)
        return torch.distributions.Normal(
            mean, LATENT_MIN_STD + (1 - LATENT_MIN_STD) * torch.sigmoid(raw)
        )


class SetConv(nn.Module):
    """A Gaussian-RBF set convolution with a learned length scale (Gordon et al. 2020): the value
    at each output input is sum over points of exp(-d^2 / (2 l^2)) * the point's value."""

    def __init__(self, init_length: float) -> None:
        super().__init__()
        self.log_length = nn.Parameter(torch.tensor(math.log(init_length)))

    def forward(self, x_in: Tensor, values: Tensor, x_out: Tensor, mask: Tensor | None) -> Tensor:
        """x_in (T, A, 1), values (T, A, channels), x_out (T, B, 1) -> (T, B, channels)."""
        d2 = (x_out - x_in.transpose(1, 2)) ** 2  # (T, B, A)
        weights = torch.exp(-0.5 * d2 / self.log_length.exp() ** 2)
        if mask is not None:
            weights = weights * mask[:, None, :].to(weights.dtype)
        return weights @ values


class ConvCNPNet(nn.Module):
    """ConvCNP (Gordon et al. 2020) for 1-D inputs: SetConv onto a uniform grid (a density
    channel and the density-normalised data channel), a residual CNN, SetConv back to the
    targets, a linear layer to mean and std."""

    def __init__(
        self,
        x_range: tuple[float, float],
        points_per_unit: int,
        channels: int,
        layers: int,
        kernel_size: int,
    ) -> None:
        super().__init__()
        low, high = x_range
        margin = 0.1 * (high - low)  # the grid reaches a little past the inputs
        count = int(round((high - low + 2 * margin) * points_per_unit))
        self.register_buffer("grid", torch.linspace(low - margin, high + margin, count)[:, None])
        spacing = 1.0 / points_per_unit
        self.encoder = SetConv(2 * spacing)
        self.lift = nn.Conv1d(2, channels, 1)
        self.blocks = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)
            for _ in range(layers)
        )
        self.decoder = SetConv(2 * spacing)
        self.head = nn.Linear(channels, 2)

    def forward(self, xc: Tensor, yc: Tensor, mask: Tensor, xt: Tensor) -> tuple[Tensor, Tensor]:
        t = xc.shape[0]
        grid = self.grid[None].expand(t, -1, -1)  # (T, G, 1)
        ones = torch.ones_like(yc)
        h = self.encoder(xc, torch.cat([ones, yc], -1), grid, mask)  # (T, G, 2)
        density, data = h[..., :1], h[..., 1:]
        h = torch.cat([density, data / (density + 1e-8)], -1).transpose(1, 2)  # (T, 2, G)
        h = self.lift(h)
        for block in self.blocks:
            h = h + block(F.relu(h))
        h = F.relu(h).transpose(1, 2)  # (T, G, channels)
        out = self.decoder(grid, h, xt, None)  # (T, Q, channels)
        return gaussian(self.head(out))


class GridConvCNP(nn.Module):
    """The on-the-grid ConvCNP for images (Gordon et al. 2020, section 5.4): the context's
    pixels and their mask on the image grid, a convolution with positive weights of each (the
    density channel, and the data channel normalised by it), a residual 2-D CNN, and a Gaussian
    per pixel, read at the target pixels. Inputs are pixel coordinates in [-1, 1]^2."""

    def __init__(self, size: int, channels: int, layers: int, kernel_size: int) -> None:
        super().__init__()
        self.size = size
        self.encoder = nn.Parameter(torch.randn(1, 1, kernel_size, kernel_size) * 0.1)
        self.lift = nn.Conv2d(2, channels, 1)
        self.blocks = nn.ModuleList(
            nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
            for _ in range(layers)
        )
        self.head = nn.Conv2d(channels, 2, 1)

    def pixels(self, x: Tensor) -> Tensor:
        """(T, N, 2) coordinates -> (T, N) pixel indices, row * size + column."""
        index = ((x + 1) / 2 * (self.size - 1)).round().long().clamp(0, self.size - 1)
        return index[..., 0] * self.size + index[..., 1]

    def forward(self, xc: Tensor, yc: Tensor, mask: Tensor, xt: Tensor) -> tuple[Tensor, Tensor]:
        t, side = xc.shape[0], self.size
        weights = mask.to(yc.dtype)
        grid = yc.new_zeros(t, 2, side * side)  # [mask; mask * y] on the pixel grid
        where = self.pixels(xc)
        grid[:, 0].scatter_add_(1, where, weights)
        grid[:, 1].scatter_add_(1, where, weights * yc[..., 0])
        kernel = self.encoder.abs().expand(2, 1, -1, -1)  # one positive kernel, per channel
        h = F.conv2d(grid.view(t, 2, side, side), kernel, padding=kernel.shape[-1] // 2, groups=2)
        density, data = h[:, :1], h[:, 1:]
        h = self.lift(torch.cat([density, data / (density + 1e-8)], 1))
        for block in self.blocks:
            h = h + block(F.relu(h))
        out = self.head(F.relu(h)).flatten(2).transpose(1, 2)  # (T, pixels, 2)
        at = self.pixels(xt)[..., None].expand(-1, -1, 2)
        return gaussian(out.gather(1, at))


def build_networks(cfg: Any, features: int) -> nn.ModuleDict:
    """The networks of a neural process whose config is `cfg` (NeuralProcessConfig) on inputs
    with `features` features: ConvCNP's (1-D, or on an image's pixel grid), or the encoders,
    attention, latent path and decoder the config asks for."""
    d = cfg.hidden
    net = nn.ModuleDict()
    if cfg.convolutional:
        if features == 2:  # images: on the pixel grid
            if cfg.grid_size is None:
                raise ConfigError(
                    "algo=convcnp on 2-D inputs runs on an image's pixel grid: set "
                    "algo.grid_size (data=omniglot_completion sets it)"
                )
            net["conv"] = GridConvCNP(cfg.grid_size, cfg.channels, cfg.conv_layers, cfg.kernel_size)
        elif features != 1:
            raise ConfigError(
                f"algo=convcnp takes 1-D inputs or an image's pixel coordinates, not "
                f"{features}-D ones"
            )
        else:
            net["conv"] = ConvCNPNet(
                tuple(cfg.grid_range),
                cfg.points_per_unit,
                cfg.channels,
                cfg.conv_layers,
                cfg.kernel_size,
            )
    else:
        if cfg.deterministic:
            net["encoder"] = mlp([features + 1] + [d] * cfg.layers)
        if cfg.attention:
            net["embed"] = mlp([features, d, d])
            net["attention"] = CrossAttention(d, cfg.heads)
        if cfg.latent:
            net["latent"] = LatentEncoder(features + 1, d, cfg.layers)
        paths = d * (cfg.deterministic + cfg.latent)
        net["decoder"] = mlp([features + paths] + [d] * (cfg.layers - 1) + [2])
    return net
