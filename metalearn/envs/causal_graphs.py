"""Causal graphs for the causal-reasoning quiz (envs/causal.py): every graph, its classes of
relabelled twins, the held-out split, and exact linear-Gaussian SEM computations.

A graph's weights W (N, N) hold W[j, i] = w_ji, the weight of the edge j -> i (j < i: upper-
triangular, so acyclic); its nodes are X = W^T X + e, i.e. X = (I - W^T)^-1 e, with I - W^T
unit lower-triangular. do(X_q = v) cuts the edges into X_q and replaces e_q by v.

What an agent that knows the graph expects of each node once the quiz sets X_q = -5:
- associative: E[X_i | X_q = -5] from the graph's observational joint Gaussian over all nodes,
  the hidden one marginalised: Sigma_iq / Sigma_qq * (-5), Sigma = sigma^2 (I - W^T)^-1 (I - W)^-1;
- interventional: E[X_i | do(X_q = -5)], the SEM with zero noise (it is linear);
- counterfactual: E[X_i] in a step that showed x under some intervention, had it been
  do(X_q = -5) instead, by exact abduction of that step's noise: e_i = x_i - sum_j w_ji x_j for
  each observed node not intervened on, where the hidden root's x_0 = e_0 is unseen. With
  r_i the residual taking x_0 = 0, r_i = e_i + w_0i e_0, and all noises N(0, sigma^2), e_0's
  posterior mean is sum_i w_0i r_i / (1 + sum_i w_0i^2) and E[e_i] = r_i - w_0i E[e_0]; the
  intervened node's noise keeps its prior mean 0. Values are linear in the noise, so the
  expected counterfactual values are the SEM at the expected noise.

What an agent that does not know the graph can infer from observational samples: the posterior
over graphs (`graph_posterior`), each graph's likelihood that of the samples of the observed
nodes under its observational Gaussian N(0, sigma^2 Sigma_KK), the hidden node marginalised.
"""

import functools
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@functools.cache
def all_graphs(nodes: int) -> np.ndarray:
    """Every graph's weights (G, N, N) int8, W[j, i] = w_ji of the edge j -> i (j < i): graph g's
    e-th edge (in np.triu_indices order) has weight (base-3 digit e of g) - 1."""
    rows, cols = np.triu_indices(nodes, 1)
    digits = np.arange(3 ** len(rows))[:, None] // 3 ** np.arange(len(rows)) % 3
    graphs = np.zeros((len(digits), nodes, nodes), np.int8)
    graphs[:, rows, cols] = digits - 1
    return graphs


def graph_index(graphs: np.ndarray) -> np.ndarray:
    """The index in `all_graphs` of upper-triangular weights (G, N, N)."""
    rows, cols = np.triu_indices(graphs.shape[-1], 1)
    return ((graphs[:, rows, cols] + 1).astype(np.int64) * 3 ** np.arange(len(rows))).sum(1)


@functools.cache
def graph_classes(nodes: int) -> np.ndarray:
    """Each graph's class of structurally identical graphs (G,): the lowest index of the graphs
    it becomes under a relabelling of its nodes that keeps it upper-triangular."""
    graphs = all_graphs(nodes)
    lower = np.tril_indices(nodes)
    lowest = np.arange(len(graphs))
    for order in itertools.permutations(range(nodes)):
        relabelled = graphs[:, order][:, :, order]  # new node a is old node order[a]
        upper = (relabelled[:, lower[0], lower[1]] == 0).all(1)
        lowest = np.where(upper, np.minimum(lowest, graph_index(relabelled)), lowest)
    return lowest


def graph_split(nodes: int, test: int, val: int, seed: int) -> dict[str, np.ndarray]:
    """split -> its graphs' indices: whole classes, shuffled with `seed`, go to test until it
    holds `test` graphs, then to val until it holds `val`; the other graphs train."""
    classes = graph_classes(nodes)
    names, sizes = np.unique(classes, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(names))
    filled = np.cumsum(sizes[order])
    test_end = int(np.searchsorted(filled, test)) + 1
    val_end = int(np.searchsorted(filled, filled[test_end - 1] + val)) + 1
    held = {"test": names[order[:test_end]], "val": names[order[test_end:val_end]]}
    split = {name: np.flatnonzero(np.isin(classes, chosen)) for name, chosen in held.items()}
    split["train"] = np.flatnonzero(~np.isin(classes, names[order[:val_end]]))
    return split


def sem_values(weights: Tensor, noise: Tensor, node: Tensor, value: float) -> Tensor:
    """The nodes (T, N) of X = W^T X + noise under do(X_node = value) (node -1: no intervention):
    the edges into `node` are cut and its noise replaced by the value, then X = (I - W^T)^-1 noise
    (I - W^T is unit lower-triangular: one triangular solve)."""
    n = weights.shape[-1]
    chosen = F.one_hot(node.clamp_min(0), n).bool() & (node >= 0)[:, None]  # (T, N)
    cut = weights.masked_fill(chosen[:, None, :], 0.0)  # W[:, j, node] = 0 for every parent j
    noise = torch.where(chosen, torch.full_like(noise, value), noise)
    eye = torch.eye(n, dtype=weights.dtype, device=weights.device)
    solve = torch.linalg.solve_triangular
    return solve(eye - cut.transpose(1, 2), noise[..., None], upper=False, unitriangular=True)[
        ..., 0
    ]


def interventional_means(weights: Tensor, node: Tensor, value: float) -> Tensor:
    """E[X | do(X_node = value)] (T, N): the SEM with zero noise (it is linear)."""
    return sem_values(weights, torch.zeros_like(weights[:, 0]), node, value)


def associative_means(weights: Tensor, node: Tensor, value: float) -> Tensor:
    """E[X | X_node = value] (T, N) under the graph's observational joint Gaussian: the noise
    scale cancels in Sigma_iq / Sigma_qq, so unit noise serves."""
    n = weights.shape[-1]
    eye = torch.eye(n, dtype=weights.dtype, device=weights.device).expand_as(weights)
    mix = torch.linalg.solve_triangular(eye - weights.transpose(1, 2), eye, upper=False)  # X = M e
    covariance = mix @ mix.transpose(1, 2)  # (T, N, N) / sigma^2
    column = covariance.gather(2, node.view(-1, 1, 1).expand(-1, n, 1))[..., 0]  # Sigma[:, :, q]
    return column / column.gather(1, node[:, None]) * value


def counterfactual_means(
    weights: Tensor, values: Tensor, intervened: Tensor, node: Tensor, value: float
) -> Tensor:
    """E[X] (T, N) of the step that showed `values` (T, N; the hidden values[:, 0] is not read)
    under `intervened` (-1: none), had its intervention been do(X_node = value) instead."""
    n = weights.shape[-1]
    seen = values.clone()
    seen[:, 0] = 0  # the hidden root: its part is abducted below
    residual = values - (weights.transpose(1, 2) @ seen[..., None])[..., 0]  # e_i + w_0i e_0
    known = torch.ones_like(values, dtype=torch.bool)
    known[:, 0] = False
    known &= ~(torch.arange(n, device=values.device) == intervened[:, None])
    root = weights[:, 0] * known  # w_0i of the nodes whose noise the step shows
    root_noise = (root * residual).sum(1) / (1 + root.square().sum(1))  # E[e_0 | step]
    noise = torch.where(known, residual - weights[:, 0] * root_noise[:, None], 0.0)
    noise[:, 0] = root_noise
    return sem_values(weights, noise, node, value)


def observed_precisions(weights: Tensor) -> tuple[Tensor, Tensor]:
    """Each graph's observational covariance of the observed nodes 1..N-1 at unit noise,
    Sigma_KK = (M M^T)[1:, 1:] with X = M e: its inverse (G, K, K) and log-determinant (G,)."""
    n = weights.shape[-1]
    eye = torch.eye(n, dtype=weights.dtype, device=weights.device).expand_as(weights)
    mix = torch.linalg.solve_triangular(eye - weights.transpose(1, 2), eye, upper=False)
    covariance = (mix @ mix.transpose(1, 2))[:, 1:, 1:]
    return torch.linalg.inv(covariance), torch.linalg.slogdet(covariance).logabsdet


def graph_posterior(
    samples: Tensor, precisions: Tensor, logdets: Tensor, noise_std: float
) -> Tensor:
    """P(graph | samples) (T, G) under a uniform prior over the G graphs: samples (T, S, K) of
    the observed nodes, each N(0, noise_std^2 Sigma_KK(g)) and independent."""
    scatter = samples.mT @ samples  # (T, K, K): sum_s x_s x_s^T, so sum_s x_s^T P x_s = <P, it>
    quadratic = scatter.flatten(1) @ precisions.flatten(1).T / noise_std**2  # (T, G)
    log_likelihood = -0.5 * (quadratic + samples.shape[1] * logdets)
    return torch.softmax(log_likelihood, dim=1)
