"""WarpGrad (Flennerhag et al., ICLR 2020): warp layers interleaved with the task layers, fixed
in the inner loop and meta-learned on task-parameter points replayed from a buffer (Algorithm 2).

The network is the task model (conv4 or an MLP) with a warp layer after its hidden blocks
(`warp.<i>`): the inner loop adapts the task layers (`task.*`) only, by plain SGD, through
`adapt_steps(adapted=...)`; the warp layers enter its forward pass unchanged and so precondition
the task layers' gradients (section 3: the gradient of a task layer is taken through the fixed
warp layers above it). Evaluation adapts the same way.

One meta-batch, as the authors' code (flennerhag/warpgrad: src/warpgrad/warpgrad/updaters.py,
`DualUpdater` with `warp_on_same_loss` and `simplified_leap`; src/omniglot/model.py,
`WarpedOmniConv` and `WarpLayer`; src/omniglot/main.py for the settings):

1. Each task's inner loop runs K steps from the initialisation theta_0 under no_grad: no graph
   through it. The points theta_0 .. theta_{K-1} it stepped from go into the replay buffer, each
   with its task's episode.
2. The warp parameters phi are meta-trained on points replayed from the buffer with the warp
   objective (eq. 6/7): for a stored point theta, L_query(theta - alpha grad L_support(theta;
   phi); phi). theta is a constant, so the gradient reaches phi through the one warped step and
   the query loss, never through the trajectory that led to theta.
3. The initialisation is meta-learned from the same trajectories (`init_objective`): `leap`, the
   authors' Omniglot choice (`simplified_leap`: Leap's gradient without its loss term),
   G = mean_tasks sum_k (theta_k - theta_{k+1}) / ||theta_k - theta_{k+1}||; `reptile`, the same
   unnormalised, mean(theta_0 - theta_K); `fomaml`, the query-loss gradient at theta_K (first-order
   MAML); `none`, a fixed initialisation.

How the two updates fit one outer optimiser over `parameters()`: a meta-batch's first objective
is <theta_0 - stopgrad(theta_0), G> (value 0, gradient G on the task layers, nothing on phi)
plus warp_lr / outer_lr times the mean warp objective over the first replayed mini-batch (gradient
on phi only: the replayed points are constants). `meta_losses` then yields a warp-only objective
for each further warp step (the task layers get no gradient, so the optimiser leaves them). With
plain SGD, the authors' outer optimiser, the warp layers step by warp_lr and the initialisation
by outer_lr, their two parameter groups (Adam would normalise the ratio away: refused).

Where this departs from the authors' code: episodes instead of Leap's alphabet tasks, so the warp
objective steps on the support set and scores on the query set (theirs: two fresh training
batches of the task); Leap's gradient sums all K segments (their buffer holds the weights before
each step, which leaves the last segment out); BatchNorm normalises with each batch's own
statistics, as in the rest of the family (theirs: running statistics reset for every task); the
buffer is not saved in checkpoints (by default it holds one meta-batch's points, as theirs, so a
resumed run loses nothing).

Over 300 lines because the warped network, the replay buffer and the two updates of Algorithm 2
are one algorithm, read beside the account above of where it follows the authors' code.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metalearn.algos.bilevel.base import Bilevel, BilevelConfig
from metalearn.algos.bilevel.inner import Params, adapt_steps
from metalearn.algos.bilevel.reptile import mini_batch_stream
from metalearn.algos.learner import OuterOptimizer
from metalearn.algos.objectives import score
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError
from metalearn.models.conv4 import Conv4
from metalearn.models.layers import TaskBatchNorm2d

INIT_OBJECTIVES = ("leap", "reptile", "fomaml", "none")
LEAP_EPS = 1e-9  # added to each segment's length (the authors' global_norm)


@dataclass
class WarpGradConfig(BilevelConfig):
    """The family's settings, the warp layers, and the replay of Algorithm 2."""

    name: str = "warpgrad"
    inner_lr: float = 0.1  # alpha: the inner SGD step (the authors' Omniglot: 0.1)
    inner_steps: int = 5  # K: inner steps per task in meta-training
    first_order: bool = True  # no meaning here: no graph is kept through the inner loop
    outer_lr: float = 0.1  # the initialisation's meta-learning rate (the authors': SGD, 0.1)
    outer_optimizer: str = "sgd"  # 'sgd' (the authors') or 'adam' (then warp_lr must be null)
    warp_lr: float | None = None  # the warp layers' meta-learning rate (None: outer_lr)
    warp_steps: int | None = None  # warp updates per meta-batch (None: one pass over the buffer)
    warp_batch: int | None = 1  # replayed points per warp update (None: the whole buffer)
    buffer_size: int | None = None  # points kept, oldest dropped (None: this meta-batch's only)
    init_objective: str = "leap"  # leap | reptile | fomaml | none (see the module docstring)
    warp_batch_norm: bool = True  # conv4's warp layers: BatchNorm on their input, then the conv
    warp_after_last: bool = True  # a warp layer after the last hidden block too (before the head)

    REFERENCE: ClassVar[dict[str, Any]] = {
        "source": "flennerhag/warpgrad (src/warpgrad/warpgrad/updaters.py, src/omniglot/main.py)",
        "init_objective": "leap",
        "warp_steps": None,  # epochs=1: one pass over the buffer
        "warp_batch": 1,  # bsz=1
        "buffer_size": None,  # cleared after every meta-update
        "warp_lr": None,  # lr_adapt defaults to the meta-optimiser's lr
        "outer_optimizer": "sgd",
    }

    def outer_optimizer_settings(self) -> OuterOptimizer:
        return OuterOptimizer(self.outer_optimizer)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, allowed in (
            ("init_objective", INIT_OBJECTIVES),
            ("outer_optimizer", ("sgd", "adam")),
            ("bn_mode", ("transductive",)),
        ):
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"algo.{key} must be one of {', '.join(allowed)} for algo=warpgrad, got "
                    f"{getattr(self, key)!r}"
                )
        for key in ("warp_steps", "warp_batch", "buffer_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"algo.{key} must be at least 1 (or null), got {value}")
        if self.warp_lr is not None and not 0 < self.warp_lr < math.inf:
            raise ConfigError(f"algo.warp_lr must be positive and finite, got {self.warp_lr}")
        if self.warp_lr is not None and self.outer_optimizer != "sgd":
            raise ConfigError(
                "algo.warp_lr scales the warp layers' gradient, which Adam normalises away: use "
                "algo.outer_optimizer=sgd with it, or set algo.warp_lr=null"
            )
        if self.checkpoint:
            raise ConfigError(
                "algo=warpgrad keeps no graph through its inner loop (Algorithm 2), so there is "
                "nothing to recompute: set algo.checkpoint=false"
            )


class WarpedNetwork(nn.Module):
    """The task network (`task.*`) with a warp layer (`warp.<i>`) after its hidden blocks.

    A block runs from one weight layer (Conv2d, Linear) to the next. A warp layer keeps its
    block's output shape: on feature maps [BatchNorm, then] a 3x3 convolution with as many filters
    (the authors' `WarpLayer`: no activation, no residual connection), on vectors a linear map.
    """

    def __init__(self, task: nn.Module, batch_norm: bool, after_last: bool) -> None:
        super().__init__()
        self.images = isinstance(task, Conv4)
        layers = task.features if self.images else getattr(task, "body", None)
        if not isinstance(layers, nn.Sequential) or getattr(task, "head", None) is None:
            raise ConfigError(
                "algo=warpgrad puts warp layers between the hidden blocks of model=conv4 (3x3 "
                f"convolutions) or model=mlp (linear maps), not of {type(task).__name__}: use "
                "model=conv4 or model=mlp"
            )
        self.task = task
        starts = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d | nn.Linear)]
        if starts[:1] != [0]:
            raise ConfigError(
                f"algo=warpgrad cuts {type(task).__name__}'s hidden layers into blocks at its "
                "weight layers (Conv2d, Linear), and its first layer is none"
            )
        self.blocks = list(zip(starts, [*starts[1:], len(layers)], strict=True))  # layer ranges
        warped = self.blocks if after_last else self.blocks[:-1]
        if not warped:
            raise ConfigError(
                "this model has one hidden block, so no warp layer fits between two: set "
                "algo.warp_after_last=true or give the model more hidden layers"
            )
        norm = next((m for m in task.modules() if isinstance(m, TaskBatchNorm2d)), None)
        self.warp = nn.ModuleList(
            self._warp_layer(layers[start], batch_norm, norm) for start, _ in warped
        )
        weight = next(task.parameters())
        self.warp.to(device=weight.device, dtype=weight.dtype)
        if self.images and task.channels_last:
            self.warp.to(memory_format=torch.channels_last)

    def _warp_layer(self, first: nn.Module, batch_norm: bool, norm) -> nn.Module:
        """A warp layer for the block that starts with the weight layer `first`; `norm`: a
        BatchNorm of the task network, whose epsilon and kernel its own BatchNorm takes."""
        if not self.images:
            return nn.Linear(first.out_features, first.out_features)
        channels = first.out_channels
        conv = nn.Conv2d(channels, channels, 3, padding=1)
        if not batch_norm:
            return conv
        eps, fused = (1e-5, False) if norm is None else (norm.eps, norm.fused)
        return nn.Sequential(TaskBatchNorm2d(channels, eps, fused=fused), conv)

    def forward(self, x: Tensor, embed_only: bool = False) -> Tensor:
        """The task network's forward pass with each warp layer after its block."""
        task = self.task
        layers = task.features if self.images else task.body
        h = x if self.images else x.flatten(1)  # (B, C, H, W) or (B, in)
        if self.images and task.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        for i, (start, end) in enumerate(self.blocks):
            for j in range(start, end):
                h = layers[j](h)
            if i < len(self.warp):
                h = self.warp[i](h)
        if self.images:  # conv4's embedding: averaged over space (stride) or flattened (maxpool)
            h = h.mean(dim=(2, 3)) if task.pool_space else h.flatten(1)
        return h if embed_only else task.head(h)


class ReplayBuffer:
    """Task-parameter points with their tasks' episodes, oldest first (Algorithm 2's buffer)."""

    def __init__(self, size: int | None) -> None:
        self.size = size  # None: each meta-batch's points replace the last one's
        self.points: Params = {}  # name -> (P, ...): the task layers' weights at each point
        self.episodes: tuple[Tensor, ...] = ()  # (P, ...) each: support x, y, query x, y

    def __len__(self) -> int:
        return next(iter(self.points.values())).shape[0] if self.points else 0

    def add(self, points: Params, episodes: tuple[Tensor, ...]) -> None:
        if self.size is not None and self.points:
            points = {k: torch.cat([self.points[k], v]) for k, v in points.items()}
            episodes = tuple(torch.cat(pair) for pair in zip(self.episodes, episodes, strict=True))
        keep = slice(None) if self.size is None else slice(-self.size, None)
        self.points = {k: v[keep] for k, v in points.items()}
        self.episodes = tuple(x[keep] for x in episodes)

    def take(self, index: Tensor) -> tuple[Params, tuple[Tensor, ...]]:
        return {k: v[index] for k, v in self.points.items()}, tuple(x[index] for x in self.episodes)


class WarpGrad(Bilevel):
    """Task layers adapted by SGD through fixed warp layers; the warp layers and the
    initialisation meta-learned without backpropagating through the inner loop."""

    first_order_switch = False  # never second order through the inner loop: no switch
    checkpoint_switch = False  # no inner-loop graph to recompute

    def __init__(self, cfg: WarpGradConfig, model: nn.Module, kind: str, task_batching: str):
        network = WarpedNetwork(model, cfg.warp_batch_norm, cfg.warp_after_last)
        super().__init__(cfg, network, kind, task_batching)
        names = [name for name, _ in network.named_parameters()]
        self.task_names = [n for n in names if n.startswith("task.")]
        self.warp_names = [n for n in names if n.startswith("warp.")]
        self.buffer = ReplayBuffer(cfg.buffer_size)
        self.warp_scale = (cfg.warp_lr or cfg.outer_lr) / cfg.outer_lr
        self._replay: Iterator[Tensor] = iter(())  # this meta-batch's warp mini-batches

    def nonfinite_causes(self, gradient: bool) -> list[str]:
        cfg = self.cfg
        return [
            f"the inner loop diverging (algo.inner_lr={cfg.inner_lr} over algo.inner_steps="
            f"{cfg.inner_steps}: lower algo.inner_lr or take fewer steps)",
            f"the warp layers' step (algo.warp_lr={cfg.warp_lr or cfg.outer_lr}: lower it)",
        ]

    def memory_advice(self) -> tuple[str, list[str], list[str]]:
        cfg = self.cfg
        what = f"WarpGrad's warp objective on {cfg.warp_batch or 'all buffered'} point(s) at once"
        return what, ["a smaller algo.warp_batch", "a smaller algo.buffer_size"], []

    def inner_options(self, training: bool) -> dict[str, Any]:
        return super().inner_options(training) | {"adapted": self.task_names}

    # -- meta-training (Algorithm 2) ----------------------------------------------------------
    def objective(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Inner loops, buffer, the initialisation's surrogate and the first warp objective."""
        params, buffers = self.params()
        constants = {k: v.detach() for k, v in params.items()}
        with torch.no_grad():  # no graph through the inner loop
            points, losses, scores, grads = self.over_tasks(
                self._inner_loop, batch, constants, buffers
            )
        steps = self.cfg.inner_steps
        # the points each task stepped from, theta_0 .. theta_{K-1}, each with its episode
        stepped = {k: v[:, :-1].flatten(0, 1) for k, v in points.items()}  # (T * K, ...)
        data = (batch.support.x, batch.support.y, batch.query.x, batch.query.y)
        self.buffer.add(stepped, tuple(x.repeat_interleave(steps, 0) for x in data))
        self._replay = self._replay_order(batch.support.x.device)
        warp, metrics = self._warp_objective(next(self._replay))
        init = self._init_surrogate(params, points, grads)
        return init + warp, {"loss": losses.mean(), "score": scores.mean(), **metrics}

    def _replay_order(self, device: torch.device) -> Iterator[Tensor]:
        """The buffer indices of each warp update: one pass in a random order, in mini-batches of
        warp_batch (the authors' epochs=1, bsz), or warp_steps mini-batches from reshuffled
        passes."""
        size, steps, count = len(self.buffer), self.cfg.warp_steps, self.cfg.warp_batch
        count = size if count is None else min(count, size)
        if steps is None:
            return iter(torch.randperm(size, device=device).split(count))
        return iter(mini_batch_stream(size, steps, count, device).view(steps, count))

    def meta_losses(self, batch: TaskBatch, iteration: int = 0) -> Iterator[tuple[Tensor, dict]]:
        """The first objective, then one warp-only objective per further warp step, each taken
        after the optimiser applied the one before (the authors' sequential warp updates)."""
        objective, metrics = self.meta_loss(batch, iteration)
        yield objective, metrics
        for index in self._replay:
            warp, warp_metrics = self._warp_objective(index)
            yield warp, metrics | warp_metrics

    def _inner_loop(self, params, buffers, sx, sy, qx, qy) -> tuple[Any, ...]:
        """One task (no grad): the trajectory of the task layers (K+1, ...), the query loss and
        score after it, and (fomaml) the query gradient there."""
        trajectory = list(self.trajectory(params, buffers, Split(sx, sy), training=True))
        points = {k: torch.stack([p[k] for p in trajectory]) for k in self.task_names}
        fast, steps = trajectory[-1], len(trajectory) - 1
        prediction = self.query_forward(fast, buffers, qx, steps)
        grads = {}
        if self.cfg.init_objective == "fomaml":

            def query_loss(task: Params) -> Tensor:
                return self.loss(self.query_forward({**fast, **task}, buffers, qx, steps), qy)

            grads = torch.func.grad(query_loss)({k: fast[k] for k in self.task_names})
        return points, self.loss(prediction, qy), score(self.kind, prediction, qy), grads

    def _init_surrogate(self, params: Params, points: Params, grads: Params) -> Tensor:
        """<theta_0 - stopgrad(theta_0), G>: value 0, gradient G, the initialisation's update
        direction from the trajectories `points` (T, K+1, ...) (see the module docstring)."""
        objective = self.cfg.init_objective
        if objective == "fomaml":
            update = {k: g.mean(0) for k, g in grads.items()}
        elif objective == "reptile":
            update = {k: (v[:, 0] - v[:, -1]).mean(0) for k, v in points.items()}
        elif objective == "leap":
            segments = {k: v[:, :-1] - v[:, 1:] for k, v in points.items()}  # (T, K, ...)
            length = sum(d.flatten(2).square().sum(-1) for d in segments.values())
            length = length.sqrt() + LEAP_EPS  # (T, K): each step's length, all task layers
            update = {
                k: (d / length.view(*length.shape, *[1] * (d.dim() - 2))).sum(1).mean(0)
                for k, d in segments.items()
            }
        else:  # no gradient at all on the task layers (not even zeros: Adam would move them)
            return torch.zeros((), device=self.buffer.episodes[0].device)
        return sum(((params[k] - params[k].detach()) * update[k]).sum() for k in update)

    def _warp_objective(self, index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """warp_lr / outer_lr times the mean warp objective (eq. 6/7) over the replayed points
        `index`: gradient on the warp layers only."""
        points, episodes = self.buffer.take(index)
        params, buffers = self.params()
        warp = {k: params[k] for k in self.warp_names}
        losses, _ = self.map_tasks(self._warp_loss, (points, *episodes), warp, buffers)
        return self.warp_scale * losses.mean(), {"warp_loss": losses.detach().mean()}

    def _warp_loss(self, warp, buffers, theta, sx, sy, qx, qy) -> tuple[Tensor, Tensor]:
        """L_query(theta - alpha grad L_support(theta; phi); phi) at one replayed point theta."""
        options = self.inner_options(training=True) | {"steps": 1, "first_order": False}
        *_, fast = adapt_steps(self.model, {**theta, **warp}, buffers, Split(sx, sy), **options)
        prediction = self.query_forward(fast, buffers, qx, 1)
        return self.loss(prediction, qy), score(self.kind, prediction, qy)
