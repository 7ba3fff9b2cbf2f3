"""results/l2o_digits_mlp.md from a digits run's results.json and its ReLU re-test's.

    python scripts/l2o_digits_table.py RUN_DIR RELU_EVAL_DIR > results/l2o_digits_mlp.md

RUN_DIR: `metalearn train experiment=l2o_digits_mlp ...`; RELU_EVAL_DIR: `metalearn eval
checkpoint=RUN_DIR/checkpoints/best.pt data.activation=relu`. Each table gives every optimiser's
loss at the trained horizon and at the longer one of eval.steps, with the paired change.
"""

import json
import sys
from pathlib import Path

NAMES = {
    "l2o": "learned LSTM (l2o)",
    "adam": "Adam",
    "rmsprop": "RMSprop",
    "sgd": "SGD",
    "nag": "NAG (momentum 0.9)",
    "adam_lr1e-3": "Adam at the paper's rate",
}


def table(results: dict) -> str:
    trained, later = (e["steps"] for e in results["test"]["breakdown"][:2])
    lines = [
        f"| optimiser | rate | loss after {trained} steps | log10 mean | loss after {later} steps "
        f"| change since step {trained} (paired) | still descending |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in [("l2o", results["test"]), *results["baselines"].items()]:
        at, beyond = entry["breakdown"][:2]
        rate = "learned" if entry.get("lr") is None else f"{entry['lr']:.3g}"
        loss, far, change = at["final_loss"], beyond["final_loss"], beyond["change"]
        lines.append(
            f"| {NAMES.get(name, name)} | {rate} | {loss['mean']:.4f} ± {loss['ci95']:.4f} "
            f"| {at['log10_mean']:.3f} | {far['mean']:.4f} ± {far['ci95']:.4f} "
            f"| {change['mean']:+.4f} ± {change['ci95']:.4f} "
            f"| {'yes' if beyond['still_descending'] else 'no'} |"
        )
    return "\n".join(lines)


def main(run_dir: Path, relu_dir: Path) -> None:
    sigmoid = json.loads((run_dir / "results.json").read_text())
    relu = json.loads((relu_dir / "results.json").read_text())
    print("## Sigmoid networks (trained on these)\n")
    print(table(sigmoid))
    print("\n## ReLU networks (the same checkpoint)\n")
    print(table(relu))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
