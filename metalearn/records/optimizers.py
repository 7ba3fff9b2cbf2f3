"""The end of a learned optimiser's run: its loss on held-out problems beside hand-designed
optimisers tuned on the validation problems, all on the same problems, and the curves.

Each hand-designed optimiser (Adam, RMSprop, SGD, NAG) runs every rate of a grid on the
validation problems; the rate with the lowest mean final loss is then run on the test problems.
Adam at the paper's fixed rate 1e-3 runs on them too (`adam_lr1e-3`), the baseline
deepmind/learning-to-learn's evaluate.py compares with.
The headline, as Andrychowicz et al. report it, is log10 of the mean (over problems) final loss.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from metalearn.data.optimizees import HAND_DESIGNED, LEARNING_RATES, hand_designed_curve
from metalearn.evaluate import SPLIT_SEED_OFFSET, mean_ci95, run_episodes
from metalearn.records.plots import plot_loss_curves
from metalearn.run import Run

PAPER_ADAM_LR = 1e-3  # Andrychowicz et al.'s Adam baseline (evaluate.py's learning_rate)


def log10_mean(losses: torch.Tensor) -> float:
    """log10 of the mean final loss (infinite where any problem diverged)."""
    mean = losses.double().mean().item()
    return math.log10(mean) if math.isfinite(mean) and mean > 0 else math.inf


def summary(curve: torch.Tensor, horizons: list[int], metric: str) -> dict[str, Any]:
    """A curve (problems, steps + 1)'s loss after each horizon; the first (the horizon it was
    trained for) is the headline. A horizon beyond it also gets each problem's loss change since
    the headline's (`change`, paired, 95% CI) and `still_descending`: that change is below zero
    beyond its interval (Andrychowicz et al.'s check of an optimiser run twice as long as it was
    trained for)."""
    trained, breakdown = horizons[0], []
    for h in horizons:
        entry = {"steps": h, metric: mean_ci95(curve[:, h]), "log10_mean": log10_mean(curve[:, h])}
        if h > trained:
            change = mean_ci95(curve[:, h].double() - curve[:, trained].double())
            entry |= {"change": change, "still_descending": change["mean"] + change["ci95"] < 0}
        breakdown.append(entry)
    return {**breakdown[0], "breakdown": breakdown}


def _curves(run: Run, split: str, name: str, lr: float, steps: int) -> torch.Tensor:
    cfg, parts = run.config.eval, []
    n = cfg.episodes if split == "test" else cfg.val_episodes
    seed = cfg.seed + SPLIT_SEED_OFFSET[split]
    for problems in run.tasks.episodes(split, n, seed=seed, batch_size=cfg.batch_size):
        parts.append(hand_designed_curve(problems, name, lr, steps).cpu())
    return torch.cat(parts)


def tuned_baselines(run: Run, horizons: list[int]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Each hand-designed optimiser at its best rate on the validation problems, on the test
    problems: (summaries with the rate and the grid's scores, mean test curves)."""
    steps, last = max(horizons), run.test_steps
    summaries, curves = {}, {}
    for name in HAND_DESIGNED:
        grid = {lr: _curves(run, "val", name, lr, last)[:, last] for lr in LEARNING_RATES}
        scores = {lr: log10_mean(final) for lr, final in grid.items()}
        best = min(scores, key=lambda lr: scores[lr])
        curve = _curves(run, "test", name, best, steps)
        summaries[name] = summary(curve, horizons, run.metric) | {
            "lr": best,
            "val_log10_mean_by_lr": {str(lr): score for lr, score in scores.items()},
        }
        curves[f"{name} (lr {best:g})"] = curve.double().mean(0)
    curve = _curves(run, "test", "adam", PAPER_ADAM_LR, steps)
    summaries["adam_lr1e-3"] = summary(curve, horizons, run.metric) | {"lr": PAPER_ADAM_LR}
    curves["adam (lr 0.001, the paper's)"] = curve.double().mean(0)
    return summaries, curves


def test_optimizer(run: Run) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """The learned optimiser's final loss after data.steps steps (and each eval.steps horizon)
    on eval.episodes test problems; the tuned baselines on the same problems; the curves."""
    cfg = run.config.eval
    horizons = [run.test_steps, *sorted(set(cfg.steps) - {run.test_steps})]
    out = run_episodes(run, "test", episodes=cfg.episodes, ways=1, shots=0, query=0, steps=horizons)
    curve = out["curve"]
    test = summary(curve, horizons, run.metric) | {"episodes": cfg.episodes}
    baselines, curves = tuned_baselines(run, horizons)
    return test, baselines, {run.config.algo.name: curve.double().mean(0), **curves}


def format_optimizer_table(results: dict) -> str:
    """The learned optimiser's and the tuned baselines' final losses as a terminal table."""
    test = results["test"]
    title = (
        f"test final loss ({results['algo']}, model {results['model']}, on {results['data']}: "
        f"{test['episodes']} held-out problems, {test['steps']} steps; 95% CI)"
    )
    rows = [f"{'optimiser':>22}{'rate':>10}{'final loss':>24}{'log10 mean':>12}"]
    entries = [(results["algo"], test), *results["baselines"].items()]
    for name, entry in entries:
        value, rate = entry[results["metric"]], entry.get("lr")
        rate = "learned" if rate is None else f"{rate:g}"
        cell = f"{value['mean']:.4g} ± {value['ci95']:.2g}"
        rows.append(f"{name:>22}{rate:>10}{cell:>24}{entry['log10_mean']:>12.3f}")
    for later in [e for e in test["breakdown"] if "change" in e]:
        rows.append(
            f"after {later['steps']} steps (trained for {test['steps']}): loss, and its change "
            f"since step {test['steps']}"
        )
        for name, entry in entries:
            at = next(e for e in entry["breakdown"] if e["steps"] == later["steps"])
            value, change = at[results["metric"]], at["change"]
            note = "still descending" if at["still_descending"] else ""
            cell = f"{value['mean']:.4g} ± {value['ci95']:.2g}"
            delta = f"{change['mean']:+.3g} ± {change['ci95']:.2g}"
            rows.append(f"{name:>22}{'':>10}{cell:>24}{delta:>20}  {note}")
    return "\n".join([title, *rows])


def plot_optimizer(curves: dict[str, torch.Tensor], folder: Path) -> Path:
    """plots/loss_by_step.png: each optimiser's mean loss against the step, log scale."""
    return plot_loss_curves(curves, folder / "loss_by_step.png")
