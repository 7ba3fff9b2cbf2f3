"""SIGTERM and SIGINT (SLURM pre-emption, Ctrl-C) while training: last.pt is saved at the next
iteration boundary, the process ends as the signal says, and a resume finishes the run exactly
as if it had never stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metalearn.records import checkpoint

REPO = Path(__file__).resolve().parents[2]
# MAML on sinusoid, 300 iterations, no validation before the end: a signal lands mid-interval
RUN = [
    "train",
    "debug=smoke",
    "hardware.threads=1",
    "trainer.iterations=300",
    "trainer.eval_every=1000",
    "trainer.log_every=10",
]


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "metalearn.cli", *RUN, f"hydra.run.dir={run_dir}", *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.05)
    pytest.fail(f"the run never reached step {step}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("whole")
    process = start(run_dir)
    assert process.wait(timeout=300) == 0, process.stderr.read()
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize(
    ("sig", "returncodes"),
    [(signal.SIGTERM, {-signal.SIGTERM}), (signal.SIGINT, {1, 130, -signal.SIGINT})],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_stop_signal_saves_last_pt_and_resume_finishes_identically(
    sig, returncodes, uninterrupted, tmp_path, tally
):
    process = start(tmp_path)
    wait_for_step(tmp_path, 100, process)
    process.send_signal(sig)
    code = process.wait(timeout=120)
    stderr = process.stderr.read()
    assert code in returncodes, stderr[-2000:]
    assert f"{sig.name}: saved {tmp_path / 'checkpoints' / 'last.pt'} at iteration" in stderr
    assert "trainer.resume=true" in stderr
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    stopped_at = state["progress"]["iteration"]
    assert 100 <= stopped_at < 300  # saved mid-interval, not at a validation
    assert not (tmp_path / "results.json").exists()
    resumed = start(tmp_path, "trainer.resume=true")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["test"] == uninterrupted["test"]
    assert results["val"] == uninterrupted["val"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + 1  # one val row shares 300
    tally["stop_signal"] += 1
