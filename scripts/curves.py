"""Learning curves of finished runs side by side: one PNG (validation metric against minutes of
training and against iterations) and one markdown table (test result, command, hardware, wall
time, the published number), under results/.

Usage:
    python scripts/curves.py NAME --title "MAML++ and MAML, Omniglot 5-way 1-shot" \\
        --run "MAML++=outputs/issue16/mamlpp_5w1s_15min" --published "MAML++=99.47% (...)" \\
        --run "MAML=outputs/issue16/maml_5w1s_15min" --published "MAML=98.7 ± 0.4% (...)"

Minutes on the x axis are the iteration's share of the run's wall time (training and validation
together), so that runs of different speeds compare at the same wall-clock budget. `--train
PREFIX` adds a third panel with the training metrics whose names start with PREFIX (for example
`train/instance_acc_`, the Santoro protocol's accuracy per class presentation), each a moving
mean over `--smooth` logged steps, and their first and last means under the table.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metalearn.records.plots import plt, save  # noqa: E402

KEYS = ("val/acc", "val/mse", "val/reward", "val/return")  # return: after the inner steps


def curve(run: Path) -> tuple[str, list[tuple[int, float]]]:
    points, key = [], None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        found = next((k for k in KEYS if k in record), None)
        if found:
            key = found
            points.append((record["step"], record[found]))
    if not points:
        raise SystemExit(f"{run}/metrics.jsonl has no validation records ({', '.join(KEYS)})")
    return key, points


def train_curves(run: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    """Every logged training metric named PREFIX...: {name: [(step, value), ...]}."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key.startswith(prefix):
                curves.setdefault(key, []).append((record["step"], value))
    if not curves:
        raise SystemExit(f"{run}/metrics.jsonl has no training metrics named {prefix}*")
    return dict(sorted(curves.items(), key=lambda kv: natural(kv[0])))


def natural(name: str) -> tuple[str, int]:
    """instance_acc_2 before instance_acc_10."""
    head = name.rstrip("0123456789")
    return head, int(name[len(head) :] or 0)


def moving_mean(values: list[float], window: int) -> list[float]:
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
        for i in range(len(values))
    ]


def command(run: Path) -> str:
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    return "metalearn train " + " ".join(o for o in overrides if not o.startswith("hydra."))


def test_cell(results: dict) -> str:
    test = results["test"]
    if results["metric"] == "accuracy":
        value = test["accuracy"]
        return f"{100 * value['mean']:.2f} ± {100 * value['ci95']:.2f}%"
    value = test[results["metric"]]
    return f"{value['mean']:.3f} ± {value['ci95']:.3f}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="results/<name>.png and results/<name>.md")
    parser.add_argument("--title", required=True)
    parser.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR")
    parser.add_argument("--published", action="append", default=[], help="LABEL=TEXT")
    parser.add_argument("--note", default="", help="a paragraph under the table (not echoed)")
    parser.add_argument("--train", default=None, help="also plot training metrics PREFIX*")
    parser.add_argument("--smooth", type=int, default=20, help="logged steps per moving mean")
    parser.add_argument("--ymin", type=float, default=None, help="the validation axes' lower end")
    args = parser.parse_args(argv)
    published = dict(p.split("=", 1) for p in args.published)
    runs = [(label, Path(path)) for label, path in (r.split("=", 1) for r in args.run)]

    panels = 3 if args.train else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    by_time, by_step = axes[0], axes[1]
    rows, train_rows = [], []
    for label, run in runs:
        results = json.loads((run / "results.json").read_text())
        key, points = curve(run)
        train, hardware = results["train"], results["hardware"]
        minutes = train["wall_seconds"] / 60
        steps, values = zip(*points, strict=True)
        scale = 100 if key == "val/acc" else 1
        by_time.plot(
            [minutes * s / train["iterations"] for s in steps],
            [scale * v for v in values],
            marker="o",
            label=label,
        )
        by_step.plot(steps, [scale * v for v in values], marker="o", label=label)
        where = (
            f"{hardware['threads']} CPU thread(s) ({hardware['cpu']}), torch {hardware['torch']}"
        )
        rows.append(
            f"| {label} | {test_cell(results)} | {published.get(label, '-')} "
            f"| {train['iterations']} | {minutes:.1f} min | {where} | `{command(run)}` |"
        )
        if args.train:
            for name, series in train_curves(run, args.train).items():
                at, raw = zip(*series, strict=True)
                smooth = moving_mean(list(raw), args.smooth)
                short = name.removeprefix(args.train)
                axes[2].plot(at, smooth, label=f"{label}: {short}" if len(runs) > 1 else short)
                first = sum(raw[: args.smooth]) / len(raw[: args.smooth])
                train_rows.append(
                    f"| {label} | {name} | {first:.3f} | {smooth[-1]:.3f} | {at[-1]} |"
                )
    unit = " (%)" if key == "val/acc" else ""
    for ax, xlabel in ((by_time, "minutes of training (wall clock)"), (by_step, "iteration")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key + unit)
        if args.ymin is not None:  # a run that collapses would hide the others
            ax.set_ylim(bottom=args.ymin)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if args.train:
        axes[2].set_xlabel("iteration")
        axes[2].set_ylabel(f"{args.train}* (training, mean of {args.smooth} logs)")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=7)
    fig.suptitle(args.title)
    results_dir = Path("results")
    png = save(fig, results_dir / f"{args.name}.png")
    table = [
        f"# {args.title}",
        "",
        f"Validation curves: `{png.name}`. Test: the best validation checkpoint on the test "
        "episodes (mean ± 95% CI over episodes). Generated by "
        f"`python scripts/curves.py {shlex.join(a for a in argv)}`.",
        "",
        "| run | test | published | iterations | wall time | hardware | command |",
        "|---|---|---|---:|---:|---|---|",
        *rows,
    ]
    if train_rows:
        table += [
            "",
            f"Training metrics {args.train}* (means of the first and the last {args.smooth} "
            "logged steps):",
            "",
            "| run | metric | first | last | last iteration |",
            "|---|---|---:|---:|---:|",
            *train_rows,
        ]
    if args.note:
        table += ["", args.note]
    (results_dir / f"{args.name}.md").write_text("\n".join(table) + "\n")
    print(f"wrote {png} and {results_dir / (args.name + '.md')}")


if __name__ == "__main__":
    main(sys.argv[1:])
