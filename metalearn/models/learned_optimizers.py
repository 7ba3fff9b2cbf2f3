"""Learned optimisers: networks that map an optimizee's gradients to its parameters' updates.

Both are coordinatewise (one small network shared by every coordinate of every tensor) and
functional: `init_state(params)` gives the per-coordinate memory, and `forward(params, grads,
state)` returns the new parameters and memory, so an unroll is differentiable end to end and
`torch.func.functional_call` can run them with perturbed weights (ES, PES).

- `LSTMOptimizer`: Andrychowicz et al. (2016), a two-layer LSTM of 20 units per coordinate on the
  gradient, raw or preprocessed by LogAndSign (k = 5), whose linear output times `scale` is added
  to the parameter (deepmind/learning-to-learn, networks.py `CoordinateWiseDeepLSTM`: truncated-
  normal weights of std 1/sqrt(fan-in), a forget-gate bias of 1, zero initial state). `base_lr`
  adds -base_lr * gradient (0: the paper's network); with the output weights at zero it is plain
  SGD, which the tests use to check the unroll step for step against torch.optim.SGD.
- `MLPOptimizer`: learned_optimization's `mlp_lopt` (mlp_lopt.py): the gradient, the parameter
  and six momenta, each divided by its root mean square over the tensor, and eleven features of
  the step count, into an MLP 19-32-32-2 whose outputs give the step as
  direction * exp(magnitude * exp_mult) * step_mult, subtracted.

Params, grads and state are dicts of tensors whose first dimension is the problem (T problems
unrolled together); the networks never mix coordinates, so the dimension is only carried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from metalearn.errors import CheckpointError, ConfigError

PREPROCESSING = ("none", "log_sign")
EPS = torch.finfo(torch.float32).eps


@dataclass
class LSTMOptimizerConfig:
    """The coordinatewise LSTM optimiser (see the module docstring)."""

    name: str = "lstm_optimizer"
    hidden: int = 20  # units per LSTM layer
    layers: int = 2
    preprocess: str = "log_sign"  # 'none' (the raw gradient) or 'log_sign' (LogAndSign)
    k: float = 5.0  # LogAndSign's k
    scale: float = 0.01  # the network's output times scale is the update
    base_lr: float = 0.0  # adds -base_lr * gradient to the update (0: the paper's network)

    def __post_init__(self) -> None:
        if self.preprocess not in PREPROCESSING:
            raise ConfigError(
                f"model.preprocess must be one of {', '.join(PREPROCESSING)}, got "
                f"{self.preprocess!r}"
            )
        if self.hidden < 1 or self.layers < 1:
            raise ConfigError("model.hidden and model.layers must be >= 1")
        if not (self.k > 0 and self.scale > 0 and self.base_lr >= 0):
            raise ConfigError("model.k and model.scale must be > 0, model.base_lr >= 0")


def log_and_sign(g: Tensor, k: float) -> Tensor:
    """(N,) gradients -> (N, 2): [max(log(|g| + eps) / k, -1), clamp(g * e^k, -1, 1)]
    (Andrychowicz et al. 2016, appendix A; preprocess.py `LogAndSign`, clamped from below only):
    magnitude and sign on comparable scales."""
    log = torch.clamp(torch.log(g.abs() + EPS) / k, min=-1.0)
    sign = torch.clamp(g * math.exp(k), -1.0, 1.0)
    return torch.stack([log, sign], dim=-1)


def truncated_normal(linear: nn.Linear) -> None:
    """Weights and bias ~ N(0, 1/fan_in) truncated at two standard deviations (Sonnet's and
    Haiku's default linear initialisation)."""
    std = 1 / math.sqrt(linear.in_features)
    nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.trunc_normal_(linear.bias, std=std, a=-2 * std, b=2 * std)


class SettingsInState:
    """Saves the settings that define the optimiser's function beside its weights (nn.Module's
    extra state), and refuses weights trained under other settings: an LSTM trained on LogAndSign
    features is a different function of the raw gradient, even where the shapes agree."""

    SETTINGS: tuple[str, ...] = ()
    cfg: object

    def get_extra_state(self) -> dict:
        return {key: getattr(self.cfg, key) for key in self.SETTINGS}

    def set_extra_state(self, state: dict) -> None:
        ours = self.get_extra_state()
        differ = {k: (v, ours.get(k)) for k, v in state.items() if ours.get(k) != v}
        if differ:
            saved = " ".join(f"model.{k}={v[0]}" for k, v in differ.items())
            asked = " ".join(f"model.{k}={v[1]}" for k, v in differ.items())
            raise CheckpointError(
                f"this learned optimiser was trained with {saved} and the run asks for {asked}; "
                f"use the checkpoint's settings (drop those overrides) or train one with yours"
            )


def flatten(tensors: dict[str, Tensor]) -> Tensor:
    """Every coordinate of every tensor, problem by problem: (N,)."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten(flat: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = flat[offset : offset + t.numel()].view_as(t)
        offset += t.numel()
    return out


class LSTMOptimizer(SettingsInState, nn.Module):
    """Coordinatewise LSTM optimiser (Andrychowicz et al. 2016)."""

    SETTINGS = ("preprocess", "k", "scale", "base_lr", "hidden", "layers")

    convolutional = False
    recurrent = False
    learned_optimizer = True

    def __init__(
        self, cfg: LSTMOptimizerConfig, in_shape: tuple[int, ...], out_features: int, **_: bool
    ) -> None:
        super().__init__()
        self.cfg = cfg
        features = 2 if cfg.preprocess == "log_sign" else 1
        sizes = [features] + [cfg.hidden] * cfg.layers
        pairs = zip(sizes, sizes[1:], strict=False)
        self.cells = nn.ModuleList(nn.LSTMCell(a, b) for a, b in pairs)
        self.out = nn.Linear(cfg.hidden, 1)
        with torch.no_grad():
            for cell in self.cells:  # one (in + hidden) x 4 hidden matrix in the reference
                std = 1 / math.sqrt(cell.input_size + cell.hidden_size)
                for weight in (cell.weight_ih, cell.weight_hh):
                    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
                nn.init.trunc_normal_(cell.bias_ih, std=std, a=-2 * std, b=2 * std)
                cell.bias_hh.zero_()
                cell.bias_hh[cell.hidden_size : 2 * cell.hidden_size] = 1.0  # forget gate
            truncated_normal(self.out)

    def init_state(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        n = sum(p.numel() for p in params.values())
        device, dtype = next(iter(params.values())).device, self.out.weight.dtype
        zeros = torch.zeros(n, self.cfg.hidden, device=device, dtype=dtype)
        return {f"{kind}{i}": zeros for i in range(self.cfg.layers) for kind in ("h", "c")}

    def forward(
        self, params: dict[str, Tensor], grads: dict[str, Tensor], state: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        g = flatten(grads)
        x = log_and_sign(g, self.cfg.k) if self.cfg.preprocess == "log_sign" else g[:, None]
        new_state = {}
        for i, cell in enumerate(self.cells):
            h, c = cell(x, (state[f"h{i}"], state[f"c{i}"]))
            new_state[f"h{i}"], new_state[f"c{i}"] = h, c
            x = h
        update = self.cfg.scale * self.out(x).squeeze(-1)
        if self.cfg.base_lr:
            update = update - self.cfg.base_lr * g
        step = unflatten(update, params)
        return {name: p + step[name] for name, p in params.items()}, new_state


TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)  # mlp_lopt's


@dataclass
class MLPOptimizerConfig:
    """learned_optimization's `mlp_lopt` (see the module docstring)."""

    name: str = "mlp_optimizer"
    hidden: int = 32  # units per hidden layer
    layers: int = 2  # hidden layers
    decays: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9, 0.99, 0.999, 0.9999])
    step_mult: float = 0.001
    exp_mult: float = 0.001

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.layers < 1:
            raise ConfigError("model.hidden and model.layers must be >= 1")
        if not all(0 <= d < 1 for d in self.decays):
            raise ConfigError(f"model.decays must lie in [0, 1), got {self.decays}")
        if not (self.step_mult > 0 and self.exp_mult > 0):
            raise ConfigError("model.step_mult and model.exp_mult must be > 0")


class MLPOptimizer(SettingsInState, nn.Module):
    """learned_optimization's per-parameter MLP learned optimiser (mlp_lopt.MLPLOpt)."""

    SETTINGS = ("decays", "step_mult", "exp_mult", "hidden", "layers")

    convolutional = False
    recurrent = False
    learned_optimizer = True

    def __init__(
        self, cfg: MLPOptimizerConfig, in_shape: tuple[int, ...], out_features: int, **_: bool
    ) -> None:
        super().__init__()
        self.cfg = cfg
        features = 2 + len(cfg.decays) + len(TIMESCALES)
        sizes = [features] + [cfg.hidden] * cfg.layers
        layers: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.Linear(cfg.hidden, 2))
        with torch.no_grad():
            for layer in self.body:
                if isinstance(layer, nn.Linear):
                    truncated_normal(layer)
                    layer.bias.zero_()  # Haiku's zero biases
        self.register_buffer("decays", torch.tensor(cfg.decays), persistent=False)
        timescales = torch.tensor(TIMESCALES, dtype=torch.float32)
        self.register_buffer("timescales", timescales, persistent=False)

    def init_state(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        state = {name: p.new_zeros(*p.shape, len(self.cfg.decays)) for name, p in params.items()}
        return state | {"iteration": torch.zeros((), device=self.decays.device)}

    def forward(
        self, params: dict[str, Tensor], grads: dict[str, Tensor], state: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        t = state["iteration"]
        time = torch.tanh(t / self.timescales - 1)  # (11,)
        new_params, new_state = {}, {"iteration": t + 1}
        for name, p in params.items():
            g = grads[name]
            m = state[name] * self.decays + (1 - self.decays) * g[..., None]  # (T, ..., D)
            x = torch.cat([g[..., None], p[..., None], m], dim=-1)
            # each feature divided by its root mean square over the tensor, problem by problem
            dims = tuple(range(1, x.dim() - 1))  # none for a scalar: itself, as mlp_lopt's [1]
            square = x.pow(2).mean(dim=dims, keepdim=True) if dims else x.pow(2)
            x = x * torch.rsqrt(1e-5 + square)
            x = torch.cat([x, time.to(x.dtype).expand(*x.shape[:-1], -1)], dim=-1)
            direction, magnitude = self.body(x).unbind(-1)
            step = direction * torch.exp(magnitude * self.cfg.exp_mult) * self.cfg.step_mult
            new_params[name], new_state[name] = p - step, m
        return new_params, new_state
