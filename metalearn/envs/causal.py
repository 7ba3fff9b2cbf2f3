"""Causal reasoning from meta-RL (Dasgupta et al. 2019): quizzes on random linear-Gaussian graphs.

Definitions followed from the paper (arXiv 1901.08162, section 3):
- A task is a causal graph over N = 5 nodes with edges only above the diagonal of the adjacency
  matrix (so acyclic), each weight w_ji in {-1, 0, 1}: all 3^(N(N-1)/2) = 59049 graphs. A node
  is X_i = sum_j w_ji X_j + e_i, e_i ~ N(0, 0.1^2): the paper's N(mu = 0, sigma = 0.1), a
  standard deviation of 0.1 (`noise_std`). Node 0, a root of every graph, is hidden (it can be a
  confounder); the agent sees the other N - 1 nodes.
- A trial is T = N steps: T - 1 = 4 information steps, then one quiz step. An information
  action intervenes on an observed node, do(X_i = 5), and the agent then sees a sample of the
  graph under it. In the quiz the environment sets a random observed node to -5 and the agent
  picks a node: its reward is that node's sampled value; information steps pay 0.
- The observation is o_t = [v_t, m_t]: the observed nodes' values and a one-hot of the quiz's
  intervention, zero before the quiz (RL² adds the previous action and reward itself).
- The paper's 2(N - 1) actions (`separate_quiz_actions=true`): N - 1 information actions, then
  N - 1 quiz actions (choose node i); one used in the wrong phase costs `penalty` = 10 and does
  nothing (an information step then shows a sample with no intervention).
- Variants: observational (information actions are ignored: every information step shows a
  sample of the graph itself), interventional (as above), counterfactual (interventional, and the
  quiz asks what the nodes would have been in the last information step had its intervention been
  do(X_q = -5): the quiz reuses that step's noise).

Choices where the paper is silent or could not be checked (only excerpts of it were reachable):
- The held-out graphs. The paper holds out test graphs with every graph that is the same up to
  a relabelling of the nodes; here the classes of relabelled graphs (that stay upper-triangular)
  are shuffled with `split_seed` and whole classes go to test until it holds `test_graphs` (300),
  then to validation until `val_graphs` (300; the paper has no validation set); the rest train.
- The default action space is the N - 1 observed nodes: action i intervenes on node i in the
  information phase and chooses it in the quiz (`separate_quiz_actions=false`). With the paper's
  2(N - 1) actions our A2C (rl2, 2000 iterations of 1024 trials, the paper's settings or ours)
  settles within 150 iterations on never taking a quiz action: -10 a trial, every trial, with
  nothing left to explore.
- Node order is fixed (the hidden node is always node 0; no permutation per trial).
- The trial's first observation is all zeros; the quiz's one-hot arrives with the outcome of the
  last information step (the observation on which the quiz action is chosen).
- The observational variant charges the penalty for quiz actions taken before the quiz too.
- A trial's expected regret: the quiz's best expected value minus that of the node chosen, by
  the graph (counterfactual: by the posterior of the shared noise given the last information
  step, see causal_graphs.py), plus any penalty paid.

Randomness travels with the batch (see envs/trials.py): the graph, the quiz node, every step's
standard-normal noise (T, P, N) and the action uniforms, so every policy plays the same trials.

Shape letters: T trials, P steps of a trial, N nodes (node 0 hidden), K = N - 1 observed nodes.
"""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metalearn.envs.causal_baselines import causal_baselines
from metalearn.envs.causal_graphs import (
    all_graphs,
    counterfactual_means,
    graph_split,
    interventional_means,
    sem_values,
)
from metalearn.envs.trials import TrialBatch, TrialEnv, TrialTasks
from metalearn.errors import ConfigError

VARIANTS = ("observational", "interventional", "counterfactual")


@dataclass
class CausalConfig:
    """Quizzes on random causal graphs: which node is highest when one is set to -5?"""

    task_kind: ClassVar[str] = "rl"
    name: str = "causal"
    variant: str = "interventional"  # observational, interventional or counterfactual
    nodes: int = 5  # N, node 0 hidden (every graph is enumerated: 3 to 5)
    info_steps: int = 4  # T - 1 information steps before the quiz
    noise_std: float = 0.1  # sigma of every node's Gaussian noise
    intervention_value: float = 5.0  # an information action sets its node to this
    quiz_value: float = -5.0  # the quiz sets its node to this
    separate_quiz_actions: bool = False  # true: the paper's 2(N - 1) actions; false: N - 1
    penalty: float = 10.0  # the cost of an action used in the wrong phase
    test_graphs: int = 300  # held-out graphs (whole classes of relabelled graphs) ...
    val_graphs: int = 300  # ... and validation graphs, drawn with ...
    split_seed: int = 0  # ... this seed: the same split for every run
    root: str | None = None  # unused: procedural tasks need no files
    split: str | None = None  # unused: the graphs are split by split_seed

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(
                f"data.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}"
            )
        if self.nodes not in (3, 4, 5):
            raise ConfigError(
                f"data.nodes must be 3, 4 or 5 (all 3^(N(N-1)/2) graphs are enumerated; N = 6 "
                f"would be 14 million), got {self.nodes}"
            )
        if self.info_steps < 1:
            raise ConfigError(f"data.info_steps must be at least 1, got {self.info_steps}")
        if not 0 < self.noise_std < float("inf"):
            raise ConfigError(f"data.noise_std must be positive and finite, got {self.noise_std}")
        if self.penalty < 0:
            raise ConfigError(f"data.penalty must be >= 0 (a cost), got {self.penalty}")
        total = 3 ** (self.nodes * (self.nodes - 1) // 2)
        if (
            min(self.test_graphs, self.val_graphs) < 1
            or self.test_graphs + self.val_graphs > total // 2
        ):
            raise ConfigError(
                f"data.test_graphs and data.val_graphs must be positive and leave at least half of "
                f"the {total} graphs of data.nodes={self.nodes} for training, got "
                f"{self.test_graphs} and {self.val_graphs}; lower them"
            )

    @property
    def observed(self) -> int:
        return self.nodes - 1

    @property
    def actions(self) -> int:
        return 2 * self.observed if self.separate_quiz_actions else self.observed

    @property
    def steps(self) -> int:
        return self.info_steps + 1

    def describe(self) -> dict:
        return {"nodes": self.nodes, "info_steps": self.info_steps, "variant": self.variant}


@dataclass
class CausalBatch(TrialBatch):
    """T trials: each graph, the quiz's node and every step's noise."""

    graph: Tensor  # (T,) index into all_graphs
    weights: Tensor  # (T, N, N) W[j, i] = w_ji
    quiz_node: Tensor  # (T,) the node the quiz sets to quiz_value, 1..N-1
    noise: Tensor  # (T, P, N) standard normals
    action_noise: Tensor  # (T, P)
    cfg: CausalConfig
    unit = "trials"

    def env(self) -> "CausalEnv":
        return CausalEnv(self)


class CausalEnv(TrialEnv):
    """T trials at once (Gymnasium's vector API on torch tensors): `step(actions)` is one
    information step, or the quiz; observations are (T, 2K): the observed nodes, then the one-hot
    of the quiz's node (only on the observation the quiz action is chosen on)."""

    def __init__(self, batch: CausalBatch) -> None:
        super().__init__(batch, (2 * batch.cfg.observed,), batch.cfg.actions, -np.inf, np.inf)
        self.values = torch.zeros_like(batch.noise[:, 0])  # the last sample (T, N), hidden included
        self.intervened = torch.full_like(batch.quiz_node, -1)  # the last information step's node

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.values = torch.zeros_like(self.values)
        self.intervened = torch.full_like(self.intervened, -1)
        return super().reset(seed=seed, options=options)

    def _observation(self) -> Tensor:
        quiz = F.one_hot(self.batch.quiz_node - 1, self.batch.cfg.observed).to(self.values.dtype)
        return torch.cat([self.values[:, 1:], quiz * (self.t == self.batch.steps - 1)], -1)

    def step(self, actions: Tensor):
        t = self._next_step()
        quiz = t == self.batch.steps - 1
        reward, regret = self._quiz(actions, t) if quiz else self._inform(actions, t)
        done = torch.full_like(actions, quiz, dtype=torch.bool)  # a trial is one episode
        info = {"regret": regret, "trial_over": quiz}
        return self._observation(), reward, done, torch.zeros_like(done), info

    def _inform(self, actions: Tensor, t: int) -> tuple[Tensor, Tensor]:
        b, cfg = self.batch, self.batch.cfg
        legal = actions < cfg.observed
        node = torch.where(legal, actions + 1, -1)
        if cfg.variant == "observational":  # the agent's actions are ignored
            node = torch.full_like(node, -1)
        noise = cfg.noise_std * b.noise[:, t]
        self.values = sem_values(b.weights, noise, node, cfg.intervention_value)
        self.intervened = node
        paid = torch.where(legal, 0.0, cfg.penalty).to(self.values.dtype)
        return -paid, paid

    def _quiz(self, actions: Tensor, t: int) -> tuple[Tensor, Tensor]:
        b, cfg = self.batch, self.batch.cfg
        counterfactual = cfg.variant == "counterfactual"
        noise = cfg.noise_std * b.noise[:, t - 1 if counterfactual else t]
        if counterfactual:  # what the best informed agent expects, from the last step seen
            means = counterfactual_means(b.weights, self.values, self.intervened, b.quiz_node,
                                         cfg.quiz_value)  # fmt: skip
        else:  # what an agent that knows the graph expects
            means = interventional_means(b.weights, b.quiz_node, cfg.quiz_value)
        offset = cfg.observed if cfg.separate_quiz_actions else 0
        legal = actions >= offset
        chosen = (actions - offset).clamp_min(0)[:, None] + 1
        self.values = sem_values(b.weights, noise, b.quiz_node, cfg.quiz_value)
        reward = torch.where(legal, self.values.gather(1, chosen)[:, 0], -cfg.penalty)
        expected = torch.where(legal, means.gather(1, chosen)[:, 0], -cfg.penalty)
        return reward, means[:, 1:].max(1).values - expected


class CausalTasks(TrialTasks):
    """Draws trials on each split's own graphs, on the device."""

    def __init__(self, cfg: CausalConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.actions = cfg.actions
        self.in_shape = (2 * cfg.observed,)
        split = graph_split(cfg.nodes, cfg.test_graphs, cfg.val_graphs, cfg.split_seed)
        self.graphs = {name: torch.from_numpy(graphs) for name, graphs in split.items()}
        self.weights = torch.from_numpy(all_graphs(cfg.nodes)).float().to(device)

    def baselines(self) -> dict:
        """Random choices; the best associative and interventional agents that know the graph
        (and, in the counterfactual variant, the best counterfactual one; in the observational
        variant, the Bayes-optimal agent that infers the graph from its samples)."""
        return causal_baselines(self.cfg.variant, self.weights)

    def subsets(self, batch: CausalBatch) -> dict[str, Tensor]:
        """Trials whose quiz node shares the hidden root as a parent with another observed node
        (an unobserved confounder: conditioning then differs from intervening), and the rest."""
        root = batch.weights[:, 0, 1:] != 0  # (T, K) the hidden root's observed children
        quiz = root.gather(1, batch.quiz_node[:, None] - 1)[:, 0]
        confounded = quiz & (root.sum(1) > 1)
        return {"confounded": confounded, "unconfounded": ~confounded}

    def sample(self, split: str, generator: torch.Generator, tasks: int, *_shape) -> CausalBatch:
        cfg, g = self.cfg, generator

        def draw(fn, *shape: int) -> Tensor:
            return fn(shape, generator=g, device=g.device).to(self.device)

        graphs = self.graphs[split]
        graph = graphs[(draw(torch.rand, tasks).cpu() * len(graphs)).long()].to(self.device)
        quiz_node = 1 + (draw(torch.rand, tasks) * cfg.observed).long()
        noise = draw(torch.randn, tasks, cfg.steps, cfg.nodes)
        return CausalBatch(graph, self.weights[graph], quiz_node, noise,
                           draw(torch.rand, tasks, cfg.steps), cfg)  # fmt: skip
