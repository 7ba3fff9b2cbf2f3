"""Damaged, foreign and future checkpoints: a damaged last.pt or best.pt falls back to the
previous good one (and a resume from it still ends identically); anything that cannot be
trusted is a CheckpointError naming the file; nothing in a checkpoint file is ever executed,
and no checkpoint is ever written holding a NaN."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from faults.sinusoid import run
from metalearn.errors import CheckpointError
from metalearn.records import checkpoint
from metalearn.reevaluate import evaluate_checkpoint


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict:
    return run(tmp_path_factory.mktemp("whole"), "trainer.iterations=15")


@pytest.fixture
def stopped(tmp_path) -> Path:
    """A run stopped after 10 iterations: last.pt at 10, last.prev.pt at 5."""
    run(tmp_path, "trainer.iterations=10")
    return tmp_path / "checkpoints" / "last.pt"


def flip_a_weight(path: Path) -> None:
    """Change one byte inside a weight tensor's data, leaving the zip structure alone."""
    state = torch.load(path, weights_only=True)
    weight = next(iter(state["algo_state"]["model"].values()))
    data = bytearray(path.read_bytes())
    at = data.find(weight.numpy().tobytes()[:16])
    assert at > 0
    data[at + 3] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def remove(path: Path) -> None:  # killed between the renames of a save
    path.unlink()


@pytest.mark.parametrize("damage", [flip_a_weight, truncate, remove], ids=lambda f: f.__name__)
def test_a_damaged_last_pt_resumes_from_the_previous_one_to_the_same_result(
    damage, stopped, whole, tally
):
    damage(stopped)
    with pytest.warns(RuntimeWarning, match="using the previous good checkpoint .*iteration 5"):
        resumed = run(stopped.parents[1], "trainer.iterations=15", "trainer.resume=true")
    assert resumed["test"] == whole["test"] and resumed["val"] == whole["val"]
    tally["checkpoint_corrupt"] += 1


def test_a_damaged_best_pt_is_evaluated_from_the_previous_best_with_a_warning(stopped, tally):
    best = stopped.with_name("best.pt")
    if not checkpoint.previous(best).is_file():
        pytest.skip("validation did not improve twice: there is no previous best")
    flip_a_weight(best)
    composed = compose_config([f"checkpoint={best}", "hardware.threads=1"], "eval")
    with pytest.warns(RuntimeWarning, match=f"{best} is damaged.*best.prev.pt"):
        evaluate_checkpoint(composed=composed, overrides=[], run_dir=stopped.parents[1] / "eval")
    tally["checkpoint_corrupt"] += 1


def test_both_damaged_is_an_error_naming_both_files(stopped, tally):
    truncate(stopped)
    flip_a_weight(checkpoint.previous(stopped))
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(stopped)
    assert str(stopped) in str(error.value) and "last.prev.pt is damaged" in str(error.value)
    tally["checkpoint_corrupt"] += 1


class Payload:
    """A pickle that would run a command if it were unpickled with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def future(path: Path, good: dict) -> None:
    torch.save({**good, "format": checkpoint.FORMAT + 1}, path)


def executable(path: Path, good: dict) -> None:
    with open(path, "wb") as file:
        payload = {"config": good["config"], "algo_state": Payload(path.with_name("pwned"))}
        pickle.dump(payload, file, protocol=2)


def executable_torch(path: Path, good: dict) -> None:
    torch.save({"config": good["config"], "algo_state": Payload(path.with_name("pwned"))}, path)


def other_torch_file(path: Path, good: dict) -> None:
    torch.save({"state_dict": good["algo_state"]}, path)


def garbage(path: Path, good: dict) -> None:
    path.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)


def empty(path: Path, good: dict) -> None:
    path.write_bytes(b"")


def checksum_removed(path: Path, good: dict) -> None:
    torch.save({**good, "format": checkpoint.FORMAT}, path)  # format 2 without its sha256


FOREIGN = {
    future: ["checkpoint format 3", "newer metalearn", "upgrade"],
    executable: ["not a metalearn checkpoint", "Python objects", "getattr"],
    executable_torch: ["not a metalearn checkpoint", "Python objects", "getattr"],
    other_torch_file: ["not a metalearn checkpoint", "no config or weights"],
    garbage: ["cannot read checkpoint", "truncated, damaged or not a checkpoint"],
    empty: ["cannot read checkpoint"],
    checksum_removed: ["is damaged", "checksum"],
}


@pytest.mark.parametrize("make", list(FOREIGN), ids=lambda f: f.__name__)
def test_a_checkpoint_that_cannot_be_trusted_is_an_error_naming_it(make, stopped, tally):
    good = checkpoint.load(stopped)
    path = stopped.parents[1] / "model.pt"
    make(path, good)
    composed = compose_config([f"checkpoint={path}", "hardware.threads=1"], "eval")
    with pytest.raises(CheckpointError) as error:
        evaluate_checkpoint(composed=composed, overrides=[], run_dir=path.parent / "eval")
    message = str(error.value)
    assert str(path) in message
    for words in FOREIGN[make]:
        assert words in message
    assert not path.with_name("pwned").exists()  # nothing in the file ran
    tally["checkpoint_corrupt"] += 1


def test_a_checkpoint_from_another_model_is_refused_on_resume(stopped, tally):
    with pytest.raises(CheckpointError, match="algo=maml model=mlp.*algo=fomaml"):
        run(stopped.parents[1], "algo=fomaml", "trainer.iterations=15", "trainer.resume=true")
    tally["checkpoint_corrupt"] += 1


def test_a_checkpoint_of_the_earlier_format_without_checksum_still_loads(stopped):
    state = checkpoint.load(stopped)
    torch.save(state, stopped)  # format 1: what metalearn wrote before checksums
    assert checkpoint.load(stopped)["progress"] == state["progress"]


def test_non_finite_weights_are_never_written_and_the_old_file_stays(stopped, tally):
    state = checkpoint.load(stopped)
    before = stopped.read_bytes()
    name = next(iter(state["algo_state"]["model"]))
    state["algo_state"]["model"][name] = torch.full_like(state["algo_state"]["model"][name], 1e9)
    state["algo_state"]["model"][name][0] = float("nan")
    with pytest.raises(CheckpointError, match=f"refusing to write {stopped}.*NaN or Inf"):
        checkpoint.save(stopped, state)
    assert stopped.read_bytes() == before
    assert json.dumps(checkpoint.load(stopped)["progress"])  # still whole
    tally["checkpoint_corrupt"] += 1
