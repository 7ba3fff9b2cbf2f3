"""Sinusoid MSE of gradient-based learners on MAML's protocol and CAVIA's, with the number of
parameters each adapts per task and the number it meta-learns: the README's issue-21 table.

Each run directory holds a training run (`metalearn train ...`) and, under `other_protocol/`,
the same checkpoint re-tested on the other protocol (`metalearn eval checkpoint=... `):
MAML's is K support and 10 random query points per task, CAVIA's 100 evenly spaced points over
[-5, 5] (`data.test_points=grid eval.query=100`).

Usage: python scripts/sinusoid_protocols_table.py <run dir> [<run dir> ...]
"""

import json
import math
import sys
from pathlib import Path

import torch
import yaml

STEPS = (1, 10)
SHOTS = (5, 10)


def mse_cells(results: dict) -> dict[tuple[int, int], str]:
    out = {}
    for entry in results["test"]["breakdown"]:
        mse = entry["mse"]
        finite = math.isfinite(mse["mean"]) and math.isfinite(mse["ci95"])
        text = f"{mse['mean']:.3f} ± {mse['ci95']:.3f}" if finite else "diverges"
        out[(entry["shots"], entry["inner_steps"])] = text
    return out


def counts(run: Path, algo: str, config: dict) -> tuple[str, int]:
    """(parameters adapted per task, parameters meta-learned besides the initialisation)."""
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=False)["algo_state"]
    model, meta = state["model"], state.get("meta", {})
    extra = sum(v.numel() for v in meta.values() if not isinstance(v, dict))
    if algo == "cavia":
        return str(config["algo"]["context_params"]), 0
    if algo == "warpgrad":
        task = sum(v.numel() for k, v in model.items() if k.startswith("task."))
        warp = sum(v.numel() for k, v in model.items() if k.startswith("warp."))
        return str(task), warp
    total = sum(v.numel() for v in model.values())
    if algo == "mtnet":  # units adapt with probability sigmoid(zeta): the expected count
        expected = 0.0
        for key, logits in meta.items():
            if key.startswith("mask."):
                layer = key.removeprefix("mask.")
                per_unit = model[f"{layer}.weight"][0].numel() + (f"{layer}.bias" in model)
                expected += float(torch.sigmoid(logits).sum()) * per_unit
        return f"{expected:.0f} of {total} (expected)", extra
    return str(total), extra


def main() -> None:
    print(
        "| algorithm | adapted per task | meta-learned besides the init | protocol "
        + " ".join(f"| K={k}, {s} step{'s' if s > 1 else ''} " for k in SHOTS for s in STEPS)
        + "| training |"
    )
    print("| --- " * (5 + len(SHOTS) * len(STEPS)) + "|")
    for arg in sys.argv[1:]:
        run = Path(arg)
        results = json.loads((run / "results.json").read_text())
        other = json.loads((run / "other_protocol" / "results.json").read_text())
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        algo = config["algo"]["name"]
        adapted, extra = counts(run, algo, config)
        train = results["train"]
        minutes = f"{train['wall_seconds'] / 60:.1f} min, {train['iterations']} it"
        by_grid = {results["task"]["query"] == 100: results, other["task"]["query"] == 100: other}
        for grid in (False, True):
            cells = mse_cells(by_grid[grid])
            name = "CAVIA's: 100 grid points" if grid else "MAML's: 10 random points"
            row = " ".join(f"| {cells.get((k, s), '-')} " for k in SHOTS for s in STEPS)
            print(f"| {algo} | {adapted} | {extra} | {name} {row}| {minutes} |")


if __name__ == "__main__":
    main()
