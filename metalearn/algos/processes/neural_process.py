"""Neural processes: a network maps a context set to a predictive distribution at any input.

- `cnp` (Garnelo et al. 2018a): an MLP encodes each (x, y) context pair, the mean of the codes
  conditions an MLP decoder that outputs a Gaussian mean and std at each target input.
- `acnp` (the deterministic path of Kim et al. 2019, the NPF's AttnCNP): each target attends
  to the context codes (multi-head cross-attention, a transformer block) instead of their mean.
- `np` (Garnelo et al. 2018b, the NPF's LNP): a global latent z ~ q(z | context) conditions the
  decoder; trained with the ELBO (`algo.objective=elbo`: z from q(z | context and targets), a KL
  to q(z | context)) or with the maximum-likelihood objective (`ml`, Foong et al. 2020: the log
  of the mean likelihood over `algo.train_samples` draws of z from q(z | context)).
- `anp` (Kim et al. 2019): the attentive deterministic path and the latent path together.
- `convcnp` (Gordon et al. 2020): translation-equivariant; a SetConv puts the context on a
  uniform grid (density and data channels), a residual CNN, a SetConv back to the targets.

Every one is scored by its predictive log-likelihood of the targets given the context, per
target point (`metric: loglik` in results.json, higher is better). Latent models are scored
with the NPF's estimator: log of the mean over `algo.test_samples` draws of z from
q(z | context) of the targets' likelihood, divided by the number of targets. Evaluation also
reports the MSE of the predictive mean and the coverage of the central 90% predictive interval.

The image network slot (`model=`) is the features of x every path reads (`model=identity`, the
default for data=gp: x itself; ConvCNP reads x itself and needs model=identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metalearn.algos.learner import AlgoConfig, Learner
from metalearn.algos.metric.episodic import check_outer_lr
from metalearn.algos.processes.networks import (
    build_networks,
    context_mask,
    gaussian,
    masked_mean,
    per_point_loglik,
)
from metalearn.data.images.completion import CompletionConfig
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError
from metalearn.models.mlp import Identity

OBJECTIVES = ("elbo", "ml")


@dataclass
class NeuralProcessConfig(AlgoConfig):
    """Which paths the process has, the sizes of its networks and its training objective."""

    name: str = "cnp"  # 'cnp', 'acnp', 'np', 'anp' or 'convcnp'
    VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {
        "acnp": {"attention": True},
        "np": {"latent": True, "deterministic": False},
        "anp": {"latent": True, "attention": True},
        "convcnp": {"convolutional": True, "outer_lr": 3e-4},
    }
    outer_lr: float = 5e-4  # Adam step size
    train_query: int | None = None  # target points per training task (None: data.query)
    deterministic: bool = True  # a deterministic path (mean of the context codes, or attention)
    attention: bool = False  # the deterministic path attends (acnp, anp)
    latent: bool = False  # a global latent variable z (np, anp)
    convolutional: bool = False  # ConvCNP
    objective: str = "elbo"  # latent models: 'elbo' or 'ml'
    hidden: int = 128  # width of every MLP and of the latent variable
    layers: int = 3  # layers of the encoders and of the decoder
    heads: int = 8  # attention heads
    train_samples: int = 16  # draws of z per task for the ml objective (elbo: 1)
    test_samples: int = 32  # draws of z per task for the test log-likelihood
    points_per_unit: int = 32  # ConvCNP: grid density
    channels: int = 64  # ConvCNP: CNN channels
    conv_layers: int = 6  # ConvCNP: residual convolution layers
    kernel_size: int = 11  # ConvCNP: convolution width (odd)
    grid_range: list[float] | None = None  # ConvCNP: inputs its grid spans (None: data.x_range)
    grid_size: int | None = None  # ConvCNP on images: pixels per side (None: data.image_size)

    def train_shape(self) -> tuple[int | None, int | None, int | None]:
        return None, None, self.train_query

    def __post_init__(self) -> None:
        check_outer_lr(self)
        for key in (
            "hidden",
            "layers",
            "heads",
            "train_samples",
            "test_samples",
            "points_per_unit",
            "channels",
            "conv_layers",
            "kernel_size",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"algo.{key} must be positive, got {getattr(self, key)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"algo.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"
            )
        if self.hidden % self.heads:
            raise ConfigError(
                f"algo.hidden ({self.hidden}) must be a multiple of algo.heads ({self.heads})"
            )
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"algo.kernel_size must be odd, got {self.kernel_size}")
        if self.convolutional and (self.latent or self.attention):
            raise ConfigError(
                "algo.convolutional (ConvCNP) has no latent or attentive path: set "
                "algo.latent=false and algo.attention=false"
            )
        if not (self.deterministic or self.latent or self.convolutional):
            raise ConfigError(
                "a neural process needs a path from the context to the decoder: set "
                "algo.deterministic=true or algo.latent=true"
            )
        if self.attention and not self.deterministic:
            raise ConfigError(
                "algo.attention is the deterministic path's: set algo.deterministic=true"
            )

    def check_data(self, data: Any) -> None:
        if data.task_kind != "regression":
            raise ConfigError(
                f"algo={self.name} predicts a Gaussian over real values; pick a regression data "
                f"set (data=gp or sinusoid), not data={data.name}"
            )
        if self.convolutional and self.grid_range is None:  # set here: results.json shows it
            self.grid_range = list(data.x_range)
        if self.convolutional and isinstance(data, CompletionConfig) and self.grid_size is None:
            self.grid_size = data.image_size  # the on-the-grid ConvCNP


class NeuralProcess(Learner):
    """The context set's forward pass is the inner loop; nothing adapts per task."""

    family = "processes"
    pretrains = False
    needs_train_classes = False
    needs_ways = False
    needs_head = False  # the model is x's features
    reinforcement = False
    optimizees = False
    batches_tasks = False
    differentiates_inner_loop = False
    inner_loop = False
    first_order_switch = False
    checkpoint_switch = False
    outer_schedule = "constant"
    compiled = "meta_loss"
    metric = "loglik"
    predictive = True
    variable_context = True

    def __init__(self, cfg: NeuralProcessConfig, model: nn.Module, kind: str, task_batching: str):
        if kind != "regression":
            raise ConfigError(f"algo={cfg.name} predicts real values; pick data=gp or sinusoid")
        self.cfg, self.model, self.kind = cfg, model, kind
        if cfg.convolutional and not isinstance(model, Identity):
            raise ConfigError(
                f"algo=convcnp puts x itself on its grid; pass model=identity (got "
                f"model={type(model).__name__.lower()})"
            )
        net = build_networks(cfg, model.embedding_dim)
        anchor = next(iter([*model.parameters(), *model.buffers()]), torch.empty(0))
        self.net = net.to(anchor.device)

    # -- the predictive distribution -------------------------------------------------------
    def _features(self, x: Tensor) -> Tensor:
        t, n = x.shape[:2]
        return self.model(x.flatten(0, 1)).view(t, n, self.model.embedding_dim)

    def distribution(
        self, context: Split, mask: Tensor, xt: Tensor, samples: int, targets: Split | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Mean and std (S, T, Q) at target inputs xt (T, Q, 1) given the context; latent
        models draw S values of z from q(z | context), or, with `targets` (the ELBO), from
        q(z | context and targets) and return the KL to q(z | context) per task (T,)."""
        cfg = self.cfg
        if cfg.convolutional:
            mean, std = self.net["conv"](context.x, context.y, mask, xt)
            return mean[None], std[None], None
        fc, ft = self._features(context.x), self._features(xt)
        xy = torch.cat([fc, context.y], -1)
        t, q = xt.shape[:2]
        parts = []
        if cfg.deterministic:
            r = self.net["encoder"](xy)  # (T, C, D)
            if cfg.attention:
                embed = self.net["embed"]
                r_t = self.net["attention"](embed(ft), embed(fc), r, mask)
            else:
                r_t = masked_mean(r, mask)[:, None].expand(t, q, -1)
            parts.append(r_t[None].expand(samples, -1, -1, -1))
        kl = None
        if cfg.latent:
            prior = self.net["latent"](xy, mask)
            if targets is None:
                z = prior.rsample((samples,))  # (S, T, D)
            else:
                both = torch.cat([xy, torch.cat([self._features(targets.x), targets.y], -1)], 1)
                everything = torch.cat(
                    [mask, torch.ones_like(targets.y[..., 0], dtype=torch.bool)], 1
                )
                posterior = self.net["latent"](both, everything)
                z = posterior.rsample((samples,))
                kl = torch.distributions.kl_divergence(posterior, prior).sum(-1)
            parts.append(z[:, :, None].expand(-1, -1, q, -1))
        h = torch.cat([ft[None].expand(samples, -1, -1, -1), *parts], -1)
        mean, std = gaussian(self.net["decoder"](h))
        return mean, std, kl

    def _samples(self, training: bool) -> int:
        if not self.cfg.latent:
            return 1
        if training:
            return self.cfg.train_samples if self.cfg.objective == "ml" else 1
        return self.cfg.test_samples

    def loglik(self, batch: TaskBatch, training: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """(T,) each task's objective per target point: the log-likelihood (conditional
        models, and latent ones outside ELBO training) or the ELBO; and the predictions."""
        elbo = training and self.cfg.latent and self.cfg.objective == "elbo"
        targets = batch.query if elbo else None
        mean, std, kl = self.distribution(
            batch.support, context_mask(batch), batch.query.x, self._samples(training), targets
        )
        return per_point_loglik(mean, std, batch.query.y[..., 0], kl), {"mean": mean, "std": std}

    # -- the learner protocol ----------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return [*self.model.parameters(), *self.net.parameters()]

    def meta_loss(self, batch: TaskBatch, iteration: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        value, pred = self.loglik(batch, training=True)
        loss = -value.mean()
        mse = ((pred["mean"].mean(0) - batch.query.y[..., 0]) ** 2).mean()
        return loss, {"loss": loss, "score": value.mean().detach(), "mse": mse.detach()}

    def evaluate(self, batch: TaskBatch, steps: list[int]) -> dict[str, Tensor]:
        """Per task (T, 1): the negative log-likelihood per point ("loss"), the log-likelihood
        ("score"), the MSE of the predictive mean and the 90% interval's coverage."""
        with torch.no_grad():
            value, pred = self.loglik(batch, training=False)
            yt = batch.query.y[..., 0]
            mean, std = pred["mean"], pred["std"]
            mse = ((mean.mean(0) - yt) ** 2).mean(-1)
            # the mixture's CDF at y: inside the central 90% interval when in [0.05, 0.95]
            cdf = torch.distributions.Normal(mean, std).cdf(yt).mean(0)
            coverage = ((cdf >= 0.05) & (cdf <= 0.95)).float().mean(-1)
        columns = {"loss": -value, "score": value, "mse": mse, "coverage90": coverage}
        return {k: v.float()[:, None] for k, v in columns.items()}

    def predict_distribution(self, support: Split, query_x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std (Q,) of one task's predictive at query_x (Q, 1), moment-matched over
        the draws of z for latent models."""
        with torch.no_grad():
            mask = torch.ones(support.x.shape[:1], dtype=torch.bool, device=support.x.device)
            context = Split(support.x[None], support.y[None])
            mean, std, _ = self.distribution(
                context, mask[None], query_x[None], self._samples(False)
            )
            mixture_mean = mean.mean(0)
            variance = (std**2 + mean**2).mean(0) - mixture_mean**2
            return mixture_mean[0], variance.clamp_min(0).sqrt()[0]

    def predict(self, support: Split, query_x: Tensor, steps: int | None = None) -> Tensor:
        """The predictive mean (Q, 1) at query_x; `steps` does not apply (no inner loop)."""
        return self.predict_distribution(support, query_x)[0][:, None]

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "net": self.net.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.net.load_state_dict(state["net"])

    def memory_advice(self) -> tuple[str, list[str], list[str]]:
        before = ["algo.test_samples"] if self.cfg.latent else []
        if self.cfg.convolutional:
            before += ["algo.points_per_unit", "algo.channels"]
        return f"{self.cfg.name} (a neural process)", before, ["algo.hidden"]
