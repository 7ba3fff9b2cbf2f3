"""Gradient-based meta-RL checkpoints on the same fixed test tasks, paired: each one's return
after 0..S inner steps, its gain over the return before adaptation, and every checkpoint's minus
the last one's (the baseline), task by task, with 95% intervals (the MAML paper's navigation
comparison: MAML against the pretrained policy fine-tuned with the same step). Every checkpoint
must be of the same task family and setting.

`--random` adds the paper's third curve, a randomly initialised policy (the first checkpoint's
model and seed, untrained) fine-tuned by the same step; `--plot PATH` draws every checkpoint's
return against the number of inner steps, with 95% intervals (the paper's figure).

Usage: python scripts/paired_returns.py [--episodes 100] [--steps 0,1,2,3] [--random]
    [--plot results/NAME.png] CKPT [CKPT ...] BASELINE
(METALEARN_DATA need not be set: the families are procedural.)
"""

import argparse
from pathlib import Path

import torch

from metalearn.build import build_run
from metalearn.evaluate import mean_ci95, run_episodes
from metalearn.records import checkpoint
from metalearn.records.plots import plt, save


def returns(
    path: Path, episodes: int, steps: list[int], trained: bool = True
) -> tuple[str, torch.Tensor]:
    """(the checkpoint's algo and meta-batch, its mean return per test task after each number of
    steps); untrained: its model as initialised, before any meta-batch."""
    state = checkpoint.load(path)
    run = build_run(state["config"], training=False)
    if trained:
        run.load_algo_state(state, path)
        label = f"{run.config.algo.name} at meta-batch {state['progress']['iteration']}"
    else:
        label = "random initialisation"
    torch.manual_seed(0)
    out = run_episodes(run, "test", episodes=episodes, ways=0, shots=0, query=0, steps=steps)
    return label, out["score"].double().cpu()  # (episodes, len(steps))


def plot(path: Path, scored: list[tuple[str, torch.Tensor]], steps: list[int], ymin) -> None:
    """Return against inner steps, one line per checkpoint, 95% intervals as error bars."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, score in scored:
        summaries = [mean_ci95(score[:, i]) for i in range(len(steps))]
        means = [s["mean"] for s in summaries]
        ax.errorbar(
            steps, means, [s["ci95"] for s in summaries], marker="o", capsize=3, label=label
        )
    ax.set_xlabel("inner steps at test")
    ax.set_ylabel(f"mean return ({scored[0][1].shape[0]} test tasks)")
    ax.set_xticks(steps)
    if ymin is not None:  # a collapsed baseline would hide the others
        ax.set_ylim(bottom=ymin)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--steps", default="0,1,2,3")
    parser.add_argument("--random", action="store_true", help="add an untrained policy")
    parser.add_argument("--plot", type=Path, default=None, help="return against inner steps")
    parser.add_argument("--ymin", type=float, default=None, help="the plot's lower end")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    settings = {str(p): checkpoint.load(p)["config"]["data"] for p in args.checkpoints}
    if len({repr(sorted(data.items())) for data in settings.values()}) > 1:
        raise SystemExit(f"the checkpoints' data settings differ, so their tasks do: {settings}")
    scored = [returns(path, args.episodes, steps) for path in args.checkpoints]
    sources = [str(path) for path in args.checkpoints]
    if args.random:  # before the baseline, which stays last
        scored.insert(-1, returns(args.checkpoints[0], args.episodes, steps, trained=False))
        sources.insert(-1, f"the model of {sources[0]}, untrained")
    if args.plot:
        plot(args.plot, scored, steps, args.ymin)

    def cell(values: torch.Tensor) -> str:
        summary = mean_ci95(values)
        return f"{summary['mean']:.2f} ± {summary['ci95']:.2f}"

    print("| checkpoint | " + " | ".join(f"{k} steps" for k in steps) + " |")
    print("| --- |" + " --- |" * len(steps))
    for source, (label, score) in zip(sources, scored, strict=True):
        cells = [cell(score[:, i]) for i in range(len(steps))]
        print(f"| {label} ({source}) | " + " | ".join(cells) + " |")
    for label, score in scored:  # adaptation's gain
        cells = [cell(score[:, i] - score[:, 0]) for i in range(len(steps))]
        print(f"| {label}: after k steps minus before, paired | " + " | ".join(cells) + " |")
    *others, (base, base_score) = scored
    for label, score in others:
        cells = [cell(score[:, i] - base_score[:, i]) for i in range(len(steps))]
        print(f"| {label} minus {base}, paired | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
