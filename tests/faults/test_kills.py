"""SIGKILL a real training run over and over (at random moments, and at the worst ones: halfway
through a checkpoint write, between its renames, during validation and during the final test),
resume it each time with trainer.resume=true, and check that no checkpoint is ever half-written
or loaded corrupt and that the final results.json and metrics equal an uninterrupted run's."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metalearn.records import checkpoint

REPO = Path(__file__).resolve().parents[2]
INJECT = Path(__file__).with_name("inject.py")
# MAML on sinusoid: 600 iterations, validated and checkpointed every 10, so that kills land in
# training, in validation and in checkpoint writes alike
RUN = [
    "train",
    "debug=smoke",
    "hardware.threads=1",
    "trainer.iterations=600",
    "trainer.eval_every=10",
    "eval.val_episodes=4",
    "eval.episodes=20",
]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def metalearn(run_dir: Path, *extra: str, inject: tuple[str, int] | None = None):
    prefix = [str(INJECT), inject[0], str(inject[1])] if inject else ["-m", "metalearn.cli"]
    command = [sys.executable, *prefix, *RUN, f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(
        command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def last_step(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    lines = [line for line in metrics.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def comparable(run_dir: Path) -> tuple[dict, list[dict]]:
    """results.json less wall times, and metrics.jsonl less throughput."""
    results = json.loads((run_dir / "results.json").read_text())
    results.pop("train")  # wall time and throughput differ; iterations are checked apart
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return results, [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def check_checkpoints(run_dir: Path) -> None:
    """Every checkpoint file is whole (its checksum holds); temporary files are never loaded."""
    folder = run_dir / "checkpoints"
    for path in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
        state = checkpoint._read(path)  # no fallback: the file itself must be whole
        assert all(torch.isfinite(t).all() for t in state["algo_state"]["model"].values())
    last = folder / "last.pt"
    if last.is_file():
        checkpoint.load(last)
    elif checkpoint.exists(last):  # killed between the renames: a resume reads last.prev.pt
        with pytest.warns(RuntimeWarning, match="using the previous good checkpoint"):
            checkpoint.load(last)


# 22 kills: 12 at random moments (8 while training, 4 from the process's start, which may be
# in start-up, resume or training), 4 halfway through a checkpoint write, 2 between its renames,
# 3 halfway through a validation and 1 halfway through the final test (that one comes last)
def plan(seed: int = 7) -> list[tuple[str, float | int]]:
    rng = random.Random(seed)
    kills: list[tuple[str, float | int]] = [("training", rng.uniform(0.0, 0.6)) for _ in range(8)]
    kills += [("anytime", rng.uniform(0.5, 5.0)) for _ in range(4)]
    kills += [("save", rng.randint(1, 4)) for _ in range(4)]
    kills += [("rename", rng.randint(1, 4)) for _ in range(2)]
    kills += [("validate", rng.randint(1, 3)) for _ in range(3)]
    rng.shuffle(kills)
    return [*kills, ("test", 1)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("whole")
    process = metalearn(run_dir)
    assert process.wait(timeout=300) == 0, process.stderr.read()[-3000:]
    return run_dir


def test_twenty_two_sigkills_resume_to_the_uninterrupted_result(uninterrupted, tmp_path, tally):
    run_dir = tmp_path / "killed"
    counts = {"sigkill": 0, "sigkill_random": 0, "sigkill_checkpoint": 0, "sigkill_eval": 0}
    for number, (where, when) in enumerate(plan(), start=1):
        resume = ["trainer.resume=true"] if number > 1 else []
        if where in ("training", "anytime"):
            process = metalearn(run_dir, *resume)
            if where == "training":  # wait until this process has trained an iteration
                start, deadline = last_step(run_dir), time.monotonic() + 60
                while last_step(run_dir) <= start and time.monotonic() < deadline:
                    assert process.poll() is None, process.stderr.read()[-3000:]
                    time.sleep(0.01)
            time.sleep(when)
            process.send_signal(signal.SIGKILL)
        else:
            process = metalearn(run_dir, *resume, inject=(where, when))
        code = process.wait(timeout=120)
        stderr = process.stderr.read()
        assert code == -signal.SIGKILL, f"kill {number} ({where}) found the run over: {stderr}"
        assert not (run_dir / "results.json").exists()
        check_checkpoints(run_dir)
        counts["sigkill"] += 1
        counts["sigkill_random"] += where in ("training", "anytime")
        counts["sigkill_checkpoint"] += where in ("save", "rename")
        counts["sigkill_eval"] += where in ("validate", "test")
    final = metalearn(run_dir, "trainer.resume=true")
    assert final.wait(timeout=300) == 0, final.stderr.read()[-3000:]
    check_checkpoints(run_dir)
    assert comparable(run_dir) == comparable(uninterrupted)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train"]["iterations"] == 600
    tally.update(counts)
