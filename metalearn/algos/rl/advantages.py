"""Discounted returns, GAE and rllab's linear feature baseline over batches of trajectories.

Trajectories are rows of padded tensors: rewards and values (..., H), observations (..., H, D),
and `valid` (..., H) marks the steps an episode took. An episode that ends stays over (see
envs/navigation.py), so `valid` is a prefix of each row and everything after it is ignored: it is
what rllab's per-path lists are, padded. The leading dimensions are free; the baseline is fitted
per task on (T, N, H) with N trajectories per task, as the MAML authors fit it per task.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from metalearn.errors import TrainingError


def discount_cumsum(x: Tensor, rate: float, valid: Tensor) -> Tensor:
    """y_t = sum_{s >= t} rate^(s - t) x_s over each row's valid steps (..., H); zero elsewhere.

    rllab's `special.discount_cumsum` applied to every path at once.
    """
    x = x * valid
    running, out = torch.zeros_like(x[..., 0]), []
    for t in reversed(range(x.shape[-1])):  # H steps, every trajectory at once
        running = x[..., t] + rate * running
        out.append(running)
    return torch.stack(out[::-1], -1) * valid


def discounted_returns(rewards: Tensor, valid: Tensor, gamma: float) -> Tensor:
    """The discounted return from every step to the episode's end, R_t = sum_s gamma^s r_{t+s}."""
    return discount_cumsum(rewards, gamma, valid)


def gae(rewards: Tensor, values: Tensor, valid: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalised advantage estimates (Schulman et al. 2016, eq. 16) (..., H).

    As rllab's `BaseSampler.process_samples` (cbfinn/maml_rl `rllab/sampler/base.py`):
    delta_t = r_t + gamma V(s_{t+1}) - V(s_t), with V = 0 after a path's last step (also when the
    horizon cut it off), and A_t = sum_l (gamma lam)^l delta_{t+l}. lam = 1 gives the discounted
    return minus the baseline; lam = 0 the one-step TD error.
    """
    values = values * valid
    next_values = F.pad(values[..., 1:], (0, 1))
    deltas = rewards + gamma * next_values - values
    return discount_cumsum(deltas, gamma * lam, valid)


def center_advantages(advantages: Tensor, valid: Tensor, eps: float = 1e-8) -> Tensor:
    """(A - mean) / (std + eps) over the valid steps of the last two dimensions (N, H): per task
    for (T, N, H), as rllab's `center_adv` does for each call of `process_samples`."""
    count = valid.sum((-2, -1), keepdim=True)
    mean = (advantages * valid).sum((-2, -1), keepdim=True) / count
    variance = (((advantages - mean) * valid) ** 2).sum((-2, -1), keepdim=True) / count
    return (advantages - mean) / (variance.sqrt() + eps) * valid


def baseline_features(observations: Tensor, valid: Tensor) -> Tensor:
    """rllab's features (..., H, F) with F = 2 D + 4: o, o^2 (o clipped to [-10, 10]), t/100,
    (t/100)^2, (t/100)^3 and 1, with t the step within the episode; zero on invalid steps."""
    o = observations.clamp(-10, 10)
    t = torch.arange(o.shape[-2], dtype=o.dtype, device=o.device) / 100.0
    t = t[:, None].expand(*o.shape[:-1], 1)  # (..., H, 1)
    features = torch.cat([o, o**2, t, t**2, t**3, torch.ones_like(t)], -1)
    return features * valid[..., None]


def fit_linear_baseline(
    observations: Tensor, returns: Tensor, valid: Tensor, reg_coeff: float = 1e-5, tries: int = 5
) -> Tensor:
    """Least-squares coefficients (T, F) of the returns on the features, one fit per task over
    its N trajectories: observations (T, N, H, D), returns and valid (T, N, H).

    rllab's `LinearFeatureBaseline.fit` for every task at once (cbfinn/maml_rl
    `rllab/baselines/linear_feature_baseline.py`, pytorch-maml-rl `maml_rl/baseline.py`):
    solve (X^T X + reg I) w = X^T y by least squares (in float64, as numpy does), and where a
    task's solution is not finite, multiply its reg by 10 and solve again, at most `tries`
    times. Invalid steps have zero features and so drop out of X^T X and X^T y.
    """
    x = baseline_features(observations, valid).double().flatten(-3, -2)  # (T, N H, F)
    y = (returns * valid).double().flatten(-2)[..., None]  # (T, N H, 1)
    gram, moment = x.mT @ x, x.mT @ y  # (T, F, F), (T, F, 1)
    if not (gram.isfinite().all() and moment.isfinite().all()):  # LAPACK would fail on them
        raise TrainingError(
            "the linear feature baseline got NaN or infinite returns or observations: the "
            "rewards or the policy diverged"
        )
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    reg = torch.full(gram.shape[:-2], reg_coeff, dtype=gram.dtype, device=gram.device)
    for _ in range(tries):
        coeffs = torch.linalg.lstsq(gram + reg[..., None, None] * eye, moment).solution[..., 0]
        bad = ~torch.isfinite(coeffs).all(-1)
        if not bad.any():
            return coeffs.to(observations.dtype)
        reg = torch.where(bad, reg * 10, reg)
    raise TrainingError(
        f"the linear feature baseline has no finite fit for {int(bad.sum())} task(s) even with "
        f"reg_coeff {reg_coeff} x 10^{tries - 1}"
    )


def predict_linear_baseline(coeffs: Tensor, observations: Tensor, valid: Tensor) -> Tensor:
    """The baseline's values (T, N, H) for coefficients (T, F): zero on invalid steps."""
    return torch.einsum("...nhf,...f->...nh", baseline_features(observations, valid), coeffs)


def linear_baseline_values(
    observations: Tensor, returns: Tensor, valid: Tensor, reg_coeff: float = 1e-5
) -> Tensor:
    """Fit the baseline on each task's trajectories, then predict on them (T, N, H): the order of
    the MAML authors' `process_samples` (fit on the current paths first, then compute the
    advantages)."""
    coeffs = fit_linear_baseline(observations, returns, valid, reg_coeff)
    return predict_linear_baseline(coeffs, observations, valid)
