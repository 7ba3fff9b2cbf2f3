"""What a regression test reports besides its metric: the exact GP posterior's scores on the same
test functions (data=gp), and the terminal lines for the MSE and the 90% interval's coverage of a
learner that predicts a distribution."""

from __future__ import annotations

from typing import Any

import torch

from metalearn.evaluate import SPLIT_SEED_OFFSET, mean_ci95
from metalearn.run import Run

EXTRA_COLUMNS = ("mse", "nll", "coverage90")  # per-episode values some learners report besides


def gp_oracle(run: Run, ways: int, shots: int, query: int) -> dict[str, Any]:
    """The exact GP posterior's per-point log-likelihood and MSE on the test tasks."""
    cfg = run.config.eval
    scores: dict[str, list] = {"loglik": [], "mse": []}
    seed = cfg.seed + SPLIT_SEED_OFFSET["test"]
    for batch in run.tasks.episodes(
        "test", cfg.episodes, ways, shots, query, seed=seed, batch_size=cfg.batch_size
    ):
        for key, value in run.tasks.oracle(batch).items():
            scores[key].append(value.cpu())
    oracle = {key: mean_ci95(torch.cat(values)) for key, values in scores.items()}
    return oracle | {
        "what": "exact GP posterior under the true kernel",
        "unit": "nats per target point",
    }


def regression_rows(test_result: dict) -> list[str]:
    """Under a regression table: the predictive mean's MSE, the 90% interval's coverage, and
    the exact GP posterior's numbers on the same tasks."""
    rows = []
    if "unit" in test_result:
        rows.append(f"log-likelihood in {test_result['unit']}")
    extras = [(k, test_result[k]) for k in EXTRA_COLUMNS if k in test_result]
    if extras:
        rows.append(", ".join(f"{k} {v['mean']:.4f} ± {v['ci95']:.4f}" for k, v in extras))
    if "oracle" in test_result:
        oracle = test_result["oracle"]
        rows.append(
            f"GP oracle ({oracle['what']}): loglik {oracle['loglik']['mean']:.3f} ± "
            f"{oracle['loglik']['ci95']:.3f}, mse {oracle['mse']['mean']:.4f}"
        )
    return rows
