"""MAML (Finn et al. 2017) and its first-order approximation FOMAML, over `adapt()`."""

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algos.bilevel.inner import Params, adapt, adapt_steps
from metalearn.algos.objectives import loss_fn, score
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError


@dataclass
class MAMLConfig:
    """Inner loop (adaptation) and outer loop (initialisation) settings."""

    name: str = "maml"
    inner_lr: float = 0.4  # alpha: inner SGD step size during meta-training
    inner_steps: int = 1  # inner SGD steps during meta-training
    test_inner_lr: float | None = None  # inner step size at validation/test (None: inner_lr)
    test_inner_steps: int | None = None  # inner steps at validation/test (None: inner_steps)
    first_order: bool = False  # FOMAML: drop second-order terms of the meta-gradient
    outer_lr: float = 1e-3  # beta: Adam step size of the outer loop
    train_ways: int | None = None  # ways in meta-training (None: data.ways)
    train_query: int | None = None  # query examples per class in meta-training (None: data.query)

    def __post_init__(self) -> None:
        for key in ("inner_lr", "test_inner_lr", "outer_lr"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"algo.{key} must be a positive learning rate, got {value}")
        if self.inner_steps < 1:
            raise ConfigError(f"algo.inner_steps must be at least 1, got {self.inner_steps}")
        if self.test_inner_steps is not None and self.test_inner_steps < 0:
            raise ConfigError(f"algo.test_inner_steps must be >= 0, got {self.test_inner_steps}")
        if self.test_inner_lr is None:
            self.test_inner_lr = self.inner_lr
        if self.test_inner_steps is None:
            self.test_inner_steps = self.inner_steps


class MAML:
    """Meta-learns an initialisation; tasks of a meta-batch run under `vmap` or a Python loop."""

    needs_head = True  # the model ends in a linear layer with one output per way
    differentiates_inner_loop = True  # second-order: the model must use exact primitive BatchNorm

    def __init__(self, cfg: MAMLConfig, model: nn.Module, kind: str, task_batching: str) -> None:
        self.cfg = cfg
        self.model = model
        self.kind = kind
        self.loss = loss_fn(kind)
        self.task_batching = task_batching

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def _params(self) -> tuple[Params, Params]:
        return dict(self.model.named_parameters()), dict(self.model.named_buffers())

    def _over_tasks(self, fn, batch: TaskBatch, params: Params, buffers: Params):
        """Apply fn(params, buffers, sx, sy, qx, qy) to every task and stack the results."""
        data = (batch.support.x, batch.support.y, batch.query.x, batch.query.y)
        if self.task_batching == "vmap":
            return torch.vmap(fn, in_dims=(None, None, 0, 0, 0, 0))(params, buffers, *data)
        outs = [fn(params, buffers, *(d[t] for d in data)) for t in range(batch.tasks)]
        return tuple(torch.stack(parts) for parts in zip(*outs, strict=True))

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean query loss after adaptation (Finn et al. 2017, eq. 2) and the query score."""

        def task(params, buffers, sx, sy, qx, qy) -> tuple[Tensor, Tensor]:
            fast = adapt(
                self.model,
                params,
                buffers,
                Split(sx, sy),
                steps=self.cfg.inner_steps,
                lr=self.cfg.inner_lr,
                first_order=self.cfg.first_order,
                loss=self.loss,
            )
            prediction = functional_call(self.model, (fast, buffers), (qx,))
            return self.loss(prediction, qy), score(self.kind, prediction, qy)

        losses, scores = self._over_tasks(task, batch, *self._params())
        return losses.mean(), {"loss": losses.mean(), "score": scores.mean()}

    def evaluate(self, batch: TaskBatch, steps: list[int]) -> dict[str, Tensor]:
        """Query loss and score per task after each number of test inner steps: (T, len(steps))."""
        wanted = sorted(set(steps))

        def task(params, buffers, sx, sy, qx, qy) -> tuple[Tensor, Tensor]:
            losses, scores = [], []
            trajectory = adapt_steps(
                self.model,
                params,
                buffers,
                Split(sx, sy),
                steps=wanted[-1],
                lr=self.cfg.test_inner_lr,
                first_order=True,
                loss=self.loss,
            )
            for step, fast in enumerate(trajectory):
                if step in wanted:
                    prediction = functional_call(self.model, (fast, buffers), (qx,))
                    losses.append(self.loss(prediction, qy))
                    scores.append(score(self.kind, prediction, qy))
            return torch.stack(losses), torch.stack(scores)

        params, buffers = self._params()
        params = {k: v.detach() for k, v in params.items()}
        with torch.no_grad():  # the inner torch.func.grad still works; no outer graph is kept
            losses, scores = self._over_tasks(task, batch, params, buffers)
        columns = [wanted.index(s) for s in steps]
        return {"loss": losses[:, columns], "score": scores[:, columns]}

    def predict(self, support: Split, query_x: Tensor, steps: int | None = None) -> Tensor:
        """Logits (or values) for one task's query inputs after test-time adaptation."""
        params, buffers = self._params()
        params = {k: v.detach() for k, v in params.items()}
        fast = adapt(
            self.model,
            params,
            buffers,
            support,
            steps=self.cfg.test_inner_steps if steps is None else steps,
            lr=self.cfg.test_inner_lr,
            first_order=True,
            loss=self.loss,
        )
        with torch.no_grad():
            return functional_call(self.model, (fast, buffers), (query_x,))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
