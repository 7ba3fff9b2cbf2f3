"""The causal-reasoning quiz's reference agents (Dasgupta et al. 2019, section 4), exact per graph.

Each knows the trial's graph (the paper's baselines receive the true causal graph) and differs
only in the reasoning behind its quiz choice: the observed node with the highest expected value
once the quiz sets X_q = -5 (see envs/causal_graphs.py for the expectations):
- associative: by E[X_i | X_q = -5], reading the quiz as an observation, which is wrong when a
  hidden confounder (or a parent of X_q) links X_q to other nodes: the paper's "optimal
  associative baseline";
- interventional: by E[X_i | do(X_q = -5)]: the paper's "optimal cause-effect baseline";
- counterfactual (counterfactual variant): by the expected values of the last information step
  had its intervention been do(X_q = -5), its noise abducted exactly from what that step
  showed: the paper's "optimal counterfactual baseline";
- random: a uniformly random node (and random information actions);
- bayes_observational (observational variant): the best an agent that does not know the graph
  can do with the information phase's samples: the posterior over every graph given them
  (uniform prior; causal_graphs.graph_posterior), then the node of highest posterior mean of
  E[X_i | do(X_q = -5)]. It bounds what the observational RL² agent can learn from its 4
  samples, where the associative baseline is given the graph itself.

In the information phase the informed agents intervene on each observed node in turn (their
quiz reasoning needs no data but the counterfactual agent's, which abducts from the last step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from metalearn.envs.causal_graphs import (
    associative_means,
    counterfactual_means,
    graph_posterior,
    interventional_means,
    observed_precisions,
)

if TYPE_CHECKING:  # the types only: causal.py imports this module for its baselines
    from metalearn.envs.causal import CausalBatch, CausalEnv


class CausalPolicy:
    """What every reference agent shares: information actions on each observed node in turn,
    then the quiz action of the observed node `quiz_means` rates highest."""

    def start(self, env: CausalEnv, observation: Tensor, seed: int) -> None:
        self.batch: CausalBatch = env.batch
        self.observation, self.t = observation, 0
        self.intervened = torch.full_like(env.batch.quiz_node, -1)  # the last step's node

    def act(self) -> Tensor:
        cfg = self.batch.cfg
        if self.t < self.batch.steps - 1:
            return self.information_action()
        node = self.quiz_means()[:, 1:].argmax(1)  # (T,) among the observed nodes
        return node + (cfg.observed if cfg.separate_quiz_actions else 0)

    def information_action(self) -> Tensor:
        return torch.full_like(self.batch.quiz_node, self.t % self.batch.cfg.observed)

    def quiz_node(self) -> Tensor:
        """The quiz's node (T,), as the observation's one-hot shows it."""
        return self.observation[:, self.batch.cfg.observed :].argmax(1) + 1

    def quiz_means(self) -> Tensor:
        """What the agent expects of each node (T, N) in the quiz."""
        raise NotImplementedError

    def observe(self, actions: Tensor, rewards: Tensor, observation: Tensor, done: Tensor) -> None:
        cfg = self.batch.cfg
        intervenes = (actions < cfg.observed) & (cfg.variant != "observational")
        self.intervened = torch.where(intervenes, actions + 1, -1)
        self.observation = observation
        self.t += 1


class Associative(CausalPolicy):
    def quiz_means(self) -> Tensor:
        return associative_means(self.batch.weights, self.quiz_node(), self.batch.cfg.quiz_value)


class Interventional(CausalPolicy):
    def quiz_means(self) -> Tensor:
        b = self.batch
        return interventional_means(b.weights, self.quiz_node(), b.cfg.quiz_value)


class Counterfactual(CausalPolicy):
    def quiz_means(self) -> Tensor:
        b = self.batch
        values = F.pad(self.observation[:, : b.cfg.observed], (1, 0))  # the hidden node: unseen
        node = self.quiz_node()
        return counterfactual_means(b.weights, values, self.intervened, node, b.cfg.quiz_value)


class RandomChoice(CausalPolicy):
    """Uniformly random information actions and quiz choice, from the trials' action uniforms."""

    def information_action(self) -> Tensor:
        observed = self.batch.cfg.observed
        return (self.batch.action_noise[:, self.t] * observed).long().clamp_max(observed - 1)

    def quiz_means(self) -> Tensor:  # a random node rated highest
        chosen = self.information_action() + 1
        return F.one_hot(chosen, self.batch.cfg.nodes).to(self.observation.dtype)


class BayesObservational(CausalPolicy):
    """Infers the graph from the observational samples of the information phase: the posterior
    over `graphs` (G, N, N; every graph), then the interventional means it averages to."""

    def __init__(self, graphs: Tensor, chunk: int = 256) -> None:
        self.graphs, self.chunk = graphs, chunk
        self.precisions, self.logdets = observed_precisions(graphs.double())
        nodes = graphs.shape[-1]
        self.means = torch.stack(  # (G, K, N): E[X | do(X_q = quiz value)] for q = 1..K
            [
                interventional_means(graphs.double(), torch.full_like(graphs[:, 0, 0], q).long(), 1)
                for q in range(1, nodes)
            ],
            1,
        )

    def start(self, env: CausalEnv, observation: Tensor, seed: int) -> None:
        super().start(env, observation, seed)
        self.samples: list[Tensor] = []

    def observe(self, actions: Tensor, rewards: Tensor, observation: Tensor, done: Tensor) -> None:
        super().observe(actions, rewards, observation, done)
        if self.t <= self.batch.steps - 1:  # the sample of an information step
            self.samples.append(observation[:, : self.batch.cfg.observed].double())

    def quiz_means(self) -> Tensor:
        cfg, samples = self.batch.cfg, torch.stack(self.samples, 1)  # (T, S, K)
        node = self.quiz_node()
        parts = []
        for start in range(0, len(samples), self.chunk):
            rows = slice(start, start + self.chunk)
            posterior = graph_posterior(samples[rows], self.precisions, self.logdets, cfg.noise_std)
            means = self.means[:, node[rows] - 1]  # (G, t, N), linear in the quiz value
            parts.append(torch.einsum("tg,gtn->tn", posterior, means) * cfg.quiz_value)
        return torch.cat(parts).to(self.observation.dtype)


def causal_baselines(variant: str, graphs: Tensor | None = None) -> dict[str, CausalPolicy]:
    """name -> policy, scored on the same test trials as a learned agent (`graphs`: every graph's
    weights, the support of the observational Bayes agent's posterior)."""
    policies = {"random": RandomChoice(), "associative": Associative()}
    policies["interventional"] = Interventional()
    if variant == "counterfactual":
        policies["counterfactual"] = Counterfactual()
    if variant == "observational" and graphs is not None:
        policies["bayes_observational"] = BayesObservational(graphs)
    return policies
