"""`metalearn train|eval` (Hydra entry points) and `bench|summarize|reproduce` (plain arguments)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from metalearn.errors import MetalearnError

if TYPE_CHECKING:
    from metalearn.distributed import Group
    from metalearn.run import Run

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
USAGE = """usage: metalearn <command> [overrides] [--help]

commands:
  train   meta-train, validate and test (default: MAML on sinusoid regression)
  eval    re-test a checkpoint, or classify your own episode: eval checkpoint=PATH ...
  bench   time meta-training against learn2learn and reference code: bench [key=value ...]
  reproduce  a paper table's rows over seeds beside the published numbers: reproduce TABLE
  summarize  one table (CSV and markdown) of a sweep's runs, seeds pooled: summarize DIR

`metalearn <command> --help` lists the config groups and their options."""


def _train(cfg: DictConfig) -> float:
    """Train one run; return the best validation metric (what a Hydra sweeper optimises)."""
    from hydra.types import RunMode

    from metalearn import distributed
    from metalearn.build import build_run

    hydra_cfg = HydraConfig.get()
    raw = OmegaConf.to_container(cfg, resolve=True)
    if hydra_cfg.mode == RunMode.MULTIRUN and raw["logger"].get("group") is None:
        raw["logger"]["group"] = sweep_group(hydra_cfg.sweep.dir)  # one W&B group per sweep
    device = raw["hardware"]["device"]
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    group = distributed.init(device)
    run_dir = Path(group.share(hydra_cfg.runtime.output_dir))  # rank 0's: it alone writes
    try:
        results = train(build_run(raw), run_dir, group)
    finally:
        if group.world > 1:
            distributed.shutdown()
    return sweep_value(results)


def train(run: Run, run_dir: Path, group: Group | None = None) -> dict:
    """Meta-train, validate, keep the best checkpoint, test it; return results.json's dict.

    The orchestration, top to bottom: where training starts (fresh or resumed), the run's log
    (metrics.jsonl and W&B), the loop, then the report. Under torchrun every rank trains and
    returns rank 0's results; rank 0 alone logs, writes and tests."""
    from metalearn.distributed import SINGLE
    from metalearn.records.logger import Logger, NullLogger
    from metalearn.records.results import finish_run, git_info
    from metalearn.train.config import OnlineConfig
    from metalearn.train.loop import meta_train, start

    git_info()  # the commit of the code that runs, read now: results.json reports it at the end
    group = group or SINGLE
    if isinstance(run.config.trainer, OnlineConfig):  # FTML over a task stream, one process
        from metalearn.train.online import train_online

        return train_online(run, run_dir, group)
    at = start(run, run_dir, group)
    if group.main:
        logger = Logger(
            run.config.logger,
            run_dir,
            run_name=run.name,
            config=run.config_dict,
            resume_step=at.progress.iteration if at.resumed else None,
        )
    else:
        logger = NullLogger()
    try:
        meta_train(run, run_dir, at, logger, group)
        results = finish_run(run, at.progress, run_dir, logger) if group.main else None
    except BaseException:
        logger.close(exit_code=1)
        raise
    logger.close()
    return group.share(results)


def sweep_value(results: dict) -> float:
    """The best validation metric (an online run, which validates nothing: its FTML score over
    the stream); a run whose every validation diverged scores the worst value instead of NaN
    (which would fail the trial, and Hydra's Optuna sweeper with it)."""
    value = (results["val"] or results["test"])[results["metric"]]["mean"]
    if math.isnan(value):
        return math.inf if results["metric"] in ("mse", "final_loss") else -math.inf
    return value


def sweep_group(sweep_dir: str) -> str:
    """The W&B group of a multirun's jobs: its sweep directory, e.g.
    'multirun/2026-12-01/22-40-00' for outputs/multirun/2026-12-01/22-40-00."""
    parts = Path(sweep_dir).parts
    return "/".join(parts[1:] if parts and parts[0] == "outputs" and len(parts) > 1 else parts)


_CHECKPOINT_GROUPS: list[str] = []  # eval: the checkpoint's groups, composed but not overrides


def _eval(cfg: DictConfig) -> float:
    """Re-test a checkpoint (or classify one user episode) into this run's directory."""
    from metalearn.reevaluate import evaluate_checkpoint

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    for group in _CHECKPOINT_GROUPS:
        overrides.remove(group)
    results = evaluate_checkpoint(
        composed=OmegaConf.to_container(cfg, resolve=True),
        overrides=overrides,
        run_dir=Path(hydra_cfg.runtime.output_dir),
    )
    return results["test"][results["metric"]]["mean"] if "test" in results else float("nan")


def _reported(entry):
    """Turn a MetalearnError into one clear line on stderr and exit status 1, no traceback."""

    def run(cfg: DictConfig):
        try:
            return entry(cfg)
        except MetalearnError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)

    run.__name__ = entry.__name__
    return run


ENTRIES = {"train": _train, "eval": _eval}


def _bench(args: list[str]) -> None:
    """`metalearn bench key=value ...` (the keys: tools/bench/config.py's BenchConfig)."""
    import dataclasses

    from metalearn.config import from_dict
    from metalearn.tools.bench.config import BenchConfig
    from metalearn.tools.bench.run import run_bench

    if any(a in ("-h", "--help") for a in args):
        print("usage: metalearn bench [key=value ...]\n\nkeys (defaults):")
        for f in dataclasses.fields(BenchConfig):
            default = f.default_factory() if callable(f.default_factory) else f.default
            print(f"  {f.name}={default}")
        return
    bad = [a for a in args if "=" not in a]
    if bad:
        sys.exit(f"error: bench options are key=value, got {bad}; see metalearn bench --help")
    try:
        raw = OmegaConf.to_container(OmegaConf.from_dotlist(args))
        run_bench(from_dict(BenchConfig, raw, "bench"))
    except MetalearnError as error:
        sys.exit(f"error: {error}")


def _rank_overrides(command: str) -> list[str]:
    """Under torchrun, ranks other than 0 keep Hydra's own files out of the run directory:
    they get a scratch one, removed at exit (the run directory is rank 0's, see _train)."""
    from metalearn import distributed

    if not distributed.launched():
        return []
    if any(a in ("-m", "--multirun") for a in sys.argv):
        sys.exit(
            "error: torchrun runs one training run over several processes; run sweeps "
            "(-m) with a Hydra launcher instead (hydra/launcher=slurm or submitit_local)"
        )
    if command != "train":
        sys.exit(f"error: metalearn {command} runs in one process; start it without torchrun")
    if distributed.env_rank() == 0:
        return []
    import atexit
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix=f"metalearn-rank{distributed.env_rank()}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]


def _check_output_folder(args: list[str]) -> None:
    """Refuse, in one line, a run folder that cannot be made (Hydra would print a traceback):
    the nearest existing folder above it must be a writable folder."""
    import os

    target = Path("outputs")  # where the configs' hydra.run.dir and hydra.sweep.dir start
    for arg in args:
        key, _, value = arg.partition("=")
        if key.lstrip("+") in ("hydra.run.dir", "hydra.sweep.dir") and value:
            target = Path(value.split("${", 1)[0] or ".")  # up to the first interpolation
    above = target
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        sys.exit(
            f"error: cannot create the run folder {target}: {above} is a file, not a folder; "
            f"choose another hydra.run.dir (or hydra.sweep.dir)"
        )
    if not os.access(above, os.W_OK):
        sys.exit(
            f"error: cannot create the run folder {target}: {above} is not writable (read-only "
            f"or another user's); choose another hydra.run.dir (or hydra.sweep.dir)"
        )


def _summarize(args: list[str]) -> None:
    """`metalearn summarize DIR`: DIR/summary.csv and summary.md from its results.json files."""
    from metalearn.tools.summarize import summarize, write

    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(
            "usage: metalearn summarize DIR\n\nCollects every results.json under DIR (a "
            "multirun folder), pools seeds, writes DIR/summary.csv and DIR/summary.md."
        )
        sys.exit(0 if args and args[0] in ("-h", "--help") else 2)
    try:
        root = Path(args[0])
        print(write(root, summarize(root)), end="")
        print(f"wrote {root / 'summary.csv'} and {root / 'summary.md'}", file=sys.stderr)
    except MetalearnError as error:
        sys.exit(f"error: {error}")


def _reproduce(args: list[str]) -> None:
    """`metalearn reproduce TABLE [--budget F] [--seeds N]` (see metalearn/tools/reproduce.py)."""
    from metalearn.tools.reproduce import main as reproduce

    try:
        reproduce(args)
    except MetalearnError as error:
        sys.exit(f"error: {error}")


COMMANDS = {
    "bench": _bench,
    "summarize": _summarize,
    "reproduce": _reproduce,
}  # plain key=value or path arguments


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] in COMMANDS:
        COMMANDS[sys.argv[1]](sys.argv[2:])
        return
    if len(sys.argv) < 2 or sys.argv[1] not in ENTRIES:
        print(USAGE, file=sys.stderr)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    if not CONFIG_DIR.is_dir():
        sys.exit(
            f"error: configs not found at {CONFIG_DIR}; install metalearn from its source "
            f"tree with `make install` (pip install -e .)"
        )
    command = sys.argv[1]
    if not any(a in ("-h", "--help", "--cfg", "-c", "--info") for a in sys.argv[2:]):
        _check_output_folder(sys.argv[2:])
    args = sys.argv[2:]
    if command == "eval" and not any(a in ("-h", "--help") for a in args):
        from metalearn.reevaluate import checkpoint_groups

        _CHECKPOINT_GROUPS[:] = checkpoint_groups(args, CONFIG_DIR)
        args = [*_CHECKPOINT_GROUPS, *args]
    sys.argv = [f"metalearn {command}", *args, *_rank_overrides(command)]
    entry = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=command)
    entry(_reported(ENTRIES[command]))()


if __name__ == "__main__":
    main()
