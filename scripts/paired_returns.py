"""Gradient-based meta-RL checkpoints on the same fixed test tasks, paired: each one's return
after 0..S inner steps, its gain over the return before adaptation, and every checkpoint's minus
the last one's (the baseline), task by task, with 95% intervals (the MAML paper's navigation
comparison: MAML against the pretrained policy fine-tuned with the same step). Every checkpoint
must be of the same task family and setting.

Usage: python scripts/paired_returns.py [--episodes 100] [--steps 0,1,2,3] CKPT [CKPT ...] BASELINE
(METALEARN_DATA need not be set: the families are procedural.)
"""

import argparse
from pathlib import Path

import torch

from metalearn.build import build_run
from metalearn.evaluate import mean_ci95, run_episodes
from metalearn.records import checkpoint


def returns(path: Path, episodes: int, steps: list[int]) -> tuple[str, torch.Tensor]:
    """(the checkpoint's algo and meta-batch, its mean return per test task after each number of
    steps)."""
    state = checkpoint.load(path)
    run = build_run(state["config"], training=False)
    run.load_algo_state(state, path)
    torch.manual_seed(0)
    out = run_episodes(run, "test", episodes=episodes, ways=0, shots=0, query=0, steps=steps)
    label = f"{run.config.algo.name} at meta-batch {state['progress']['iteration']}"
    return label, out["score"].double().cpu()  # (episodes, len(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--steps", default="0,1,2,3")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    settings = {str(p): checkpoint.load(p)["config"]["data"] for p in args.checkpoints}
    if len({repr(sorted(data.items())) for data in settings.values()}) > 1:
        raise SystemExit(f"the checkpoints' data settings differ, so their tasks do: {settings}")
    scored = [returns(path, args.episodes, steps) for path in args.checkpoints]

    def cell(values: torch.Tensor) -> str:
        summary = mean_ci95(values)
        return f"{summary['mean']:.2f} ± {summary['ci95']:.2f}"

    print("| checkpoint | " + " | ".join(f"{k} steps" for k in steps) + " |")
    print("| --- |" + " --- |" * len(steps))
    for path, (label, score) in zip(args.checkpoints, scored, strict=True):
        cells = [cell(score[:, i]) for i in range(len(steps))]
        print(f"| {label} ({path}) | " + " | ".join(cells) + " |")
    for label, score in scored:  # adaptation's gain
        cells = [cell(score[:, i] - score[:, 0]) for i in range(len(steps))]
        print(f"| {label}: after k steps minus before, paired | " + " | ".join(cells) + " |")
    *others, (base, base_score) = scored
    for label, score in others:
        cells = [cell(score[:, i] - base_score[:, i]) for i in range(len(steps))]
        print(f"| {label} minus {base}, paired | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
