"""The README's bandit table (Duan et al. 2016, Table 1) from scripts/bandit_runs.sh.

Usage: python scripts/bandit_table.py [outputs/readme_rl]
"""

import json
import sys
from pathlib import Path

SETTINGS = [(5, 10), (10, 10), (5, 100), (10, 100)]  # (arms, pulls), Table 1's columns
POLICIES = ["rl2", "gittins", "thompson", "ucb1", "epsilon_greedy", "greedy", "random"]
NAMES = {"rl2": "RL² (ours)", "epsilon_greedy": "ε-greedy (ε = 0.1)", "ucb1": "UCB1"}
# Duan et al. (2016), Table 1: total reward per trial, n = 10 (k = 5, 10), n = 100 (k = 5, 10)
PUBLISHED = {
    "rl2": "6.7 / 6.7 / 78.7 / 83.5",
    "gittins": "6.6 / 6.6 / 78.3 / 82.8",
    "random": "5.0 / 5.0 / 49.9 / 49.9",
}


def cell(value: dict) -> str:
    return f"{value['mean']:.2f} ± {value['ci95']:.2f}"


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/readme_rl")
    results = {}
    for arms, pulls in SETTINGS:
        path = root / f"rl2_bandit_k{arms}_n{pulls}" / "results.json"
        results[arms, pulls] = json.loads(path.read_text()) if path.is_file() else None
    header = ["policy", *(f"k={k}, n={n}" for k, n in SETTINGS), "published (same order)"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for policy in POLICIES:
        row = [NAMES.get(policy, policy.capitalize())]
        for setting in SETTINGS:
            r = results[setting]
            if r is None:
                row.append("-")
                continue
            entry = r["test"] if policy == "rl2" else r["baselines"][policy]
            row.append(cell(entry["reward"]))
        print("| " + " | ".join([*row, PUBLISHED.get(policy, "-")]) + " |")
    print()
    for setting, r in results.items():
        if r is not None and "train" in r:
            t = r["train"]
            print(
                f"k={setting[0]}, n={setting[1]}: {t['iterations']} iterations, "
                f"{t['wall_seconds'] / 60:.1f} min, {r['hardware']['cpu']}"
            )


if __name__ == "__main__":
    main()
