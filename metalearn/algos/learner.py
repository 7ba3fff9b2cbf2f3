"""What every learner declares about itself, so that nothing outside `algos/` guesses.

A learner class (or its family's base: `Bilevel`, `EpisodicLearner`, `Baseline`, `RL2`) states
each capability below as a class attribute. There is no default to fall back on: a class that
leaves one undeclared fails when it is defined, naming what is missing. build.py, the trainer
and the records read these attributes instead of probing with getattr or checking names.

It also supplies the advice a user reads when its training goes wrong: what to change when its
loss or meta-gradient is not finite, when some tasks diverge, and when memory runs out.

Its config dataclass subclasses `AlgoConfig`, which says the same for settings some algorithms
have and others lack (training-task shape, outer optimiser, reference protocol): each config
answers for itself, so build.py and the trainer never probe it for a field.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

FAMILIES = ("bilevel", "metric", "blackbox", "pretraining", "optimizers", "processes", "rl")
COMPILED = ("objective", "meta_loss")


class Learner:
    """The declarations and the advice every learner supplies (see the module docstring)."""

    family: ClassVar[str]  # one of FAMILIES
    # the sampler: plain labelled batches over all training classes (Baseline, RFS), or episodes
    pretrains: ClassVar[bool]
    needs_train_classes: ClassVar[bool]  # build.py passes the number of training classes
    needs_ways: ClassVar[bool]  # build.py passes the training ways (sequence learners' labels)
    needs_head: ClassVar[bool]  # the model ends in a linear layer with one output per way
    reinforcement: ClassVar[bool]  # meta-RL: an environment data set and a recurrent model
    # learned optimisers: optimizee problems (data=quadratic, digits_mlp) and an optimiser model
    optimizees: ClassVar[bool]
    # hardware.task_batching applies (vmap over the tasks of a meta-batch, or a loop)
    batches_tasks: ClassVar[bool]
    # gradients through gradients: under vmap only primitive BatchNorm is exact
    differentiates_inner_loop: ClassVar[bool]
    # an inner loop with algo.inner_lr and algo.inner_steps; with algo.first_order and
    # algo.checkpoint where these switches exist
    inner_loop: ClassVar[bool]
    first_order_switch: ClassVar[bool]
    checkpoint_switch: ClassVar[bool]
    outer_schedule: ClassVar[str]  # the outer learning rate's schedule unless trainer.lr_schedule
    compiled: ClassVar[str]  # the method hardware.compile wraps: one of COMPILED

    # Defaults most learners keep (not declarations): the metric a learner scores tasks by
    # when it is not its task kind's (neural processes: 'loglik', the predictive log-likelihood
    # per target point), and whether it takes context sets of different sizes in one batch
    # (data=gp pads them; a learner without this needs data.min_shots = data.shots >= 1).
    metric: ClassVar[str | None] = None
    variable_context: ClassVar[bool] = False
    # regression: `predict_distribution(support, x) -> (mean, std)`, a Gaussian predictive
    # (neural processes, ensembles), which the records draw as bands
    predictive: ClassVar[bool] = False
    # vmap inside each task (over particles): BatchNorm's fused kernel is then never exact under
    # second-order gradients, whatever hardware.task_batching says
    vmaps_within_tasks: ClassVar[bool] = False
    # meta-RL learners: the model= they train (RL²: 'recurrent', an actor-critic whose memory
    # learns; MAML-TRPO, E-MAML, ProMP: 'gaussian_mlp', a policy that gradient steps adapt) and
    # whether they act in continuous action spaces (the task family's must be the same kind)
    policy_model: ClassVar[str | None] = None
    continuous_actions: ClassVar[bool] = False
    # takes its outer step itself, `outer_step(batch, iteration)`, where that step is no
    # optimiser's gradient step (MAML-TRPO: TRPO's line-searched natural-gradient step): the
    # trainer then neither backpropagates nor steps an outer optimiser
    steps_itself: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        missing = [name for name in DECLARED if not hasattr(cls, name)]
        if missing:
            raise TypeError(
                f"{cls.__qualname__} must declare {', '.join(missing)} (see metalearn.algos."
                f"learner.Learner): every learner states what it is, nothing guesses"
            )
        if cls.family not in FAMILIES:
            raise TypeError(f"{cls.__qualname__}.family must be one of {FAMILIES}")
        if cls.compiled not in COMPILED:
            raise TypeError(f"{cls.__qualname__}.compiled must be one of {COMPILED}")

    # -- the training protocol ----------------------------------------------------------------
    def meta_loss(self, batch: Any, iteration: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def meta_losses(self, batch: Any, iteration: int = 0) -> Iterator[tuple[Tensor, dict]]:
        """The (loss, metrics) of each outer step on one meta-batch: one `meta_loss` for most
        learners; one that takes several steps per batch (PPO's epochs) yields each in turn."""
        yield self.meta_loss(batch, iteration)

    def outer_step(self, batch: Any, iteration: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """(`steps_itself` learners) Update the weights on one meta-batch; return the loss before
        the step (detached) and the training metrics, as `meta_loss` does."""
        raise NotImplementedError

    # -- advice -------------------------------------------------------------------------------
    def nonfinite_causes(self, gradient: bool) -> list[str]:
        """Likely causes, with the keys to change, of a non-finite loss (or, with `gradient`, a
        non-finite meta-gradient after a finite loss) besides the outer step."""
        return []

    def divergence_advice(self) -> str:
        """What to change when some tasks' inner loops diverge."""
        return "lower algo.inner_lr"

    def memory_advice(self) -> tuple[str, list[str], list[str]]:
        """For an out-of-memory error: what ran (e.g. "second-order maml (...)"), the settings
        to try before a smaller meta-batch, and those to try after it."""
        return "", [], []


# the capabilities above without a default, by name: what __init_subclass__ checks and the
# tests list
DECLARED: tuple[str, ...] = tuple(
    name for name in Learner.__annotations__ if name not in vars(Learner)
)
Learner.DECLARED = DECLARED


@dataclass(frozen=True)
class OuterOptimizer:
    """The outer optimiser a config asks for: Adam (the default) or SGD."""

    kind: str = "adam"  # or 'sgd'
    momentum: float = 0.0  # SGD's
    weight_decay: float = 0.0
    eps: float = 1e-8  # Adam's epsilon


class AlgoConfig:
    """The base of every algorithm's config dataclass: class constants and methods only, so that
    its YAML lists exactly the dataclass's own fields. A config whose algorithm has one of the
    settings below overrides the method that reports it."""

    # the authors' reference code ('source') and the value of each setting in it, for
    # results.json's protocol.reference; empty: the algorithm has no such table
    REFERENCE: ClassVar[dict[str, Any]] = {}
    # other names this config serves (fomaml, baselinepp, ...) and the defaults each changes
    VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {}

    def train_shape(self) -> tuple[int | None, int | None, int | None]:
        """(ways, shots, query) of meta-training tasks where they differ from the data set's
        (None: the data set's own)."""
        return None, None, None

    def outer_optimizer_settings(self) -> OuterOptimizer:
        """The outer optimiser and its settings besides the learning rate."""
        return OuterOptimizer()

    def running_batchnorm(self) -> bool:
        """Whether the model's BatchNorm layers keep running statistics buffers, which the
        algorithm fills and tests with (build.py passes it to the model)."""
        return False

    def check_data(self, data: Any) -> None:
        """Raise a ConfigError when this config cannot train on `data` (the data set's config):
        say what to change. Most configs fit any data set of their task kind."""

    def shape_advice(self, problem: str) -> str:
        """The error to raise, saying what to change, when the training split cannot fill this
        config's training tasks for `problem` (empty: the data set's own error says it all)."""
        return ""
