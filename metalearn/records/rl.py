"""The end of a meta-RL run: reward and regret over fixed test trials, beside the baselines (RL²);
or, for a policy adapted by gradient steps (MAML-TRPO, E-MAML, ProMP), its return on fixed test
tasks before adaptation and after each inner step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from metalearn.envs.trials import play
from metalearn.evaluate import SPLIT_SEED_OFFSET, mean_ci95, run_episodes
from metalearn.records.plots import plot_policy_curves, plot_return_vs_steps
from metalearn.run import Run


def test_rl(run: Run) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """The agent's test.reward and test.regret over eval.episodes fixed trials, the same for
    every baseline policy of the task family (the same trials, rewards and action uniforms),
    and each policy's mean curve for the plot: cumulative regret by step (P,), or, where a
    step's reward is 1 for a correct choice (`tasks.per_step_accuracy`, Harlow), the accuracy
    by step, which then also goes to each policy's breakdown, one entry per step; and, where
    the family names subsets of its trials (`tasks.subsets`), one breakdown entry per subset.
    A learner scored by its return after inner steps: see `test_adaptation` (no baselines)."""
    if run.metric == "return":
        return *test_adaptation(run), {}
    cfg = run.config.eval
    agent = run_episodes(run, "test", episodes=cfg.episodes, ways=0, shots=0, query=0, steps=[0])
    # the agent's score is its trial reward, its loss the regret (RL2.evaluate)
    agent |= {"reward": agent["score"][:, 0], "regret": agent["loss"][:, 0]}
    played = {run.config.algo.name: agent}
    seed = cfg.seed + SPLIT_SEED_OFFSET["test"]
    for name, policy in run.tasks.baselines().items():
        parts: dict[str, list[torch.Tensor]] = {}
        trials = run.tasks.episodes("test", cfg.episodes, seed=seed, batch_size=cfg.episodes)
        for batch in trials:
            for key, value in play(batch.env(), policy, seed=cfg.seed).items():
                parts.setdefault(key, []).append(value.cpu())
        played[name] = {k: torch.cat(v) for k, v in parts.items()}
    accuracy = run.tasks.per_step_accuracy
    summaries, curves = {}, {}
    for name, out in played.items():
        summaries[name] = summary(out)
        per_step = out["rewards"] if accuracy else out["curve"]  # (episodes, P)
        curves[name] = per_step.double().mean(0)
        if accuracy:
            summaries[name]["breakdown"] = [
                {"trial": t + 1, "accuracy": mean_ci95(per_step[:, t])}
                for t in range(per_step.shape[1])
            ]
    subsets = subset_rows(run, seed)
    for name, out in played.items():
        for subset, rows in subsets.items():
            entry = {"subset": subset, "episodes": int(rows.sum()), **summary(out, rows)}
            summaries[name].setdefault("breakdown", []).append(entry)
    agent = played.pop(run.config.algo.name)
    test = summaries.pop(run.config.algo.name) | {"episodes": cfg.episodes}
    test["versus"] = {name: paired(agent, out, subsets) for name, out in played.items()}
    return test, summaries, curves


def subset_rows(run: Run, seed: int) -> dict[str, torch.Tensor]:
    """subset -> its rows (bool, eval.episodes) among the test trials, for each subset that the
    task family reports apart (`tasks.subsets`; the causal quiz: trials with a hidden
    confounder) and that holds any trial."""
    n = run.config.eval.episodes
    (trials,) = run.tasks.episodes("test", n, seed=seed, batch_size=n)  # the same trials, in order
    subsets = {subset: rows.cpu() for subset, rows in run.tasks.subsets(trials).items()}
    return {subset: rows for subset, rows in subsets.items() if rows.any()}


def paired(agent: dict, baseline: dict, subsets: dict[str, torch.Tensor]) -> dict:
    """The agent minus a baseline, trial by trial on the same trials: the mean difference of
    reward and of regret with its 95% interval (a positive reward difference: the agent is
    better), over all trials and each subset."""
    difference = {k: agent[k].cpu().double() - baseline[k].double() for k in ("reward", "regret")}
    breakdown = [
        {"subset": subset, "episodes": int(rows.sum()), **summary(difference, rows)}
        for subset, rows in subsets.items()
    ]
    return summary(difference) | ({"breakdown": breakdown} if breakdown else {})


def summary(out: dict[str, torch.Tensor], rows: torch.Tensor | slice = slice(None)) -> dict:
    """Mean reward and regret with their 95% intervals over the chosen trials."""
    return {"reward": mean_ci95(out["reward"][rows]), "regret": mean_ci95(out["regret"][rows])}


def test_adaptation(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """test.return after algo.test_inner_steps policy-gradient steps on eval.episodes fixed test
    tasks (mean and 95% CI over tasks, each task's score the mean return of its trajectories),
    and test.breakdown: the same after every number of inner steps from 0 (before adaptation)
    to test_inner_steps, and eval.steps."""
    cfg = run.config.eval
    steps = sorted({*range(run.test_steps + 1), *cfg.steps})
    out = run_episodes(run, "test", episodes=cfg.episodes, ways=0, shots=0, query=0, steps=steps)
    breakdown = [
        {"inner_steps": k, "return": mean_ci95(out["score"][:, i])} for i, k in enumerate(steps)
    ]
    test = {
        "return": breakdown[steps.index(run.test_steps)]["return"],
        "episodes": cfg.episodes,
        "trajectories": run.config.algo.trajectories,  # per task, at each stage
        "breakdown": breakdown,
    }
    return test, {}


def format_rl_table(results: dict) -> str:
    """The agent's and the baselines' test reward and regret as a terminal table (or the
    return after each number of inner steps)."""
    if results["metric"] == "return":
        return format_return_table(results)
    task, test = results["task"], results["test"]
    setting = ", ".join(f"{v} {k}" for k, v in task.items())
    title = (
        f"test reward and regret ({results['algo']} on {results['data']}, {setting}, "
        f"{test['episodes']} fixed trials, 95% CI)"
    )
    policies = [(results["algo"], test), *results["baselines"].items()]
    lines = list(policies)
    for name, entry in policies:  # subsets of the trials (the causal quiz's confounded ones)
        for part in (p for p in entry.get("breakdown", []) if "subset" in p):
            lines.append((f"{name}, {part['subset']} ({part['episodes']})", part))
    width = max(16, *(len(label) + 2 for label, _ in lines))
    rows = [f"{'policy':>{width}}{'total reward':>20}{'regret':>20}"]

    def cell(value: dict) -> str:
        return f"{value['mean']:.2f} ± {value['ci95']:.2f}"

    for label, entry in lines:
        rows.append(f"{label:>{width}}{cell(entry['reward']):>20}{cell(entry['regret']):>20}")
    versus = test.get("versus", {})
    if versus:
        rows.append(f"{results['algo']} minus each baseline, paired over the same trials:")
    for name, entry in versus.items():
        parts = [(name, entry)]
        parts += [(f"{name}, {p['subset']}", p) for p in entry.get("breakdown", [])]
        for label, part in parts:
            rows.append(f"{label:>{width}}{cell(part['reward']):>20}{cell(part['regret']):>20}")
    return "\n".join([title, *rows])


def format_return_table(results: dict) -> str:
    """The test return after each number of inner steps, one row each."""
    test, steps = results["test"], results["protocol"]["test_inner_steps"]
    title = (
        f"test return ({results['algo']} on {results['data']}, {test['episodes']} fixed tasks x "
        f"{test['trajectories']} trajectories, 95% CI over tasks)"
    )
    rows = [f"{'inner steps':>12}{'return':>22}"]
    for entry in test["breakdown"]:
        mark = "  <- test" if entry["inner_steps"] == steps else ""
        value = entry["return"]
        rows.append(
            f"{entry['inner_steps']:>12}{value['mean']:>13.2f} ± {value['ci95']:<6.2f}{mark}"
        )
    return "\n".join([title, *rows])


def plot_rl(run: Run, curves: dict[str, torch.Tensor], folder: Path, results=None) -> Path:
    """plots/accuracy.png where a step's reward is its accuracy (Harlow), else regret.png; for
    a policy adapted by gradient steps, plots/return_vs_steps.png."""
    if run.metric == "return":
        title = f"{run.config.algo.name} on {run.config.data.name}"
        return plot_return_vs_steps(
            results["test"]["breakdown"], title, folder / "return_vs_steps.png"
        )
    if run.tasks.per_step_accuracy:
        return plot_policy_curves(curves, "accuracy", folder / "accuracy.png")
    return plot_policy_curves(curves, "cumulative regret", folder / "regret.png")
