"""What every gradient-based meta-learner shares: config, task batching, evaluation, weights.

A subclass says how a task is adapted (`trajectory`), how adapted parameters predict
(`query_forward`), and, if it is not MAML's, what the outer objective is (`task_loss`,
`meta_loss`). Everything runs on parameter dicts with `torch.func`: no module copies per task.

Over 300 lines because it is the whole family's shared machinery in one place (config and its
checks, the vmapped and looped task batches, BatchNorm statistics modes, evaluation and the
advice every member gives); splitting it would scatter what each member overrides.
"""

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.checkpoint import checkpoint

from metalearn.algos.bilevel.inner import Params, adapt_steps
from metalearn.algos.learner import AlgoConfig, Learner
from metalearn.algos.objectives import loss_fn, score
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError
from metalearn.models.layers import (
    TaskBatchNorm2d,
    native_batchnorm,
    normalizing_with_running_stats,
    recording_batch_stats,
)

BN_MODES = ("transductive", "running", "per_step")
# the most memory that the adapted weights of an evaluation batch may take at once (two-phase
# evaluation holds every task's weights after every scored step)
TWO_PHASE_BYTES = 256 * 2**20
BN_MOMENTUM = 0.1  # weight of each meta-batch in the running statistics (torch's default)


@dataclass
class BilevelConfig(AlgoConfig):
    """Inner loop (adaptation) and outer loop (meta-update) settings of the MAML family."""

    name: str = "maml"
    inner_lr: float = 0.4  # alpha: inner SGD step size during meta-training
    inner_steps: int = 1  # inner SGD steps during meta-training
    test_inner_lr: float | None = None  # inner step size at validation/test (None: inner_lr)
    test_inner_steps: int | None = None  # inner steps at validation/test (None: inner_steps)
    first_order: bool = False  # drop second-order terms of the meta-gradient (FOMAML)
    outer_lr: float = 1e-3  # beta: step size of the outer optimiser
    train_ways: int | None = None  # ways in meta-training (None: data.ways)
    train_query: int | None = None  # query examples per class in meta-training (None: data.query)
    checkpoint: bool = False  # recompute each task's inner loop in backward: memory for compute
    # BatchNorm at test time: 'transductive' (each task's own batch statistics, as MAML), or
    # statistics accumulated in meta-training and applied to each example alone: 'running'
    # (one set) or 'per_step' (one set per inner step, MAML++'s BNRS)
    bn_mode: str = "transductive"

    def train_shape(self) -> tuple[int | None, int | None, int | None]:
        return self.train_ways, None, self.train_query

    def running_batchnorm(self) -> bool:
        return self.bn_mode != "transductive"

    def __post_init__(self) -> None:
        for key in ("inner_lr", "test_inner_lr", "outer_lr"):
            value = getattr(self, key)
            if value is not None and not 0 < value < math.inf:
                raise ConfigError(
                    f"algo.{key} must be a positive, finite learning rate, got {value}"
                )
        if self.inner_steps < 1:
            raise ConfigError(f"algo.inner_steps must be at least 1, got {self.inner_steps}")
        if self.test_inner_steps is not None and self.test_inner_steps < 0:
            raise ConfigError(f"algo.test_inner_steps must be >= 0, got {self.test_inner_steps}")
        if self.bn_mode not in BN_MODES:
            raise ConfigError(
                f"algo.bn_mode must be one of {', '.join(BN_MODES)}, got {self.bn_mode!r}"
            )
        if self.test_inner_lr is None:
            self.test_inner_lr = self.inner_lr
        if self.test_inner_steps is None:
            self.test_inner_steps = self.inner_steps


TaskFn = Callable[..., tuple[Any, ...]]  # (params, buffers, sx, sy, qx, qy) -> per-task outputs


class Bilevel(Learner):
    """MAML's machinery; MAML itself is this class unchanged (see maml.py)."""

    family = "bilevel"
    optimizees = False
    pretrains = False
    needs_train_classes = False
    needs_ways = False
    needs_head = True  # the model ends in a linear layer with one output per way
    reinforcement = False
    batches_tasks = True  # hardware.task_batching applies: vmap over tasks or a loop
    differentiates_inner_loop = True  # second order: under vmap, only primitive BatchNorm is exact
    inner_loop = True
    first_order_switch = True
    checkpoint_switch = True
    outer_schedule = "constant"  # the outer learning rate's schedule unless trainer.lr_schedule
    compiled = "objective"
    # torch.vmap's randomness over the tasks of a batch: a member that draws per task (MT-Net's
    # masks) says "different"
    vmap_randomness = "error"

    def __init__(self, cfg: BilevelConfig, model: nn.Module, kind: str, task_batching: str):
        if cfg.checkpoint and task_batching != "loop":
            raise ConfigError(
                "algo.checkpoint recomputes one task at a time in the backward pass; set "
                "hardware.task_batching=loop with it (under vmap it would save no memory)"
            )
        self.cfg = cfg
        self.model = model
        self.kind = kind
        self.loss = loss_fn(kind)
        self.task_batching = task_batching
        # test-time adaptation on the support sets, and the query forwards of validation and
        # test tasks (often 15 per class): build.py may batch each as suits its size
        self.adapt_batching = self.test_batching = task_batching
        self.iteration = 0  # the outer iteration, for algorithms with annealed settings
        self.testing = False  # inside evaluate/predict
        # hardware.compile with the per-task loop: each training task function is compiled once
        # (one task's graph, whatever the meta-batch size) and called for every task
        self.compile_tasks = False
        self._compiled: dict[Callable, TaskFn] = {}
        norms = {n: m for n, m in model.named_modules() if isinstance(m, TaskBatchNorm2d)}
        self.bn_stats: dict[str, Tensor] = {}  # layer -> (stages, 2, C): [mean; var] per stage
        if cfg.bn_mode != "transductive":
            if not norms or not all(m.running for m in norms.values()):
                raise ConfigError(
                    f"algo.bn_mode={cfg.bn_mode} needs a model with BatchNorm layers built "
                    "with running statistics (build.py does this for conv4); this model has "
                    + ("none" if not norms else "them without")
                )
            stages = 1 if cfg.bn_mode == "running" else cfg.inner_steps + 1
            device = next(model.parameters()).device
            self.bn_stats = {
                name: torch.stack([torch.zeros(m.weight.shape), torch.ones(m.weight.shape)])
                .expand(stages, -1, -1)
                .clone()
                .to(device)
                for name, m in norms.items()
            }

    # -- advice (see Learner) -----------------------------------------------------------------
    def nonfinite_causes(self, gradient: bool) -> list[str]:
        cfg = self.cfg
        fixes = ["lower algo.inner_lr", "take fewer steps"]
        if gradient and not cfg.first_order:
            fixes.append("set algo.first_order=true")  # second-order terms overflow first
        return [
            f"the inner loop diverging (algo.inner_lr={cfg.inner_lr} over "
            f"algo.inner_steps={cfg.inner_steps}: {', '.join(fixes[:-1])} or {fixes[-1]})"
        ]

    def memory_advice(self) -> tuple[str, list[str], list[str]]:
        cfg, what, before, after = self.cfg, "", [], []
        if not cfg.first_order:
            what = (
                f"second-order {cfg.name} (it keeps the graph of all algo.inner_steps="
                f"{cfg.inner_steps} inner steps of each task)"
            )
            before.append("algo.first_order=true (no second-order graph)")
        if not cfg.checkpoint:
            after.append(
                "gradient checkpointing (algo.checkpoint=true hardware.task_batching=loop: "
                "each task's inner loop is recomputed in backward)"
            )
        return what, before, after

    # -- what subclasses change ---------------------------------------------------------------
    def meta_parameters(self) -> dict[str, nn.Parameter]:
        """Meta-learned tensors besides the model's weights (learned step sizes, ...)."""
        return {}

    def inner_options(self, training: bool) -> dict[str, Any]:
        """Keyword options of `adapt_steps` for meta-training or for validation/test."""
        cfg = self.cfg
        return {
            "steps": cfg.inner_steps if training else cfg.test_inner_steps,
            "lr": cfg.inner_lr if training else cfg.test_inner_lr,
            "first_order": cfg.first_order if training else True,
            "loss": self.loss,
        }

    def stage_overrides(self, step: int, query: bool) -> Params:
        """Tensors that replace model parameters or buffers in the forward passes of inner step
        `step` (`query`: the query pass after `step` steps): here the running BatchNorm
        statistics of that stage at test time; MAML++ adds its per-step BatchNorm weights."""
        if not (self.testing and self.bn_stats):
            return {}
        out = {}
        for layer, stats in self.bn_stats.items():
            stage = stats[min(step, stats.shape[0] - 1)]
            out[f"{layer}.running_mean"], out[f"{layer}.running_var"] = stage[0], stage[1]
        return out

    def trajectory(
        self, params: Params, buffers: Params, support: Split, training: bool, steps=None
    ) -> Iterator[Params]:
        """The fast parameters before and after each inner step on one task's support set."""
        options = self.inner_options(training)
        if steps is not None:
            options["steps"] = steps
        per_step = [self.stage_overrides(s, query=False) for s in range(options["steps"])]
        if any(per_step):
            options["per_step"] = per_step
        return adapt_steps(self.model, params, buffers, support, **options)

    def query_forward(self, params: Params, buffers: Params, x: Tensor, step: int) -> Tensor:
        """Predictions of the parameters reached after `step` inner steps."""
        overrides = self.stage_overrides(step, query=True)
        return functional_call(self.model, ({**params, **overrides}, buffers), (x,))

    def task_loss(self, params, buffers, sx, sy, qx, qy) -> tuple[Tensor, Tensor]:
        """One task's query loss after adaptation (Finn et al. 2017, eq. 2) and its score."""
        *_, fast = self.trajectory(params, buffers, Split(sx, sy), training=True)
        prediction = self.query_forward(fast, buffers, qx, self.cfg.inner_steps)
        return self.loss(prediction, qy), score(self.kind, prediction, qy)

    def objective(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The outer objective over a meta-batch, and the training metrics to log."""
        losses, scores = self.over_tasks(self.task_loss, batch, *self.params())
        return losses.mean(), {"loss": losses.mean(), "score": scores.mean()}

    # -- shared -------------------------------------------------------------------------------
    def meta_loss(self, batch: TaskBatch, iteration: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """The training step's objective (the trainer differentiates it) and metrics."""
        self.iteration = iteration
        out = self.objective(batch)
        if self.bn_stats:
            self._update_bn_stats(batch)
        return out

    def _update_bn_stats(self, batch: TaskBatch) -> None:
        """Fold this meta-batch's BatchNorm statistics into the running ones: per task, the
        forward pass of support and query examples at every stage of the inner loop."""
        names = list(self.bn_stats)

        def task(params, buffers, sx, sy, qx, qy) -> tuple[Tensor, ...]:
            x, stages = torch.cat([sx, qx]), []
            for step, fast in enumerate(self.trajectory(params, buffers, Split(sx, sy), True)):
                with recording_batch_stats() as recorded:
                    self.query_forward(fast, buffers, x, step)
                stages.append(recorded)
            return tuple(torch.stack([stage[i] for stage in stages]) for i in range(len(names)))

        params, buffers = self.params()
        with torch.no_grad():
            per_layer = self.over_tasks(
                task, batch, {k: v.detach() for k, v in params.items()}, buffers
            )
            for name, stats in zip(names, per_layer, strict=True):
                new = stats.mean(0)  # (stages, 2, C), averaged over tasks
                if self.cfg.bn_mode == "running":
                    new = new.mean(0, keepdim=True)
                self.bn_stats[name].lerp_(new, BN_MOMENTUM)

    @contextlib.contextmanager
    def _test_time(self) -> Iterator[None]:
        """Validation, test and prediction: running BatchNorm statistics where configured."""
        self.testing = True
        try:
            if self.bn_stats:
                with normalizing_with_running_stats(self.model):
                    yield
            else:
                yield
        finally:
            self.testing = False

    def parameters(self) -> list[nn.Parameter]:
        return [*self.model.parameters(), *self.meta_parameters().values()]

    def params(self) -> tuple[Params, Params]:
        """The model's parameters and buffers as dicts for functional_call. Running BatchNorm
        statistics are left out: `stage_overrides` supplies them, stage by stage."""
        buffers = {
            k: v
            for k, v in self.model.named_buffers()
            if not k.endswith((".running_mean", ".running_var"))
        }
        return dict(self.model.named_parameters()), buffers

    def over_tasks(self, fn: TaskFn, batch: TaskBatch, params: Params, buffers: Params):
        """Apply fn(params, buffers, sx, sy, qx, qy) to every task and stack the results."""
        data = (batch.support.x, batch.support.y, batch.query.x, batch.query.y)
        return self.map_tasks(fn, data, params, buffers)

    def map_tasks(
        self,
        fn: TaskFn,
        data: tuple[Tensor, ...],
        params: Params,
        buffers: Params,
        batching: str | None = None,
    ):
        """Apply fn(params, buffers, *task's slices of data) to every task (dim 0 of each data
        tensor, or of each tensor in it) by vmap or a loop, as hardware.task_batching says
        (or `batching`), and stack the results."""
        if (batching or self.task_batching) == "vmap":
            in_dims = (None, None, *[0] * len(data))
            vmapped = torch.vmap(fn, in_dims=in_dims, randomness=self.vmap_randomness)
            return vmapped(params, buffers, *data)
        if self.compile_tasks and torch.is_grad_enabled():
            fn = self._compiled_task(fn)
        if self.cfg.checkpoint and torch.is_grad_enabled():
            fn = self._checkpointed(fn, params, buffers)
        tasks = tree_leaves(data)[0].shape[0]
        outs = [fn(params, buffers, *tree_map(itemgetter(t), data)) for t in range(tasks)]
        return tree_map(lambda *parts: torch.stack(parts), *outs)

    def _compiled_task(self, fn: TaskFn) -> TaskFn:
        """torch.compile of a per-task function, made once per function (shapes fixed)."""
        key = getattr(fn, "__func__", fn)  # a bound method is a new object at every access
        if key not in self._compiled:
            self._compiled[key] = torch.compile(fn, dynamic=False)
        return self._compiled[key]

    @staticmethod
    def _checkpointed(fn: TaskFn, params: Params, buffers: Params) -> TaskFn:
        """fn that keeps only its inputs for backward and recomputes its inner loop there.

        Reentrant checkpointing: torch.func.grad refuses the saved-tensor hooks of the
        non-reentrant kind. The parameters go in as flat tensors so that it sees them.
        """
        names = list(params)

        def flat(sx, sy, qx, qy, *values):
            return fn(dict(zip(names, values, strict=True)), buffers, sx, sy, qx, qy)

        def run(_params, _buffers, sx, sy, qx, qy):
            return checkpoint(flat, sx, sy, qx, qy, *params.values(), use_reentrant=True)

        return run

    def evaluate(self, batch: TaskBatch, steps: list[int]) -> dict[str, Tensor]:
        """Query loss and score per task after each number of test inner steps: (T, len(steps)),
        and a classifier's query logits (T, len(steps), Q, C).

        Where build.py batches test-time adaptation on the small support sets apart from the
        query forwards (hardware.task_batching=auto on CPU: vmap, then a per-task loop with the
        native BatchNorm kernel, exact as no second-order gradient goes through it) and the
        adapted weights of every task are small enough to hold at once, two phases; else each
        task is adapted and scored in one go, batched as `test_batching` says."""
        wanted = sorted(set(steps))

        def adapt(params, buffers, sx, sy) -> list[Params]:
            trajectory = self.trajectory(
                params, buffers, Split(sx, sy), training=False, steps=wanted[-1]
            )
            return [fast for step, fast in enumerate(trajectory) if step in wanted]

        def queries(_params, buffers, fasts, qx, qy) -> tuple[Tensor, ...]:
            losses, scores, predictions = [], [], []
            for step, fast in zip(wanted, fasts, strict=True):
                prediction = self.query_forward(fast, buffers, qx, step)
                losses.append(self.loss(prediction, qy))
                scores.append(score(self.kind, prediction, qy))
                predictions.append(prediction)
            if self.kind != "classification":
                return torch.stack(losses), torch.stack(scores)
            return torch.stack(losses), torch.stack(scores), torch.stack(predictions)

        def task(params, buffers, sx, sy, qx, qy) -> tuple[Tensor, ...]:
            return queries(params, buffers, adapt(params, buffers, sx, sy), qx, qy)

        params, buffers = self.params()
        params = {k: v.detach() for k, v in params.items()}
        loop = self.test_batching == "loop"
        native = native_batchnorm(self.model) if loop else contextlib.nullcontext()
        support, query = (batch.support.x, batch.support.y), (batch.query.x, batch.query.y)
        # no_grad: the inner torch.func.grad still works; no outer graph is kept
        with torch.no_grad(), self._test_time():
            if self._two_phases(params, batch.tasks * len(wanted)):
                fasts = self.map_tasks(adapt, support, params, buffers, self.adapt_batching)
                with native:
                    data = (fasts, *query)
                    out = self.map_tasks(queries, data, {}, buffers, "loop")
            else:
                with native:
                    data = (*support, *query)
                    out = self.map_tasks(task, data, params, buffers, self.test_batching)
        return self.by_step(out, wanted, steps)

    @staticmethod
    def by_step(out: tuple[Tensor, ...], wanted: list[int], steps: list[int]) -> dict[str, Tensor]:
        """Per-task (loss, score[, logits]) over the `wanted` step counts -> evaluate's dict,
        columns in the order of `steps` (logits: classifiers only)."""
        columns = [wanted.index(s) for s in steps]
        names = ("loss", "score", "logits")[: len(out)]
        return {name: part[:, columns] for name, part in zip(names, out, strict=True)}

    def _two_phases(self, params: Params, copies: int) -> bool:
        """Adapt under vmap, then score in a loop: when build.py chose that and `copies` sets of
        adapted weights fit in TWO_PHASE_BYTES (conv4: 0.5 MB a set; ResNet-12: 50 MB)."""
        if (self.adapt_batching, self.test_batching) != ("vmap", "loop"):
            return False
        size = sum(v.numel() * v.element_size() for v in params.values())
        return copies * size <= TWO_PHASE_BYTES

    def predict(self, support: Split, query_x: Tensor, steps: int | None = None) -> Tensor:
        """Logits (or values) for one task's query inputs after test-time adaptation."""
        params, buffers = self.params()
        params = {k: v.detach() for k, v in params.items()}
        steps = self.cfg.test_inner_steps if steps is None else steps
        with self._test_time():
            *_, fast = self.trajectory(params, buffers, support, training=False, steps=steps)
            with torch.no_grad():
                return self.query_forward(fast, buffers, query_x, steps)

    def state_dict(self) -> dict:
        extra = {k: v.detach().clone() for k, v in self.meta_parameters().items()}
        bn = {k: v.clone() for k, v in self.bn_stats.items()}
        return {"model": self.model.state_dict(), "meta": extra, "bn_stats": bn}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        saved_bn = state.get("bn_stats", {})
        if saved_bn.keys() != self.bn_stats.keys():
            raise KeyError(
                f"BatchNorm statistics for {sorted(saved_bn)} saved, "
                f"{sorted(self.bn_stats)} expected (algo.bn_mode differs?)"
            )
        for name, value in saved_bn.items():
            self.bn_stats[name].copy_(value)
        mine, saved = self.meta_parameters(), state.get("meta", {})
        if set(mine) != set(saved):
            raise KeyError(f"meta-parameters {sorted(saved)} saved, {sorted(mine)} expected")
        with torch.no_grad():
            for name, value in saved.items():
                mine[name].copy_(value)
