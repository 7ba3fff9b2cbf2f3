"""NaN and Inf: caught at the iteration where they first appear (in the data, the forward pass or
the backward pass), named with the likely cause, handled by trainer.nonfinite (stop, or skip the
meta-batch and count it), and never written into a checkpoint."""

import json
import math
from pathlib import Path

import pytest
import torch

from faults.sinusoid import build
from metalearn.cli import train
from metalearn.errors import TrainingError
from metalearn.records import checkpoint


def poison_batches(run, iterations: set[int] | None) -> None:
    """Put a NaN into the query targets of the meta-batches of these iterations (None: all),
    as a broken data set or preprocessing would."""
    sample, calls = run.tasks.sample, [0]

    def poisoned(split, *args, **kwargs):
        batch = sample(split, *args, **kwargs)
        if split == "train":
            calls[0] += 1
            if iterations is None or calls[0] in iterations:
                batch.query.y[0, 0] = math.nan
        return batch

    run.tasks.sample = poisoned


def poison_gradient(run, iteration: int) -> str:
    """Make one parameter's gradient Inf in the backward pass of one iteration (the loss stays
    finite), as an overflowing second-order term would."""
    name, param = next(iter(run.model.named_parameters()))
    calls = [0]

    def hook(grad):
        calls[0] += 1
        return grad * math.inf if calls[0] == iteration else grad

    param.register_hook(hook)
    return name


def all_finite(path: Path) -> bool:
    state = checkpoint.load(path)
    return all(torch.isfinite(t).all() for t in state["algo_state"]["model"].values())


@pytest.mark.parametrize(
    ("fault", "iteration", "words"),
    [
        ("inner_lr", 1, ["loss became nan at iteration 1 (forward)", "algo.inner_lr=1e+20"]),
        ("outer_lr", 2, ["at iteration 2 (forward)", "algo.outer_lr=1e+30"]),
        ("data", 3, ["meta-batch of iteration 3 itself holds NaN", "data=sinusoid"]),
        ("gradient", 4, ["meta-gradient of", "at iteration 4 (backward", "algo.first_order=true"]),
    ],
)
def test_stop_names_the_iteration_and_the_likely_cause(tmp_path, fault, iteration, words, tally):
    extra = {"inner_lr": ["algo.inner_lr=1e20"], "outer_lr": ["algo.outer_lr=1e30"]}
    run = build("trainer.iterations=10", *extra.get(fault, []))
    if fault == "data":
        poison_batches(run, {iteration})
    if fault == "gradient":
        name = poison_gradient(run, iteration)
        words = [*words, name]
    with pytest.raises(TrainingError) as error:
        train(run, tmp_path)
    message = str(error.value)
    for word in words:
        assert word in message
    last = tmp_path / "checkpoints" / "last.pt"
    assert ("trainer.resume=true" in message) == last.is_file()
    assert not last.is_file() or all_finite(last)
    tally["nonfinite"] += 1


def test_skip_drops_the_bad_meta_batches_counts_them_and_finishes(tmp_path, tally):
    run = build("trainer.iterations=15", "trainer.nonfinite=skip")
    poison_batches(run, {3, 7, 11})
    with pytest.warns(RuntimeWarning, match="iteration 3 itself holds NaN.*nonfinite=skip") as seen:
        results = train(run, tmp_path)
    assert sum("nonfinite=skip" in str(w.message) for w in seen) == 1  # said once
    assert results["train"]["skipped_meta_batches"] == 3
    assert math.isfinite(results["test"]["mse"]["mean"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["train/skipped"] for r in rows if r["step"] in (3, 7, 11)] == [1, 2, 3]
    assert all(math.isfinite(r.get("train/loss", 0.0)) for r in rows)  # no NaN logged as a loss
    for name in ("last.pt", "best.pt"):
        assert all_finite(tmp_path / "checkpoints" / name)
    tally["nonfinite"] += 3


def test_skip_stops_after_max_skipped_batches(tmp_path, tally):
    run = build("trainer.iterations=15", "trainer.nonfinite=skip", "trainer.max_skipped=2")
    poison_batches(run, None)
    with pytest.raises(TrainingError, match="iteration 3 .*more than trainer.max_skipped=2"):
        with pytest.warns(RuntimeWarning):
            train(run, tmp_path)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()  # nothing good to keep
    tally["nonfinite"] += 1


def test_a_skipped_batch_leaves_the_weights_as_they_were(tmp_path):
    """Skipping is exactly 'no outer step': poisoning the last iteration of a 5-iteration run
    leaves the weights of the 4-iteration run (each validated at its end, same seeds)."""
    four = build("trainer.iterations=4", "trainer.eval_every=100")
    train(four, tmp_path / "four")
    five = build("trainer.iterations=5", "trainer.eval_every=100", "trainer.nonfinite=skip")
    poison_batches(five, {5})
    with pytest.warns(RuntimeWarning, match="nonfinite=skip"):
        train(five, tmp_path / "five")
    a = checkpoint.load(tmp_path / "four" / "checkpoints" / "last.pt")["algo_state"]["model"]
    b = checkpoint.load(tmp_path / "five" / "checkpoints" / "last.pt")["algo_state"]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
