"""A markdown table of the test calibration of `metalearn eval` (or train) run directories.

    python scripts/calibration_table.py RUN_DIR [RUN_DIR ...] > results/calibration_omniglot_5w1s.md

One row per run: accuracy, then ECE, MCE, NLL and Brier pooled over all query predictions, the
per-episode means of ECE and NLL, and, where the run fitted one (eval.temperature=true), the
temperature with the pooled ECE and NLL at it.
"""

import json
import sys
from pathlib import Path


def row(results: dict) -> str:
    test, calibration = results["test"], results["test"]["calibration"]
    pooled, per_task = calibration["pooled"], calibration["per_task"]
    accuracy = test["accuracy"]
    cells = [
        results["algo"],
        f"{100 * accuracy['mean']:.2f} ± {100 * accuracy['ci95']:.2f}%",
        *(f"{pooled[k]:.4f}" for k in ("ece", "mce", "nll", "brier")),
        f"{per_task['ece']['mean']:.4f} ± {per_task['ece']['ci95']:.4f}",
        f"{per_task['nll']['mean']:.4f} ± {per_task['nll']['ci95']:.4f}",
    ]
    scaled = calibration.get("temperature")
    if scaled:
        cells.append(
            f"{scaled['value']:.2f}: ECE {scaled['pooled']['ece']:.4f}, "
            f"NLL {scaled['pooled']['nll']:.4f}"
        )
    else:
        cells.append("-")
    return "| " + " | ".join(cells) + " |"


def main(dirs: list[Path]) -> None:
    print(
        "| learner | accuracy | ECE | MCE | NLL | Brier | ECE per episode | NLL per episode "
        "| temperature (fitted on validation) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for folder in dirs:
        print(row(json.loads((folder / "results.json").read_text())))


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]])
