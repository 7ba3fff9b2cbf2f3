"""The end of a meta-RL run: reward and regret over fixed test trials, beside the baselines."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from metalearn.algos.blackbox.bandit_baselines import BASELINES, play
from metalearn.evaluate import SPLIT_SEED_OFFSET, mean_ci95, run_episodes

if TYPE_CHECKING:
    from metalearn.build import Run


def test_rl(run: Run) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """The agent's test.reward and test.regret over eval.episodes fixed trials, the same for
    every baseline policy (the same trials, rewards and action uniforms), and the mean
    cumulative-regret curve (P,) of each for the plot."""
    cfg = run.config.eval
    out = run_episodes(run, "test", episodes=cfg.episodes, ways=0, shots=0, query=0, steps=[0])
    test = {
        "reward": mean_ci95(out["score"][:, 0]),
        "regret": mean_ci95(out["loss"][:, 0]),
        "episodes": cfg.episodes,
    }
    curves = {run.config.algo.name: out["curve"].mean(0)}
    baselines: dict[str, Any] = {}
    pulls = run.train_shape[1]
    for name, make in BASELINES.items():
        policy = make(pulls)
        parts: dict[str, list[torch.Tensor]] = {"reward": [], "regret": [], "curve": []}
        trials = run.tasks.episodes(
            "test", cfg.episodes, seed=cfg.seed + SPLIT_SEED_OFFSET["test"], batch_size=cfg.episodes
        )
        for batch in trials:
            for key, value in play(batch.env(), policy, seed=cfg.seed).items():
                parts[key].append(value.cpu())
        result = {k: torch.cat(v) for k, v in parts.items()}
        baselines[name] = {
            "reward": mean_ci95(result["reward"]),
            "regret": mean_ci95(result["regret"]),
        }
        curves[name] = result["curve"].mean(0)
    return test, baselines, curves


def format_rl_table(results: dict) -> str:
    """The agent's and the baselines' test reward and regret as a terminal table."""
    task, test = results["task"], results["test"]
    title = (
        f"test reward and regret ({results['algo']} on {results['data']}, {task['arms']} arms, "
        f"{task['pulls']} pulls, {test['episodes']} fixed trials, 95% CI)"
    )
    rows = [f"{'policy':>16}{'total reward':>20}{'regret':>20}"]

    def cell(value: dict) -> str:
        return f"{value['mean']:.2f} ± {value['ci95']:.2f}"

    for name, entry in [(results["algo"], test), *results["baselines"].items()]:
        rows.append(f"{name:>16}{cell(entry['reward']):>20}{cell(entry['regret']):>20}")
    return "\n".join([title, *rows])


def plot_regret(curves: dict[str, torch.Tensor], path: Path) -> Path:
    """Mean cumulative regret against the pull, one line per policy."""
    from metalearn.plots import plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, curve in curves.items():
        pulls = torch.arange(1, curve.numel() + 1)
        ax.plot(pulls, curve, label=name, linewidth=2.2 if name == "rl2" else 1.2)
    ax.set_xlabel("pull")
    ax.set_ylabel("cumulative regret")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
