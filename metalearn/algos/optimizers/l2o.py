"""Learning to optimise (Andrychowicz et al. 2016): meta-train a learned optimiser (the model:
models/learned_optimizers.py) by unrolling it on batches of sampled problems (data/optimizees.py).

The meta-objective of a window of K steps from theta_s is sum_{t=s+1..s+K} f_t(theta_t), the
loss after each of its updates, unweighted, averaged over the problems of the meta-batch, with
the optimizee's gradients treated as inputs (no second derivatives, as the paper;
`algo.second_derivatives=true` keeps them). deepmind/learning-to-learn (meta.py) also adds the
window's starting loss f_s, which has no gradient within the window; leaving it out makes the
windows' objectives sum to the whole unroll's, so that every estimator below aims at the same
gradient. Step t's loss sees step t's minibatch (data/optimizees.py). The estimators
(`algo.estimator`):

- `full`: backpropagation through the whole unroll of data.steps steps.
- `truncated`: the unroll is cut into windows of `algo.truncation` steps, one outer step each,
  the optimizee's state carried across windows and detached between them (the paper: 20 of 100).
- `es`: antithetic evolution strategies on each window: pairs of perturbations phi +- eps,
  eps ~ N(0, sigma^2 I), each run from the window's shared start; the estimate is
  sum_i eps_i (L+_i - L-_i) / (2 n sigma^2), and the shared state then advances under phi.
- `pes`: persistent evolution strategies (Vicol et al. 2021): each perturbed particle keeps its
  own state across windows, and eps is replaced by the particle's accumulated perturbation xi,
  which removes the truncation's bias.

ES and PES return a surrogate objective, phi . g_hat, whose gradient is their estimate, so the
trainer's backward and outer step serve every estimator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algos.learner import AlgoConfig, Learner
from metalearn.data.optimizees import Problems
from metalearn.errors import ConfigError
from metalearn.models.learned_optimizers import flatten, unflatten

ESTIMATORS = ("full", "truncated", "es", "pes")


@dataclass
class L2OConfig(AlgoConfig):
    """A learned optimiser's meta-training (see the module docstring)."""

    REFERENCE: ClassVar[dict[str, Any]] = {
        "source": "deepmind/learning-to-learn (train.py, util.py; unrolls of 100 steps)",
        "estimator": "truncated",
        "truncation": 20,
        "outer_lr": 0.001,
        "second_derivatives": False,
    }

    name: str = "l2o"
    estimator: str = "truncated"  # one of ESTIMATORS
    truncation: int = 20  # steps per window (truncated, es, pes)
    outer_lr: float = 0.001  # Adam on the optimiser's weights
    second_derivatives: bool = False  # backpropagate through the optimizee's gradients too
    sigma: float = 0.01  # es, pes: the perturbations' standard deviation
    pairs: int = 8  # es, pes: antithetic pairs per outer step

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ConfigError(
                f"algo.estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}"
            )
        if self.truncation < 1:
            raise ConfigError(f"algo.truncation must be >= 1, got {self.truncation}")
        if not 0 < self.outer_lr < math.inf:
            raise ConfigError(
                f"algo.outer_lr must be a positive, finite learning rate, got {self.outer_lr}"
            )
        if not (self.sigma > 0 and self.pairs >= 1):
            raise ConfigError(
                f"algo.sigma must be > 0 and algo.pairs >= 1, got {self.sigma} and {self.pairs}"
            )

    def check_data(self, data: Any) -> None:
        if self.estimator != "full" and self.truncation > data.steps:
            raise ConfigError(
                f"algo.truncation={self.truncation} is longer than the unroll "
                f"(data.steps={data.steps}); set algo.truncation <= data.steps, or "
                f"algo.estimator=full to backpropagate through the whole unroll"
            )


@dataclass
class Carry:
    """An unroll in progress: its problems, where it has got to, and each particle's state."""

    problems: Any
    step: int  # steps taken so far
    params: list[dict[str, Tensor]]  # one per particle (truncated: one; pes: 2 * pairs)
    states: list[dict[str, Tensor]]
    xi: list[Tensor] | None = None  # pes: each pair's accumulated perturbation (flat)


class L2O(Learner):
    """Meta-trains the model (a learned optimiser) on problems from an optimizee family."""

    family = "optimizers"
    optimizees = True
    pretrains = False
    needs_train_classes = False
    needs_ways = False
    needs_head = False
    reinforcement = False
    batches_tasks = False
    differentiates_inner_loop = False
    inner_loop = False
    first_order_switch = False
    checkpoint_switch = False
    outer_schedule = "constant"
    compiled = "meta_loss"

    def __init__(
        self, cfg: L2OConfig, model: nn.Module, kind: str, task_batching: str, *, steps: int
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.kind = kind
        self.steps = steps  # data.steps: the unroll's length
        self.carry: Carry | None = None

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    # -- one step of the optimizee ------------------------------------------------------------
    def _step(self, problems, params, state, step: int, weights=None):
        """f(theta_step) (T,), and the next (params, state) under the optimiser (its weights
        `weights` if given: a perturbed copy)."""
        second = self.cfg.second_derivatives and torch.is_grad_enabled()
        with torch.enable_grad():
            if not any(p.requires_grad for p in params.values()):
                params = {k: v.detach().requires_grad_() for k, v in params.items()}
            loss = problems.loss(params, step)
            grads = torch.autograd.grad(
                loss.sum(),
                list(params.values()),
                create_graph=second,
                retain_graph=True,
            )
        grads = dict(zip(params, grads, strict=True))
        if weights is None:
            new_params, new_state = self.model(params, grads, state)
        else:
            new_params, new_state = functional_call(self.model, weights, (params, grads, state))
        return loss, new_params, new_state

    def _window(self, problems, params, state, first: int, n: int, weights=None):
        """Take steps first .. first+n-1: the sum of the n losses after them (T,), the last of
        them (T,), and the params and state after."""
        total = 0.0
        for step in range(first, first + n):
            loss, params, state = self._step(problems, params, state, step, weights)
            total = total + (loss if step > first else 0.0)  # the start's: no gradient here
        last = problems.loss(params, first + n)
        return total + last, last.detach(), params, state

    # -- meta-training ------------------------------------------------------------------------
    def _start(self, problems, particles: int) -> Carry:
        start = problems.start
        state = self.model.init_state(start)
        return Carry(problems, 0, [dict(start)] * particles, [state] * particles)

    def meta_loss(self, batch: Any, iteration: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        if self.cfg.estimator == "full":
            carry = self._start(batch, 1)
            total, last, _, _ = self._window(batch, carry.params[0], carry.states[0], 0, self.steps)
            loss = total.mean()
            return loss, {"loss": loss.detach(), "score": last.mean()}
        particles = 2 * self.cfg.pairs if self.cfg.estimator == "pes" else 1
        if self.carry is not None and self.carry.problems.family is None:  # restored: re-attach
            self.carry.problems.family = batch.family
        if self.carry is None or self.carry.step >= self.steps:
            self.carry = self._start(batch, particles)
            if self.cfg.estimator == "pes":
                self.carry.xi = [torch.zeros_like(self._flat()) for _ in range(self.cfg.pairs)]
        n = min(self.cfg.truncation, self.steps - self.carry.step)
        if self.cfg.estimator == "truncated":
            return self._truncated(n)
        return self._evolution(n)

    def _truncated(self, n: int) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.carry
        total, last, params, state = self._window(c.problems, c.params[0], c.states[0], c.step, n)
        c.params[0] = {k: v.detach() for k, v in params.items()}
        c.states[0] = {k: v.detach() for k, v in state.items()}
        c.step += n
        loss = total.mean()
        return loss, {"loss": loss.detach(), "score": last.mean()}

    def _flat(self) -> Tensor:
        return flatten(dict(self.model.named_parameters())).detach()

    def _weights(self, flat: Tensor) -> dict[str, Tensor]:
        return unflatten(flat, dict(self.model.named_parameters()))

    @torch.no_grad()
    def _evolution(self, n: int) -> tuple[Tensor, dict[str, Tensor]]:
        """ES or PES on one window: the estimate as a surrogate objective's gradient."""
        c, cfg, phi = self.carry, self.cfg, self._flat()
        g_hat, losses, lasts = torch.zeros_like(phi), [], []
        for i in range(cfg.pairs):
            eps = cfg.sigma * torch.randn_like(phi)
            pair = []
            for sign, particle in ((1.0, 2 * i), (-1.0, 2 * i + 1)):
                index = particle if cfg.estimator == "pes" else 0
                total, last, params, state = self._window(
                    c.problems, c.params[index], c.states[index], c.step, n,
                    self._weights(phi + sign * eps),
                )  # fmt: skip
                if cfg.estimator == "pes":
                    c.params[index], c.states[index] = params, state
                pair.append(total.mean())
                lasts.append(last.mean())
            if cfg.estimator == "pes":
                c.xi[i] += eps
            direction = c.xi[i] if cfg.estimator == "pes" else eps
            g_hat += direction * (pair[0] - pair[1]) / (2 * cfg.pairs * cfg.sigma**2)
            losses += pair
        if cfg.estimator == "es":  # the shared state advances under phi itself
            _, _, c.params[0], c.states[0] = self._window(
                c.problems, c.params[0], c.states[0], c.step, n
            )
        c.step += n
        estimate = self._weights(g_hat).values()
        with torch.enable_grad():  # its gradient with respect to phi is the estimate
            pairs = zip(self.parameters(), estimate, strict=True)
            surrogate = sum((p * g).sum() for p, g in pairs)
        loss = torch.stack(losses).mean()
        return surrogate, {"loss": loss, "score": torch.stack(lasts).mean()}

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, batch: Any, steps: list[int]) -> dict[str, Tensor]:
        """Each problem's loss after each number of steps in `steps` (T, len(steps)), and its
        whole loss curve ('curve', (T, max(steps) + 1))."""
        params, state = dict(batch.start), self.model.init_state(batch.start)
        curve = []
        with torch.no_grad():
            for step in range(max(steps) + 1):
                loss, next_params, next_state = self._step(batch, params, state, step)
                curve.append(loss.detach())
                params = {k: v.detach() for k, v in next_params.items()}
                state = {k: v.detach() for k, v in next_state.items()}
        curve = torch.stack(curve, dim=1)  # (T, S + 1)
        chosen = curve[:, steps]
        return {"loss": chosen, "score": chosen, "curve": curve}

    def state_dict(self) -> dict:
        """The optimiser's weights, and the unroll in progress (so that a resumed run goes on
        with the same problems from the same step)."""
        c = self.carry
        carry = None
        if c is not None:
            problems = {"start": c.problems.start, "tensors": c.problems.tensors}
            carry = {
                "problems": problems | {"seed": c.problems.seed, "first": c.problems.first},
                "step": c.step,
                "params": c.params,
                "states": c.states,
                "xi": c.xi,
            }
        return {"model": self.model.state_dict(), "carry": carry}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        carry = state.get("carry")
        if carry is None:
            self.carry = None
            return
        p = carry["problems"]
        problems = Problems(p["start"], p["tensors"], None, p["seed"], p["first"])  # family: later
        self.carry = Carry(problems, carry["step"], carry["params"], carry["states"], carry["xi"])
