"""The README's sinusoid table of the gradient-based family from scripts/sinusoid_runs.sh.

Usage: python scripts/sinusoid_table.py [outputs/sinusoid]
"""

import json
import math
import sys
from pathlib import Path

ALGOS = ["maml", "fomaml", "reptile", "anil", "metasgd", "imaml"]
NAMES = {
    "maml": "MAML",
    "fomaml": "FOMAML",
    "reptile": "Reptile",
    "anil": "ANIL",
    "metasgd": "Meta-SGD",
    "imaml": "iMAML",
}
KS = (5, 10, 20)
# published MSE after one step, K = 5 / 10 / 20 (Li et al. 2017, table 1, as commonly quoted)
# (Finn et al. 2017, appendix: trained with K = 10, tested with K = 5: 0.67 after 1 step and
# 0.35 after 10)
PUBLISHED = {
    "maml": "1.13 / 0.77 / 0.48; K=5: 0.67 (1 step), 0.35 (10 steps), trained with K=10",
    "metasgd": "0.90 / 0.53 / 0.31",
}


def cell(breakdown: list, shots: int, steps: int) -> str:
    for entry in breakdown:
        if entry["shots"] == shots and entry["inner_steps"] == steps:
            mse = entry["mse"]
            if not math.isfinite(mse["mean"]):
                return "diverges"
            return f"{mse['mean']:.3f} ± {mse['ci95']:.3f}"
    return "-"


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/sinusoid")
    header = ["algorithm"]
    for k in KS:
        header += [f"K={k}, 1 step", f"K={k}, 10 steps"]
    header += ["training (K=5 / 10 / 20)", "published, 1 step, K=5 / 10 / 20"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for algo in ALGOS:
        cells, minutes, iterations = [], [], "-"
        for k in KS:
            path = root / f"{algo}_k{k}" / "results.json"
            if not path.is_file():
                cells += ["-", "-"]
                minutes.append("-")
                continue
            results = json.loads(path.read_text())
            breakdown = results["test"]["breakdown"]
            cells += [cell(breakdown, k, 1), cell(breakdown, k, 10)]
            train = results["train"]
            minutes.append(f"{train['wall_seconds'] / 60:.1f}")
            iterations = train["iterations"]
        training = f"{' / '.join(minutes)} min, {iterations} it"
        row = [NAMES[algo], *cells, training, PUBLISHED.get(algo, "-")]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
