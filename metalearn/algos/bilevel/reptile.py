"""Reptile (Nichol et al. 2018): train on each task for k steps, then move the initialisation
towards the adapted weights: theta <- theta + epsilon * mean_i(phi_i - theta).

The update is handed to the outer optimiser as the gradient (theta - mean_i phi_i): plain SGD
with step size epsilon = `outer_lr` is then exactly the update above (Algorithm 2, batched;
`trainer.meta_batch_size=1` is Algorithm 1, serial), and the default linear schedule anneals
epsilon to 0 as in the paper. No gradient flows through the inner loop.

The inner loop follows the authors' code (openai/supervised-reptile, reptile.py and models.py):

- one Adam (beta1 = 0) for the whole run: only the weights are reset for each task, its moments
  and step count carry over from task to task and from meta-iteration to meta-iteration (so the
  tasks of a meta-batch are trained one after the other), and test-time adaptation starts from
  the trained moments without changing them (`inner_state=persistent`; `fresh` starts a new Adam
  for every task);
- TensorFlow's Adam: step lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps);
- each step on a mini-batch of `inner_batch` examples drawn without replacement from a stream of
  reshuffled passes over the task's examples, and the summed (not averaged) cross-entropy
  (`inner_loss=sum`: TensorFlow's minimize() of the per-example loss vector);
- transductive testing: support and query examples in one forward pass, so that BatchNorm's batch
  statistics are those of both (`test_batch=support+query`).

Over 300 lines because the authors' inner loop (a persistent Adam, disjoint mini-batches,
transductive testing) is transcribed here in full beside the paper's variant, so that the two
read side by side.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor
from torch.func import functional_call

from metalearn.algos.bilevel.base import Bilevel, BilevelConfig
from metalearn.algos.bilevel.inner import Params
from metalearn.algos.learner import OuterOptimizer
from metalearn.algos.objectives import score
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError

INNER_STATES = ("persistent", "fresh")
INNER_LOSSES = ("sum", "mean")
TEST_BATCHES = ("support+query", "query")


@dataclass
class ReptileConfig(BilevelConfig):
    """Inner optimiser, its state and batching, step counts (train and test), and epsilon."""

    name: str = "reptile"
    inner_lr: float = 1e-3  # inner Adam (or SGD) step size
    inner_steps: int = 5  # k: inner steps per task in meta-training
    test_inner_steps: int | None = 50  # inner steps at validation/test
    inner_optimizer: str = "adam"  # 'adam' (the paper's, beta1 = 0) or 'sgd'
    adam_betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    adam_eps: float = 1e-8
    # 'persistent': one Adam for the run, its moments kept across tasks and used at test;
    # 'fresh': a new Adam (zero moments, step count 0) for every task
    inner_state: str = "persistent"
    inner_batch: int | None = 10  # examples per inner step in meta-training (None: all)
    test_inner_batch: int | None = 5  # examples per inner step at test (None: all)
    inner_loss: str = "sum"  # the inner step's loss over its mini-batch: 'sum' or 'mean'
    # BatchNorm statistics of the test forward pass: support and query together, or query alone
    test_batch: str = "support+query"
    outer_lr: float = 1.0  # epsilon: the outer step size (annealed linearly to 0 by default)
    outer_optimizer: str = "sgd"  # 'sgd': exactly the update above; 'adam' also works
    first_order: bool = True  # Reptile never differentiates through its inner loop

    REFERENCE: ClassVar[dict[str, Any]] = {
        "source": "openai/supervised-reptile (reptile.py, models.py, run_omniglot.py)",
        "inner_optimizer": "adam",
        "adam_betas": [0.0, 0.999],
        "adam_eps": 1e-8,
        "inner_state": "persistent",
        "inner_batch": 10,
        "test_inner_batch": 5,
        "inner_loss": "sum",
        "test_batch": "support+query",
    }

    def outer_optimizer_settings(self) -> OuterOptimizer:
        return OuterOptimizer(self.outer_optimizer)  # (adam_eps is the inner Adam's)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, allowed in (
            ("inner_optimizer", ("adam", "sgd")),
            ("outer_optimizer", ("adam", "sgd")),
            ("inner_state", INNER_STATES),
            ("inner_loss", INNER_LOSSES),
            ("test_batch", TEST_BATCHES),
        ):
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"algo.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}"
                )
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(
                f"algo.adam_betas must be two numbers in [0, 1), got {self.adam_betas}"
            )
        if not 0 < self.adam_eps < math.inf:
            raise ConfigError(f"algo.adam_eps must be positive, got {self.adam_eps}")
        for key in ("inner_batch", "test_inner_batch"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(
                    f"algo.{key} must be at least 1 (null: all examples), got {value}"
                )
        if not self.first_order:
            raise ConfigError("algo=reptile is first-order by definition; use algo=maml instead")


class AdamState(NamedTuple):
    """The inner Adam's first and second moments and its step count t."""

    first: Params
    second: Params
    steps: Tensor  # a float scalar, so that it is saved and moved like the moments


def mini_batch_stream(n: int, steps: int, batch: int | None, device: torch.device) -> Tensor:
    """Indices of `steps` mini-batches of `batch` examples out of n, flattened: consecutive
    reshuffled passes over the examples, cut into batches (a batch may straddle two passes).
    `batch` None or at least n: every step sees all n examples, in order."""
    if batch is None or batch >= n:
        return torch.arange(n, device=device).repeat(steps)
    order, passes = torch.arange(n), []
    for _ in range(math.ceil(steps * batch / n)):
        order = order[torch.randperm(n)]  # each pass reshuffles the last one's order
        passes.append(order)
    return torch.cat(passes)[: steps * batch].to(device)


class Reptile(Bilevel):
    """Inner training on a task's examples, outer step towards the adapted weights."""

    differentiates_inner_loop = False  # first order: the fused BatchNorm kernel is exact
    outer_schedule = "linear"

    def __init__(self, cfg: ReptileConfig, *args, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        self.inner_adam = self.fresh_state()  # the persistent Adam's state (inner_state=persistent)

    # -- the inner loop -----------------------------------------------------------------------
    def fresh_state(self) -> AdamState | None:
        if self.cfg.inner_optimizer != "adam":
            return None
        params = dict(self.model.named_parameters())
        first = {k: torch.zeros_like(v.detach()) for k, v in params.items()}
        second = {k: torch.zeros_like(v.detach()) for k, v in params.items()}
        return AdamState(first, second, torch.zeros_like(next(iter(first.values())).sum()))

    def start_state(self) -> AdamState | None:
        """The inner optimiser's state at the start of a task."""
        return self.inner_adam if self.cfg.inner_state == "persistent" else self.fresh_state()

    def inner_steps(
        self,
        params: Params,
        buffers: Params,
        x: Tensor,
        y: Tensor,
        *,
        steps: int,
        lr: float,
        batch: int,
        state: AdamState | None,
    ) -> Iterator[tuple[Params, AdamState | None]]:
        """Yield (weights, optimiser state) before and after each of `steps` inner steps; step s
        trains on rows [s * batch, (s + 1) * batch) of x (a `mini_batch_stream` of the task)."""
        cfg = self.cfg

        def batch_loss(weights: Params, xb: Tensor, yb: Tensor, step: int) -> Tensor:
            overrides = self.stage_overrides(step, query=False)
            prediction = functional_call(self.model, ({**weights, **overrides}, buffers), (xb,))
            value = self.loss(prediction, yb)
            return value * yb.shape[0] if cfg.inner_loss == "sum" else value

        yield params, state
        for step in range(steps):
            rows = slice(step * batch, (step + 1) * batch)
            grads = torch.func.grad(batch_loss)(params, x[rows], y[rows], step)
            if state is None:  # SGD
                params = {k: params[k] - lr * grads[k] for k in params}
            else:
                params, state = self._adam_step(params, grads, state, lr)
            yield params, state

    def _adam_step(
        self, params: Params, grads: Params, state: AdamState, lr: float
    ) -> tuple[Params, AdamState]:
        """One step of TensorFlow's Adam (eps outside the bias correction of v)."""
        beta1, beta2 = self.cfg.adam_betas
        t = state.steps + 1
        first = {k: beta1 * state.first[k] + (1 - beta1) * g for k, g in grads.items()}
        second = {k: beta2 * state.second[k] + (1 - beta2) * g * g for k, g in grads.items()}
        rate = lr * (1 - beta2**t).sqrt() / (1 - beta1**t)
        params = {
            k: params[k] - rate * first[k] / (second[k].sqrt() + self.cfg.adam_eps) for k in params
        }
        return params, AdamState(first, second, t)

    def streams(self, x: Tensor, y: Tensor, steps: int, batch: int | None) -> tuple[Tensor, ...]:
        """Per task (dim 0), the examples of each inner step laid end to end, and the batch size."""
        n = x.shape[1]
        index = torch.stack(
            [mini_batch_stream(n, steps, batch, x.device) for _ in range(x.shape[0])]
        )
        tasks = torch.arange(x.shape[0], device=x.device)[:, None]
        return x[tasks, index], y[tasks, index], n if batch is None else min(batch, n)

    def trajectory(self, params, buffers, support, training, steps=None) -> Iterator[Params]:
        """The weights before and after each inner step on one task's examples, in order (the
        mini-batches of `streams` are drawn by the callers that shuffle)."""
        cfg = self.cfg
        steps = (cfg.inner_steps if training else cfg.test_inner_steps) if steps is None else steps
        batch = cfg.inner_batch if training else cfg.test_inner_batch
        n = support.x.shape[0]
        batch = n if batch is None else min(batch, n)
        index = torch.arange(steps * batch, device=support.x.device) % n
        options = {"lr": cfg.inner_lr if training else cfg.test_inner_lr, "batch": batch}
        run = self.inner_steps(
            params,
            buffers,
            support.x[index],
            support.y[index],
            steps=steps,
            state=self.start_state(),
            **options,
        )
        return (weights for weights, _ in run)

    # -- meta-training ------------------------------------------------------------------------
    def objective(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """0.5 * ||theta - stopgrad(mean phi)||^2, whose gradient is theta - mean phi; phi_i
        after k steps on task i's support and query examples together (Reptile has no
        train/test split inside a task)."""
        cfg = self.cfg
        params, buffers = self.params()
        theta = {k: v.detach() for k, v in params.items()}
        x = torch.cat([batch.support.x, batch.query.x], 1)
        y = torch.cat([batch.support.y, batch.query.y], 1)
        with torch.no_grad():
            xs, ys, size = self.streams(x, y, cfg.inner_steps, cfg.inner_batch)
            options = {"steps": cfg.inner_steps, "lr": cfg.inner_lr, "batch": size}
            if cfg.inner_state == "persistent":  # one optimiser: the tasks one after the other
                state, outs = self.inner_adam, []
                for t in range(batch.tasks):
                    *_, (fast, state) = self.inner_steps(
                        theta, buffers, xs[t], ys[t], state=state, **options
                    )
                    outs.append((fast, *self.query_metrics(fast, buffers, batch, t)))
                self.inner_adam = state
                fast, losses, scores = torch.utils._pytree.tree_map(
                    lambda *parts: torch.stack(parts), *outs
                )
            else:

                def task(weights, buffers, xs, ys, qx, qy):
                    *_, (fast, _) = self.inner_steps(
                        weights, buffers, xs, ys, state=self.fresh_state(), **options
                    )
                    prediction = self.query_forward(fast, buffers, qx, cfg.inner_steps)
                    return fast, self.loss(prediction, qy), score(self.kind, prediction, qy)

                data = (xs, ys, batch.query.x, batch.query.y)
                fast, losses, scores = self.map_tasks(task, data, theta, buffers)
        surrogate = sum(0.5 * (params[k] - fast[k].mean(0)).square().sum() for k in params)
        return surrogate, {"loss": losses.mean(), "score": scores.mean()}

    def query_metrics(self, fast: Params, buffers: Params, batch: TaskBatch, t: int):
        prediction = self.query_forward(fast, buffers, batch.query.x[t], self.cfg.inner_steps)
        return self.loss(prediction, batch.query.y[t]), score(
            self.kind, prediction, batch.query.y[t]
        )

    # -- test ---------------------------------------------------------------------------------
    def test_forward(self, fast: Params, buffers: Params, sx: Tensor, qx: Tensor, step: int):
        """Query predictions at test; with test_batch=support+query, forwarded beside the
        support examples (BatchNorm then normalises with the statistics of both)."""
        if self.cfg.test_batch == "query":
            return self.query_forward(fast, buffers, qx, step)
        return self.query_forward(fast, buffers, torch.cat([sx, qx]), step)[sx.shape[0] :]

    def evaluate(self, batch: TaskBatch, steps: list[int]) -> dict[str, Tensor]:
        """Query loss and score per task after each number of test inner steps: (T, len(steps)).
        Every task starts from the trained optimiser state and leaves it as it was."""
        cfg, wanted = self.cfg, sorted(set(steps))
        params, buffers = self.params()
        params = {k: v.detach() for k, v in params.items()}
        start = self.start_state()
        xs, ys, size = self.streams(
            batch.support.x, batch.support.y, wanted[-1], cfg.test_inner_batch
        )

        def task(params, buffers, sx, xs, ys, qx, qy) -> tuple[Tensor, ...]:
            losses, scores, predictions = [], [], []
            run = self.inner_steps(
                params,
                buffers,
                xs,
                ys,
                steps=wanted[-1],
                lr=cfg.test_inner_lr,
                batch=size,
                state=start,
            )
            for step, (fast, _) in enumerate(run):
                if step in wanted:
                    prediction = self.test_forward(fast, buffers, sx, qx, step)
                    losses.append(self.loss(prediction, qy))
                    scores.append(score(self.kind, prediction, qy))
                    predictions.append(prediction)
            if self.kind != "classification":
                return torch.stack(losses), torch.stack(scores)
            return torch.stack(losses), torch.stack(scores), torch.stack(predictions)

        data = (batch.support.x, xs, ys, batch.query.x, batch.query.y)
        with torch.no_grad(), self._test_time():
            out = self.map_tasks(task, data, params, buffers)
        return self.by_step(out, wanted, steps)

    def predict(self, support: Split, query_x: Tensor, steps: int | None = None) -> Tensor:
        cfg = self.cfg
        steps = cfg.test_inner_steps if steps is None else steps
        params, buffers = self.params()
        params = {k: v.detach() for k, v in params.items()}
        xs, ys, size = self.streams(support.x[None], support.y[None], steps, cfg.test_inner_batch)
        with torch.no_grad(), self._test_time():
            *_, (fast, _) = self.inner_steps(
                params,
                buffers,
                xs[0],
                ys[0],
                steps=steps,
                lr=cfg.test_inner_lr,
                batch=size,
                state=self.start_state(),
            )
            return self.test_forward(fast, buffers, support.x, query_x, steps)

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.inner_adam is not None:
            state["inner_adam"] = torch.utils._pytree.tree_map(
                torch.clone, self.inner_adam._asdict()
            )
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        saved = state.get("inner_adam")
        if (saved is None) != (self.inner_adam is None):
            raise KeyError(
                "the inner Adam's state was "
                + ("not saved" if saved is None else "saved but algo.inner_optimizer is sgd")
            )
        if saved is not None:
            device = self.inner_adam.steps.device
            self.inner_adam = AdamState(
                **torch.utils._pytree.tree_map(lambda v: v.to(device), saved)
            )
