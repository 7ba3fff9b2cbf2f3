"""Bias and variance of the learned-optimiser meta-gradient estimators against truncation length.

On one small problem (a 10-dimensional quadratic, learned_optimization's fixed_dim family) and
one small learned optimiser (a one-layer coordinatewise LSTM of 2 units, 37 weights, at its
initialisation: ES's variance grows with the number of weights), the
exact gradient of the whole unroll's meta-objective comes from backpropagation through all of it
(`algo.estimator=full`). Each other estimator gives one estimate per episode: the sum of its
window estimates over the unroll, the optimiser's weights held fixed. Over `--draws` episodes we
report the relative bias |mean - exact| / |exact| with twice its standard error (the bias of a
finite sample of an unbiased estimator is noise of that size) and the relative variance
E|estimate - mean|^2 / |exact|^2, for each truncation length that divides the unroll.

    python scripts/l2o_estimators.py --steps 20 --truncations 1 2 5 10 20 --draws 40 \\
        --out results/l2o_estimators.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metalearn.algos.optimizers.l2o import L2O, L2OConfig  # noqa: E402
from metalearn.data.optimizees import QuadraticConfig, QuadraticTasks  # noqa: E402
from metalearn.models.learned_optimizers import LSTMOptimizer, LSTMOptimizerConfig  # noqa: E402


def episode_estimate(algo: L2O, problems, steps: int, truncation: int) -> torch.Tensor:
    """The sum of one episode's window estimates of the meta-gradient (flat)."""
    algo.carry = None
    total = None
    for _ in range(steps // truncation if algo.cfg.estimator != "full" else 1):
        for p in algo.parameters():
            p.grad = None
        objective, _ = algo.meta_loss(problems)
        objective.backward()
        flat = torch.cat([p.grad.flatten() for p in algo.parameters()])
        total = flat if total is None else total + flat
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--truncations", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    cfg = QuadraticConfig(family="fixed_dim", steps=args.steps)
    family = QuadraticTasks(cfg, torch.device("cpu"))
    problems = family.sample("train", torch.Generator().manual_seed(0), 1)
    small = LSTMOptimizerConfig(preprocess="none", scale=0.1, hidden=2, layers=1)
    model = LSTMOptimizer(small, (1,), 0)

    def learner(estimator: str, truncation: int) -> L2O:
        cfg = L2OConfig(
            estimator=estimator, truncation=truncation, sigma=args.sigma, pairs=args.pairs
        )
        return L2O(cfg, model, "optimization", "loop", steps=args.steps)

    exact = episode_estimate(learner("full", args.steps), problems, args.steps, args.steps)
    scale = exact.norm().item()
    rows = []
    for estimator in ("truncated", "es", "pes"):
        for k in args.truncations:
            if args.steps % k:
                continue
            start = time.perf_counter()
            draws = 1 if estimator == "truncated" else args.draws
            algo = learner(estimator, k)
            samples = torch.stack(
                [episode_estimate(algo, problems, args.steps, k) for _ in range(draws)]
            )
            mean = samples.mean(0)
            bias = (mean - exact).norm().item() / scale
            spread = ((samples - mean) ** 2).sum(1).mean().item() if draws > 1 else 0.0
            variance = spread / scale**2
            error = 2 * (spread / draws) ** 0.5 / scale  # two standard errors of the mean
            rows.append((estimator, k, bias, error, variance, time.perf_counter() - start))
            print(
                f"{estimator:>9} truncation {k:>3}: bias {bias:.3f} ± {error:.3f}, "
                f"variance {variance:.3g}"
            )
    lines = [
        f"# Meta-gradient estimators against truncation length ({args.steps}-step unroll)",
        "",
        f"`python scripts/l2o_estimators.py --steps {args.steps} --truncations "
        f"{' '.join(map(str, args.truncations))} --draws {args.draws} --pairs {args.pairs} "
        f"--sigma {args.sigma}`: one 10-dimensional fixed_dim quadratic, a one-layer LSTM "
        f"optimiser of 2 units (raw gradient, scale 0.1) at its initial weights, float64. "
        f"Exact: backpropagation "
        f"through the whole unroll (|g| = {scale:.4g}). ES and PES: {args.pairs} antithetic pairs "
        f"per window, sigma {args.sigma}, {args.draws} episodes; truncated backpropagation is "
        f"deterministic (variance 0).",
        "",
        "| estimator | truncation | relative bias (± 2 s.e.) | relative variance | seconds |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {e} | {k} | {b:.3f} ± {se:.3f} | {v:.3g} | {s:.1f} |" for e, k, b, se, v, s in rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
