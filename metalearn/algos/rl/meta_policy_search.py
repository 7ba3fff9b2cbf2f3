"""What the gradient-based meta-RL learners share (MAML-TRPO, E-MAML: maml_trpo.py; ProMP:
promp.py): the settings of the policy-gradient inner loop, the trajectories of a meta-batch at
each stage of adaptation, the inner steps again with the graph (for the meta-gradient), and the
test: a policy's return before adaptation and after each inner step on fixed tasks.

A meta-batch is played as the authors' trainers play it (cbfinn/maml_rl
`sandbox/rocky/tf/algos/batch_maml_polopt.py` `train`, jonasrothfuss/ProMP
`meta_policy_search/meta_trainer.py` `Trainer.train`, tristandeleu/pytorch-maml-rl
`maml_rl/samplers/multi_task_sampler.py`): N trajectories of each task with the pre-update
policy theta, one inner policy-gradient step per task on them, N trajectories with the adapted
policy phi_t, and so on for `inner_steps` steps; the outer objective is then built on the last
stage's (post-update) trajectories. Trajectories are data: the meta-gradient flows through the
inner steps' parameters, not through the sampling distribution (E-MAML and ProMP each add a
term for that).
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from metalearn.algos.learner import AlgoConfig, Learner
from metalearn.algos.rl.trajectories import Params, Trajectories, adapt, per_task, sample
from metalearn.errors import ConfigError
from metalearn.models.policy import GaussianMLPPolicy


@dataclass
class MetaPolicyConfig(AlgoConfig):
    """The inner loop and the sampling of the gradient-based meta-RL learners."""

    name: str = "maml_trpo"
    inner_lr: float = 0.1  # alpha, the fast learning rate (the paper's 0.1 for navigation)
    # policy-gradient steps of adaptation in training (maml_rl's num_grad_updates); 0: none, the
    # policy is trained on the pre-update return of every task (the MAML paper's "pretrained"
    # baseline, algo=pretrained_trpo) and adapted by the same steps only at test
    inner_steps: int = 1
    test_inner_steps: int | None = None  # at validation and test (None: inner_steps)
    test_inner_lr: float | None = None  # at validation and test (None: inner_lr)
    trajectories: int = 20  # per task and stage of adaptation (maml_rl's fast_batch_size)
    gamma: float = 0.99  # discount of the returns
    gae_lambda: float = 1.0  # GAE's lambda (1: discounted returns minus the linear baseline)
    normalize_advantages: bool = True  # per task, to zero mean and unit std (rllab's center_adv)

    def __post_init__(self) -> None:
        if self.test_inner_steps is None:
            self.test_inner_steps = self.inner_steps
        if self.test_inner_lr is None:
            self.test_inner_lr = self.inner_lr
        for key in ("inner_lr", "test_inner_lr"):
            if not 0 < getattr(self, key) < math.inf:
                raise ConfigError(
                    f"algo.{key} must be positive and finite, got {getattr(self, key)}"
                )
        if self.inner_steps < 0 or self.test_inner_steps < 0:
            raise ConfigError(
                f"algo.inner_steps and algo.test_inner_steps must be >= 0 (0 in training: the "
                f"pretrained baseline), got {self.inner_steps} and {self.test_inner_steps}"
            )
        if self.trajectories < 2:
            raise ConfigError(
                f"algo.trajectories must be at least 2 per task (the linear baseline and the "
                f"advantages' normalisation are fitted on them; the paper samples 20), got "
                f"{self.trajectories}"
            )
        for key in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"algo.{key} must be in [0, 1], got {getattr(self, key)}")


class MetaPolicySearch(Learner):
    """A Gaussian MLP policy meta-learned so that policy-gradient steps adapt it to a task."""

    family = "rl"
    pretrains = False
    needs_train_classes = False
    needs_ways = False
    needs_head = True  # the policy's mean has one output per action dimension
    reinforcement = True  # build.py: a meta-RL task family with continuous actions
    policy_model = "gaussian_mlp"
    continuous_actions = True
    optimizees = False
    batches_tasks = False  # the tasks are vmapped inside, whatever hardware.task_batching says
    differentiates_inner_loop = True
    inner_loop = True
    first_order_switch = False
    checkpoint_switch = False
    outer_schedule = "constant"
    compiled = "meta_loss"
    metric = "return"  # an episode's undiscounted return (maml_rl's AverageReturn)
    inner_objective = "log_likelihood"  # see trajectories.inner_loss

    def __init__(
        self, cfg: MetaPolicyConfig, model: GaussianMLPPolicy, kind: str, task_batching: str
    ) -> None:
        self.cfg = cfg
        self.model = model

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def stages(self, batch, steps: int, lr: float) -> Iterator[Trajectories]:
        """The trajectories of each stage 0..steps of adaptation (no graph): stage k is played
        by the policy after k inner steps, each on the stage before's trajectories."""
        cfg = self.cfg
        params = per_task({k: v.detach() for k, v in self.model.params().items()}, batch.tasks)
        for stage in range(steps + 1):
            played = sample(
                self.model,
                params,
                batch,
                stage,
                cfg.trajectories,
                cfg.gamma,
                cfg.gae_lambda,
                cfg.normalize_advantages,
            )
            yield played
            if stage < steps:
                with torch.no_grad():
                    params = adapt(self.model, params, played, lr, self.inner_objective)

    def sample_meta_batch(self, batch) -> list[Trajectories]:
        """Pre-update trajectories, then those after each of the `inner_steps` inner steps."""
        return list(self.stages(batch, self.cfg.inner_steps, self.cfg.inner_lr))

    def adapted(self, params: Params, stages: list[Trajectories]) -> list[Params]:
        """theta_0 = params for every task, theta_k+1 = theta_k - alpha grad L_in(theta_k) on
        stage k's trajectories: the parameters of each stage (T, ...), differentiable."""
        chain = [per_task(params, stages[0].rewards.shape[0])]
        for played in stages[:-1]:
            lr, objective = self.cfg.inner_lr, self.inner_objective
            chain.append(adapt(self.model, chain[-1], played, lr, objective))
        return chain

    def sampled_metrics(self, stages: list[Trajectories]) -> dict[str, Tensor]:
        """The mean return over the meta-batch before adaptation and after it (the score)."""
        return {"score": stages[-1].returns().mean(), "return_pre": stages[0].returns().mean()}

    def evaluate(self, batch, steps: list[int]) -> dict[str, Tensor]:
        """Per task (T, len(steps)): the mean return of its N trajectories after each number of
        inner steps in `steps` (the score), and minus it (the loss)."""
        cfg = self.cfg
        played = self.stages(batch, max(steps), cfg.test_inner_lr)
        returns = torch.stack([trajectories.returns() for trajectories in played], 1)
        score = returns[:, steps]
        return {"score": score, "loss": -score}

    def predict(self, *_args, **_kwargs):
        raise ConfigError(
            f"algo={self.cfg.name} acts in environments; it does not classify user episodes"
        )

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])

    def divergence_advice(self) -> str:
        return "lower algo.inner_lr (or algo.test_inner_lr)"
