"""`metalearn eval`: the checkpoint's own config, changed only by the overrides the user typed."""

import copy
import warnings
from pathlib import Path
from typing import Any

from metalearn.build import build_run
from metalearn.data.tasks import StoredTasks
from metalearn.episode import classify_episode
from metalearn.errors import CheckpointError, ConfigError
from metalearn.records import checkpoint
from metalearn.records.results import (
    result_table,
    tested_results,
    write_curve_plots,
    write_json,
    write_plots,
)

FIXED_GROUPS = ("algo", "model")  # the weights decide these; asking for others is an error
SWAPPABLE_GROUPS = ("data", "hardware", "logger")  # a new choice replaces the whole section
IGNORED = ("checkpoint", "episode", "hydra", "debug", "experiment")


def checkpoint_groups(overrides: list[str], configs: Path) -> list[str]:
    """`algo=`, `model=` and `data=` naming the checkpoint's own choices, for the groups the
    command line does not choose: composed first, they give Hydra the checkpoint's sections, so
    that it accepts overrides of their keys (`data.activation=relu` on a digits_mlp checkpoint
    while the eval config's default data set is omniglot). They are not the user's overrides:
    the caller leaves them out of merge_config's. Empty where the checkpoint cannot be read
    (evaluate_checkpoint then says why)."""
    paths = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "checkpoint"]
    if not paths:
        return []
    try:
        with warnings.catch_warnings():  # a fallback's warning comes again when it is evaluated
            warnings.simplefilter("ignore")
            saved = checkpoint.load(Path(paths[-1]).expanduser())["config"]
    except (CheckpointError, KeyError, TypeError):
        return []
    chosen = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    groups = []
    for group in (*FIXED_GROUPS, "data"):
        name = (saved.get(group) or {}).get("name")
        if group not in chosen and name and (configs / group / f"{name}.yaml").is_file():
            groups.append(f"{group}={name}")
    return groups


def merge_config(saved: dict, composed: dict, overrides: list[str], path: Path) -> dict:
    """Apply the command line's overrides (values as Hydra parsed them) to the saved config."""
    merged = copy.deepcopy(saved)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.split(".")[0] in IGNORED:
            continue
        if key in FIXED_GROUPS:
            if composed[key]["name"] != saved[key]["name"]:
                raise CheckpointError(
                    f"{path} holds a {key}={saved[key]['name']} model, not {key}="
                    f"{composed[key]['name']}; drop the {key}= override or pick another checkpoint"
                )
        elif key in SWAPPABLE_GROUPS:
            merged[key] = composed[key]
        else:
            *parents, leaf = key.split(".")
            target, source = merged, composed
            for part in parents:
                target, source = target.setdefault(part, {}), source[part]
            target[leaf] = source[leaf]
    return merged


def evaluate_checkpoint(composed: dict[str, Any], overrides: list[str], run_dir: Path) -> dict:
    """Re-test the checkpoint (or classify one user episode); write results.json in run_dir."""
    path = Path(composed["checkpoint"]).expanduser()
    state = checkpoint.load(path)
    episode = composed.get("episode") or {}
    # the user's own episode needs only the checkpoint (older ones: the data set too)
    stored = state.get("inputs") if episode.get("support") or episode.get("query") else None
    tasks = StoredTasks(**stored) if stored else None
    config = merge_config(state["config"], composed, overrides, path)
    run = build_run(config, training=False, tasks=tasks)
    checkpoint.check_compatible(state, run.config.algo.name, run.config.model.name, path)
    run.load_algo_state(state, path)
    if episode.get("support") or episode.get("query"):
        if not (episode.get("support") and episode.get("query")):
            raise ConfigError("give both episode.support=DIR and episode.query=DIR")
        output = Path(episode.get("output") or run_dir / "predictions.csv")
        summary = classify_episode(run, Path(episode["support"]), Path(episode["query"]), output)
        results = {"checkpoint": str(path), "episode": summary}
        accuracy = summary["accuracy"]
        print(
            f"{summary['query_images']} query images -> {output}"
            + (f"; accuracy {100 * accuracy:.2f}%" if accuracy is not None else "")
        )
    else:
        results, curves = tested_results(run, val=None, train=None)
        results["checkpoint"] = str(path)
        write_curve_plots(run, curves, run_dir / "plots", results)
        write_plots(run, run_dir)  # the test tasks' plots (adapted curves, bands, completions)
        print(result_table(results))
    write_json(run_dir / "results.json", results)
    return results
