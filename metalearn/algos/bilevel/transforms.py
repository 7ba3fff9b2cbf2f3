"""MAML with a meta-learned transform of each layer's inner step: T-Net, MT-Net, Meta-Curvature.

One hook in the functional inner loop (inner.py) serves the whole family; what differs is the map
and where it acts, per layer, meta-learned with the initialisation and used at test alike:

- `identity`: g -> g, MAML itself (a check of the hook: its meta-gradient equals MAML's).
- `tnet` (Lee & Choi 2018, T-Net): each layer's output passes through a learned linear map T
  (out x out, identity at start; a 1x1 convolution for a Conv2d), y = T (W x + b), as in the
  authors' `forward_fc_withT`/`forward_conv_withT` (yoonholee/MT-net). Only W and b adapt, so
  the inner step on W is preconditioned by T^T T through the forward pass. Here T is folded
  into the weights the forward pass sees (T W, T b: the same function, exactly).
- `mtnet` (MT-Net): T-Net plus a learned binary mask over each layer's output units (rows of
  W and b) saying which of them adapt: W <- W - alpha (M * grad). The mask is drawn per task
  from Bernoulli(sigmoid(zeta)) by the straight-through Gumbel-softmax estimator at
  temperature `mask_temperature`, zeta starting at `mask_logit_init`, as their `share_M`
  (temperature 1, logit 0). They draw it at test too (`test_mask=sample`); `test_mask=mode`
  adapts the units with zeta >= 0 instead, for a deterministic test.
- `metacurvature` (Park & Oliva 2019): the gradient of a layer's weight is multiplied along
  each mode by a learned matrix, M_o G M_i for a Linear and the three mode products
  (out x out, in x in, k^2 x k^2) of the convolutional form, and a bias's gradient
  elementwise, all identity at start; as learn2learn's MetaCurvatureTransform.

Layers: every Linear and Conv2d of the model unless `algo.layers` names some (Meta-Curvature
also takes a BatchNorm layer's weight and bias, elementwise). Parameters of other layers
(BatchNorm's, by default) adapt with the plain gradient, as under MAML.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metalearn.algos.bilevel.base import Bilevel, BilevelConfig
from metalearn.algos.bilevel.inner import Params
from metalearn.errors import ConfigError
from metalearn.models.layers import TaskBatchNorm2d

# the layer types each transform acts on, and the ones it takes when algo.layers is null
SUPPORTED: dict[str, tuple[type, ...]] = {
    "identity": (nn.Module,),
    "tnet": (nn.Linear, nn.Conv2d),
    "mtnet": (nn.Linear, nn.Conv2d),
    "metacurvature": (nn.Linear, nn.Conv2d, TaskBatchNorm2d),
}
DEFAULT_LAYERS = (nn.Linear, nn.Conv2d)
TEST_MASKS = ("sample", "mode")


@dataclass
class TransformConfig(BilevelConfig):
    """MAML's settings, the transform, the layers it acts on and MT-Net's mask."""

    name: str = "tnet"
    transform: str = "tnet"  # identity | tnet | mtnet | metacurvature
    test_inner_steps: int | None = 3  # as MAML's (None: inner_steps)
    layers: list[str] | None = None  # model layers transformed (None: every Linear and Conv2d)
    mask_temperature: float = 1.0  # MT-Net's Gumbel-softmax temperature (theirs: 1)
    mask_logit_init: float = 0.0  # MT-Net's initial mask logit zeta (theirs: 0, P(adapt) 0.5)
    test_mask: str = "sample"  # MT-Net at test: draw the mask (theirs) or 'mode' (zeta >= 0)
    VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {
        "mtnet": {"transform": "mtnet"},
        "metacurvature": {"transform": "metacurvature"},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.transform not in SUPPORTED:
            raise ConfigError(
                f"algo.transform must be one of {', '.join(SUPPORTED)}, got {self.transform!r}"
            )
        if self.transform not in ("identity", self.name):
            raise ConfigError(
                f"algo={self.name} is transform={self.name}; pick algo={self.transform} for "
                f"{self.transform} (algo.transform=identity is allowed under any name, as MAML)"
            )
        if self.layers is not None and not self.layers:
            raise ConfigError(
                "algo.layers is empty: a transform (or MT-Net mask) over no layer leaves MAML; "
                "name at least one layer, or null for every Linear and Conv2d layer"
            )
        if not self.mask_temperature > 0:
            raise ConfigError(f"algo.mask_temperature must be > 0, got {self.mask_temperature}")
        if self.test_mask not in TEST_MASKS:
            raise ConfigError(f"algo.test_mask must be one of {TEST_MASKS}, got {self.test_mask!r}")


def chosen_layers(model: nn.Module, transform: str, names: list[str] | None) -> list[str]:
    """The model layers `transform` acts on; a clear error for one it cannot take."""
    modules = dict(model.named_modules())
    if names is None:
        chosen = [n for n, m in modules.items() if isinstance(m, DEFAULT_LAYERS)]
        if transform != "identity" and not chosen:
            raise ConfigError(f"model {type(model).__name__} has no Linear or Conv2d layer")
        return chosen
    for name in names:
        if name not in modules or not name:
            layers = [
                n
                for n, m in modules.items()
                if n and next(m.parameters(recurse=False), None) is not None
            ]
            raise ConfigError(
                f"algo.layers names {name!r}, which model {type(model).__name__} does not have;"
                f" its layers with parameters: {', '.join(layers)}"
            )
        module = modules[name]
        if not isinstance(module, SUPPORTED[transform]):
            kind = type(module).__name__
            takes = ", ".join(t.__name__ for t in SUPPORTED[transform])
            others = [t for t, types in SUPPORTED.items() if isinstance(module, types)]
            raise ConfigError(
                f"algo.layers names {name} ({kind}), which transform={transform} does not "
                f"support (it takes {takes}); transforms that support a {kind}: "
                f"{', '.join(others)}"
            )
    return list(names)


def transform_parameters(model: nn.Module, transform: str, layers: list[str], logit: float):
    """The meta-learned tensors of `transform` on `layers`, named '<factor>.<layer>': T (tnet,
    mtnet), mask logits (mtnet), Meta-Curvature's factors: out, in, filter, bias, weight."""
    modules, out = dict(model.named_modules()), {}
    for name in layers:
        weight = modules[name].weight.detach()
        rows = weight.shape[0]
        if transform in ("tnet", "mtnet"):
            out[f"T.{name}"] = torch.eye(rows).to(weight)
        if transform == "mtnet":
            out[f"mask.{name}"] = torch.full((rows,), logit).to(weight)
        if transform == "metacurvature":
            if weight.dim() == 1:  # BatchNorm: elementwise, as a bias
                out[f"weight.{name}"] = torch.ones_like(weight)
            else:
                out[f"out.{name}"] = torch.eye(rows).to(weight)
                out[f"in.{name}"] = torch.eye(weight.shape[1]).to(weight)
            if weight.dim() == 4:
                out[f"filter.{name}"] = torch.eye(weight[0, 0].numel()).to(weight)
            if getattr(modules[name], "bias", None) is not None:
                out[f"bias.{name}"] = torch.ones(rows).to(weight)
    return {k: nn.Parameter(v) for k, v in out.items()}


def t_weights(params: Params, maps: dict[str, Tensor]) -> Params:
    """T-Net's forward weights: y = T (W x + b) is the layer with weights T W and bias T b."""
    out = dict(params)
    for layer, t in maps.items():
        weight = params[f"{layer}.weight"]
        out[f"{layer}.weight"] = (t @ weight.flatten(1)).view_as(weight)  # (out, in[, k, k])
        if f"{layer}.bias" in params:
            out[f"{layer}.bias"] = t @ params[f"{layer}.bias"]
    return out


def sample_mask(logits: Tensor, temperature: float) -> Tensor:
    """A {0, 1} mask with P(1) = sigmoid(logits), differentiable by the straight-through
    Gumbel-softmax: softmax([zeta + g1, g2] / tau)[0] = sigmoid((zeta + l) / tau), l = g1 - g2
    logistic; forward the hard value, backward the soft one's gradient (MT-Net's estimator)."""
    u = torch.rand_like(logits).clamp(1e-20, 1 - 1e-7)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())


def masked(grads: Params, masks: dict[str, Tensor]) -> Params:
    """MT-Net's step direction: each layer's weight and bias gradients, row by row (one row
    per output unit), times that unit's mask."""
    out = dict(grads)
    for layer, mask in masks.items():
        for key in (f"{layer}.weight", f"{layer}.bias"):
            if key in grads:
                g = grads[key]
                out[key] = g * mask.view(-1, *[1] * (g.dim() - 1))
    return out


def curvature(grads: Params, factors: dict[str, Tensor], layers: list[str]) -> Params:
    """Meta-Curvature's step direction (Park & Oliva 2019, eq. 4-6): every mode of a layer's
    weight gradient times its learned matrix, a bias (or BatchNorm weight) elementwise."""
    out = dict(grads)
    for layer in layers:
        g = grads[f"{layer}.weight"]
        if g.dim() == 1:
            out[f"{layer}.weight"] = factors[f"weight.{layer}"] * g
        elif g.dim() == 2:  # M_o G M_i
            out[f"{layer}.weight"] = factors[f"out.{layer}"] @ g @ factors[f"in.{layer}"]
        else:  # (out, in, k, k): G x_1 M_o x_2 M_i^T x_3 M_f, learn2learn's convention
            g3 = g.flatten(2)  # (out, in, k*k)
            m_o, m_i, m_f = (factors[f"{f}.{layer}"] for f in ("out", "in", "filter"))
            u = torch.einsum("oa,abc,bi,fc->oif", m_o, g3, m_i, m_f)
            out[f"{layer}.weight"] = u.reshape(g.shape)
        if f"{layer}.bias" in grads:
            out[f"{layer}.bias"] = factors[f"bias.{layer}"] * grads[f"{layer}.bias"]
    return out


class GradientTransform(Bilevel):
    """MAML whose inner steps go through a meta-learned per-layer transform (module docstring)."""

    vmap_randomness = "different"  # MT-Net draws one mask per task, under vmap too

    def __init__(self, cfg: TransformConfig, model: nn.Module, kind: str, task_batching: str):
        if cfg.checkpoint and cfg.transform == "mtnet":
            raise ConfigError(
                "algo=mtnet draws its masks in the forward pass; algo.checkpoint would draw "
                "others when it recomputes the inner loop in backward: set algo.checkpoint=false"
            )
        super().__init__(cfg, model, kind, task_batching)
        self.layers = chosen_layers(model, cfg.transform, cfg.layers)
        self.meta = transform_parameters(model, cfg.transform, self.layers, cfg.mask_logit_init)

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        return self.meta

    def _factors(self, prefix: str) -> dict[str, Tensor]:
        """The meta-parameters '<prefix>.<layer>' by layer (detached at test: no outer graph)."""
        return {
            k.removeprefix(prefix + "."): v.detach() if self.testing else v
            for k, v in self.meta.items()
            if k.startswith(prefix + ".")
        }

    def _masks(self) -> dict[str, Tensor]:
        logits = self._factors("mask")
        if self.testing and self.cfg.test_mask == "mode":
            return {k: (z >= 0).to(z.dtype) for k, z in logits.items()}
        return {k: sample_mask(z, self.cfg.mask_temperature) for k, z in logits.items()}

    def _forward_map(self) -> Callable[[Params], Params] | None:
        if self.cfg.transform not in ("tnet", "mtnet"):
            return None
        maps = self._factors("T")
        return lambda params: t_weights(params, maps)

    def inner_options(self, training: bool) -> dict[str, Any]:
        options = super().inner_options(training)
        transform = self.cfg.transform
        options["reparametrize"] = self._forward_map()
        if transform == "mtnet":
            masks = self._masks()  # one draw per task, for every step of its inner loop
            options["transform"] = lambda grads, step: masked(grads, masks)
        elif transform == "metacurvature":
            factors = {k: v.detach() if self.testing else v for k, v in self.meta.items()}
            options["transform"] = lambda grads, step: curvature(grads, factors, self.layers)
        return options

    def query_forward(self, params: Params, buffers: Params, x: Tensor, step: int) -> Tensor:
        forward_map = self._forward_map()
        if forward_map is not None:
            params = forward_map(params)
        return super().query_forward(params, buffers, x, step)
