"""A full disk or an unwritable output, injected through the kernel: writes that go to /dev/full
(every write fails with ENOSPC), a file-size limit (EFBIG) and a run folder under a file. A
checkpoint or results.json that cannot be written is a clear error with the previous files
intact and a resume that ends as if nothing happened; metrics.jsonl that cannot be written is a
warning, and training goes on."""

import json
import os
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from faults.sinusoid import SINUSOID, run
from metalearn.errors import CheckpointError, MetalearnError
from metalearn.records import checkpoint

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict:
    return run(tmp_path_factory.mktemp("whole"), "trainer.iterations=15")


def full_disk_at(path: Path) -> None:
    """Writes to `path` go to /dev/full: the kernel answers ENOSPC, as on a full disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to("/dev/full")


def test_a_checkpoint_write_on_a_full_disk_stops_cleanly_and_resumes_identically(
    tmp_path, whole, tally
):
    run(tmp_path, "trainer.iterations=10")
    last = tmp_path / "checkpoints" / "last.pt"
    before = last.read_bytes()
    full_disk_at(last.with_name(".last.pt.tmp"))
    with pytest.raises(CheckpointError) as error:
        run(tmp_path, "trainer.iterations=15", "trainer.resume=true")
    message = str(error.value)
    assert f"cannot write checkpoint {last}: the disk is full" in message
    assert f"{last} is intact" in message and "trainer.resume=true" in message
    assert last.read_bytes() == before  # the previous checkpoint, untouched
    assert checkpoint.load(last)["progress"]["iteration"] == 10
    # once space is free (the failed write removed its temporary file), nothing is lost
    resumed = run(tmp_path, "trainer.iterations=15", "trainer.resume=true")
    assert resumed["test"] == whole["test"] and resumed["val"] == whole["val"]
    tally["disk"] += 1


def test_metrics_on_a_full_disk_warn_once_and_training_goes_on(tmp_path, whole, tally):
    full_disk_at(tmp_path / "metrics.jsonl")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        results = run(tmp_path, "trainer.iterations=15")
    said = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    full = [m for m in said if "cannot write" in m and "No space left on device" in m]
    assert len(full) == 1 and "metrics.jsonl" in full[0]  # said once, not once per line
    assert any("18 metrics lines could not be written" in m for m in said)  # 15 train + 3 val
    assert results["test"] == whole["test"]  # the run itself is unaffected
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["progress"]["iteration"] == 15
    tally["disk"] += 1


def test_results_json_on_a_full_disk_is_an_error_and_a_resume_writes_it(tmp_path, whole, tally):
    full_disk_at(tmp_path / ".results.json.tmp")
    with pytest.raises(MetalearnError, match="cannot write .*results.json.*trainer.resume=true"):
        run(tmp_path, "trainer.iterations=15")
    assert not (tmp_path / "results.json").exists()
    resumed = run(tmp_path, "trainer.iterations=15", "trainer.resume=true")  # trains nothing
    assert resumed["test"] == whole["test"] and resumed["val"] == whole["val"]
    tally["disk"] += 1


def test_a_file_size_limit_makes_the_first_checkpoint_a_clear_error(tmp_path, tally):
    """RLIMIT_FSIZE: the kernel refuses to grow any file past 8 KiB (EFBIG; Python ignores the
    SIGXFSZ that comes with it); a checkpoint is larger."""

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    done = subprocess.run(
        [sys.executable, "-m", "metalearn.cli", "train", *SINUSOID, "trainer.iterations=10"]
        + [f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        preexec_fn=limited,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: cannot write checkpoint")
    assert "larger than this process may write" in error and "no earlier checkpoint" in error
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "checkpoints").glob("*.pt"))  # no half file left behind
    tally["disk"] += 1


@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_a_run_folder_that_cannot_be_made_is_one_clear_line(tmp_path, key, tally):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    multirun = ["-m"] if key == "hydra.sweep.dir" else []
    done = subprocess.run(
        [sys.executable, "-m", "metalearn.cli", "train", *multirun, "debug=smoke"]
        + [f"{key}={blocker / 'run'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"error: cannot create the run folder {blocker / 'run'}: {blocker} is a file, not a "
        f"folder; choose another hydra.run.dir (or hydra.sweep.dir)"
    )
    tally["disk"] += 1


def test_metrics_lines_the_disk_refused_are_written_once_it_takes_them_again(tmp_path, tally):
    """RLIMIT_FSIZE lowered in this process while logging, then raised again: the lines refused
    meanwhile (EFBIG) reach metrics.jsonl, in order and whole, before the next one."""
    from metalearn.records.logger import Logger, LoggerConfig

    logger = Logger(LoggerConfig(kind="none"), tmp_path, run_name="r", config={})
    rows = [{"step": step, "train/loss": 1.0 / step} for step in range(1, 31)]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for row in rows[:10]:
            logger.log({"train/loss": row["train/loss"]}, step=row["step"])
        size = (tmp_path / "metrics.jsonl").stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))  # a line and a half more
        try:
            for row in rows[10:20]:
                logger.log({"train/loss": row["train/loss"]}, step=row["step"])
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        for row in rows[20:]:
            logger.log({"train/loss": row["train/loss"]}, step=row["step"])
        logger.close()
    said = [str(w.message) for w in seen]
    assert sum("cannot write" in m and "File too large" in m for m in said) == 1
    assert any("is written again" in m for m in said)
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert written == rows
    tally["disk"] += 1
