"""How well a few-shot classifier's confidence matches its accuracy on the test episodes.

Every classifier's test gains `test.calibration` (`eval.calibration=true`, the default):

- ECE and MCE: the query predictions binned by confidence (their top probability) into 15
  equal-width bins ((m-1)/15, m/15] (Guo et al. 2017, section 2); ECE is the bins' mean
  |accuracy - confidence| weighted by their share of predictions, MCE the largest of them.
- NLL: the mean negative log-probability of the true class.
- Brier score: the mean over predictions of sum_c (p_c - [c = y])^2 (between 0 and 2).

Each is reported pooled over all query predictions (`pooled`) and as the mean over episodes with
its 95% interval (`per_task`): in few-shot testing the two differ, since each episode's
confidence moves with how hard its classes are. `reliability` keeps the pooled bins (count,
accuracy, mean confidence) for `plots/reliability.png`.

`eval.temperature=true` also fits one temperature T on the validation episodes (the NLL of
logits / T, minimised over log T; Guo et al.'s temperature scaling) and reports the test at T
beside the raw numbers (`temperature`). The predictions are the test's own: the query logits
that a learner's `evaluate` returns beside its scores, so the report costs no second pass over
the episodes; a learner whose `evaluate` does not return them is asked again, episode by episode,
through its `predict` (the function `metalearn eval episode.support=...` classifies a user's
images with).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from metalearn.data.tasks import Split
from metalearn.evaluate import SPLIT_SEED_OFFSET, mean_ci95, run_episodes

BINS = 15


def _bins(confidence: Tensor, bins: int) -> Tensor:
    """Each confidence's bin, 0 .. bins-1, for the bins ((m-1)/bins, m/bins]."""
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)[1:-1]
    return torch.bucketize(confidence, edges, right=False)


def reliability(probs: Tensor, labels: Tensor, bins: int = BINS) -> list[dict[str, float]]:
    """(N, C) probabilities and (N,) labels -> per bin: predictions, accuracy, mean confidence
    (accuracy and confidence None in an empty bin)."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).double()
    index = _bins(confidence, bins)
    out = []
    for m in range(bins):
        inside = index == m
        n = int(inside.sum())
        out.append(
            {
                "count": n,
                "accuracy": correct[inside].mean().item() if n else None,
                "confidence": confidence[inside].double().mean().item() if n else None,
            }
        )
    return out


def calibration_errors(probs: Tensor, labels: Tensor, bins: int = BINS) -> tuple[float, float]:
    """(ECE, MCE) of (N, C) probabilities against (N,) labels over equal-width bins."""
    table = [b for b in reliability(probs, labels, bins) if b["count"]]
    n = sum(b["count"] for b in table)
    gaps = [abs(b["accuracy"] - b["confidence"]) for b in table]
    ece = sum(b["count"] / n * gap for b, gap in zip(table, gaps, strict=True))
    return ece, max(gaps)


def scores(log_probs: Tensor, labels: Tensor, bins: int = BINS) -> dict[str, float]:
    """ECE, MCE, NLL and Brier score of (N, C) log-probabilities against (N,) labels."""
    log_probs = log_probs.double()
    probs = log_probs.exp()
    ece, mce = calibration_errors(probs, labels, bins)
    onehot = F.one_hot(labels, probs.shape[-1]).double()
    return {
        "ece": ece,
        "mce": mce,
        "nll": F.nll_loss(log_probs, labels).item(),
        "brier": ((probs - onehot) ** 2).sum(-1).mean().item(),
    }


def summarize(logits: Tensor, labels: Tensor, bins: int = BINS) -> dict[str, Any]:
    """(T, Q, C) logits and (T, Q) labels of T episodes -> the scores pooled over all
    predictions, their per-episode means with 95% CIs, and the pooled reliability bins."""
    log_probs = F.log_softmax(logits.double(), dim=-1)
    pooled = scores(log_probs.flatten(0, 1), labels.flatten(), bins)
    each = [scores(lp, y, bins) for lp, y in zip(log_probs, labels, strict=True)]
    per_task = {k: mean_ci95(torch.tensor([e[k] for e in each])) for k in pooled}
    probs = log_probs.exp().flatten(0, 1)
    table = reliability(probs, labels.flatten(), bins)
    return {"pooled": pooled, "per_task": per_task, "reliability": table}


def predictions(run, split: str, episodes: int) -> tuple[Tensor, Tensor]:
    """Every query's logits (T, Q, C) and label (T, Q) on `episodes` fixed episodes of `split`,
    the test's own episodes at the run's test steps: from the learner's `evaluate` where it
    returns them, else episode by episode from its `predict`."""
    ways, shots, query = run.test_shape
    out = run_episodes(
        run, split, episodes=episodes, ways=ways, shots=shots, query=query, steps=[run.test_steps]
    )
    if "logits" in out:
        return out["logits"][:, 0], out["labels"]
    return predicted(run, split, episodes)


def predicted(run, split: str, episodes: int) -> tuple[Tensor, Tensor]:
    """`predictions`, asked of the learner's `predict` episode by episode."""
    cfg, (ways, shots, query) = run.config.eval, run.test_shape
    seed = cfg.seed + SPLIT_SEED_OFFSET[split]
    logits, labels = [], []
    run.model.train(False)
    try:
        for batch in run.tasks.episodes(
            split, episodes, ways, shots, query, seed=seed, batch_size=cfg.batch_size
        ):
            for t in range(batch.tasks):
                support = Split(batch.support.x[t], batch.support.y[t])
                with run.autocast():
                    out = run.algo.predict(support, batch.query.x[t])
                logits.append(out.detach().float().cpu())
                labels.append(batch.query.y[t].cpu())
    finally:
        run.model.train(True)
    return torch.stack(logits), torch.stack(labels)


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The T > 0 that minimises the NLL of logits / T (L-BFGS on log T, float64)."""
    logits, labels = logits.double().flatten(0, 1), labels.flatten()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def calibration_report(run, test: tuple[Tensor, Tensor] | None = None) -> dict[str, Any]:
    """test.calibration: the raw test predictions' scores and, with eval.temperature, those at
    the temperature fitted on the validation episodes. `test`: the test's logits (T, Q, C) and
    labels (T, Q) where the test pass returned them (else they are predicted here)."""
    cfg = run.config.eval
    logits, labels = test if test is not None else predictions(run, "test", cfg.episodes)
    out: dict[str, Any] = {"bins": BINS, **summarize(logits, labels)}
    if cfg.temperature:
        temperature = fit_temperature(*predictions(run, "val", cfg.val_episodes))
        scaled = summarize(logits / temperature, labels)
        out["temperature"] = {"value": temperature, **scaled}
    return out


def plot_reliability(calibration: dict[str, Any], path: Path) -> Path:
    """plots/reliability.png: accuracy against confidence per bin (the diagonal is perfect
    calibration), with the share of predictions in each bin beneath; temperature-scaled beside
    the raw where fitted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("raw", calibration)]
    if "temperature" in calibration:
        t = calibration["temperature"]
        panels.append((f"temperature {t['value']:.2f}", t))
    fig, axes = plt.subplots(
        2, len(panels), figsize=(4.5 * len(panels), 5.5), squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]},
    )  # fmt: skip
    width = 1 / calibration["bins"]
    for column, (title, entry) in enumerate(panels):
        table = entry["reliability"]
        centres = [(m + 0.5) * width for m in range(len(table))]
        accuracy = [b["accuracy"] or 0.0 for b in table]
        top, bottom = axes[0][column], axes[1][column]
        top.bar(centres, accuracy, width=width, edgecolor="black", label="accuracy")
        top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        pooled = entry["pooled"]
        top.set_title(f"{title}: ECE {pooled['ece']:.3f}, NLL {pooled['nll']:.3f}")
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
        top.legend(loc="upper left", fontsize=8)
        total = max(sum(b["count"] for b in table), 1)
        bottom.bar(centres, [b["count"] / total for b in table], width=width, color="gray")
        bottom.set(xlim=(0, 1), xlabel="confidence", ylabel="share")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
