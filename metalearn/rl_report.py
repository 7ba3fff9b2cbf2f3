"""The end of a meta-RL run: reward and regret over fixed test trials, beside the baselines."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from metalearn.data.envs import play
from metalearn.evaluate import SPLIT_SEED_OFFSET, mean_ci95, run_episodes

if TYPE_CHECKING:
    from metalearn.build import Run


def test_rl(run: Run) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """The agent's test.reward and test.regret over eval.episodes fixed trials, the same for
    every baseline policy of the task family (the same trials, rewards and action uniforms),
    and each policy's mean curve for the plot: cumulative regret by step (P,), or, where a
    step's reward is 1 for a correct choice (`tasks.per_step_accuracy`, Harlow), the accuracy
    by step, which then also goes to each policy's breakdown, one entry per step."""
    cfg = run.config.eval
    agent = run_episodes(run, "test", episodes=cfg.episodes, ways=0, shots=0, query=0, steps=[0])
    played = {run.config.algo.name: {**agent, "reward": agent["score"][:, 0]}}
    played[run.config.algo.name]["regret"] = agent["loss"][:, 0]
    for name, policy in run.tasks.baselines().items():
        parts: dict[str, list[torch.Tensor]] = {}
        trials = run.tasks.episodes(
            "test", cfg.episodes, seed=cfg.seed + SPLIT_SEED_OFFSET["test"], batch_size=cfg.episodes
        )
        for batch in trials:
            for key, value in play(batch.env(), policy, seed=cfg.seed).items():
                parts.setdefault(key, []).append(value.cpu())
        played[name] = {k: torch.cat(v) for k, v in parts.items()}
    accuracy = getattr(run.tasks, "per_step_accuracy", False)
    summaries, curves = {}, {}
    for name, out in played.items():
        summaries[name] = {"reward": mean_ci95(out["reward"]), "regret": mean_ci95(out["regret"])}
        per_step = out["rewards"] if accuracy else out["curve"]  # (episodes, P)
        curves[name] = per_step.double().mean(0)
        if accuracy:
            summaries[name]["breakdown"] = [
                {"trial": t + 1, "accuracy": mean_ci95(per_step[:, t])}
                for t in range(per_step.shape[1])
            ]
    test = summaries.pop(run.config.algo.name) | {"episodes": cfg.episodes}
    return test, summaries, curves


def format_rl_table(results: dict) -> str:
    """The agent's and the baselines' test reward and regret as a terminal table."""
    task, test = results["task"], results["test"]
    setting = ", ".join(f"{v} {k}" for k, v in task.items())
    title = (
        f"test reward and regret ({results['algo']} on {results['data']}, {setting}, "
        f"{test['episodes']} fixed trials, 95% CI)"
    )
    rows = [f"{'policy':>16}{'total reward':>20}{'regret':>20}"]

    def cell(value: dict) -> str:
        return f"{value['mean']:.2f} ± {value['ci95']:.2f}"

    for name, entry in [(results["algo"], test), *results["baselines"].items()]:
        rows.append(f"{name:>16}{cell(entry['reward']):>20}{cell(entry['regret']):>20}")
    return "\n".join([title, *rows])


def plot_curves(curves: dict[str, torch.Tensor], ylabel: str, path: Path) -> Path:
    """One mean curve per policy against the step of a trial (cumulative regret, accuracy)."""
    from metalearn.plots import plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, curve in curves.items():
        steps = torch.arange(1, curve.numel() + 1)
        ax.plot(steps, curve, label=name, linewidth=2.2 if name == "rl2" else 1.2)
    ax.set_xlabel("step of the trial (pull; Harlow: choice)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
