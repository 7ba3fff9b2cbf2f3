"""Online meta-learning (trainer=online, FTML): the seeded stream, no peeking at the task being
met, the methods' curves end to end, resuming mid-stream, and the errors of bad settings."""

import contextlib
import io
import json
import runpy
import statistics
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import REPO, compose_config

from metalearn.build import build_run
from metalearn.cli import train
from metalearn.data.stream import TaskStream
from metalearn.errors import CheckpointError, ConfigError
from metalearn.evaluate import run_episodes
from metalearn.tools.summarize import summarize
from metalearn.train import online
from metalearn.train.state import METHODS

# A tiny sinusoid stream: 4 tasks with pools of 8 points (3 shots, 4 queries), 2 updates each.
TINY = [
    "trainer=online",
    "logger=none",
    "hardware.threads=1",
    "trainer.progress=false",
    "trainer.tasks=4",
    "trainer.meta_steps=2",
    "trainer.meta_batch_size=3",
    "trainer.pool=8",
    "data.shots=3",
    "data.query=4",
    "algo.test_inner_steps=2",
]


def tiny(*overrides: str, hidden: str = "[8,8]"):
    """A run of the tiny stream; sinusoid's MLP has `hidden` widths (images: conv4's own)."""
    images = any(o.startswith("data=") for o in overrides)
    model = [] if images else [f"model.hidden_sizes={hidden}"]
    return build_run(compose_config([*TINY, *model, *overrides]))


def quiet_train(run, run_dir: Path) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):  # the table printed at the end
        return train(run, run_dir)


def play(run, run_dir: Path, stream: TaskStream | None = None) -> list[dict]:
    """Play a run's rounds one by one (as online.play does, without its log and checkpoints);
    for each round, what the learner held when it met the task: the prior and the buffer."""
    at = online.start(run, run_dir)
    if stream is not None:
        at.stream = stream
    held = []
    while at.standing.rounds < run.config.trainer.tasks:
        prior = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        held.append({"prior": prior, "buffer": list(at.buffer)})
        online.play_round(run, at, run_dir)
        at.standing.rounds += 1
    held.append({"records": at.records})
    return held


def test_the_stream_is_seeded_and_its_first_tasks_do_not_depend_on_its_length():
    run = tiny()
    first = TaskStream.draw(run.tasks, 5, 1, 8, seed=3)
    again = TaskStream.draw(run.tasks, 5, 1, 8, seed=3)
    shorter = TaskStream.draw(run.tasks, 3, 1, 8, seed=3)
    other = TaskStream.draw(run.tasks, 5, 1, 8, seed=4)
    assert first.x.shape == (5, 1, 8, 1) and first.y.shape == (5, 1, 8, 1)
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    assert torch.equal(first.x[:3], shorter.x) and torch.equal(first.y[:3], shorter.y)
    assert not torch.equal(first.y, other.y)
    # every task is its own function: no two tasks share their targets
    assert len({tuple(y.flatten().tolist()) for y in first.y}) == 5


def test_a_task_is_met_with_held_out_queries_and_redrawn_from_its_own_pool(omniglot_root):
    run = tiny(
        "data=omniglot", f"data.root={omniglot_root}", "data.shots=2", "data.query=3",
        "trainer.pool=6", "model.hidden=8",
    )  # fmt: skip
    stream = TaskStream.draw(run.tasks, 3, 5, 6, seed=0)
    assert stream.x.shape == (3, 5, 6, 1, 28, 28) and stream.y.shape == (3, 5, 6)
    assert torch.equal(stream.y[0], torch.arange(5)[:, None].expand(5, 6))  # label n: class n
    met = stream.meeting(torch.tensor([1]), 2, 3)  # (1, N * K, ...), class-major
    pool = stream.x[1]  # (N, P, 1, 28, 28)
    assert torch.equal(met.support.x[0].view(5, 2, 1, 28, 28), pool[:, :2])
    assert torch.equal(met.query.x[0].view(5, 3, 1, 28, 28), pool[:, 2:5])
    drawn = stream.draw_batch(torch.tensor([1, 1, 2]), torch.Generator().manual_seed(0), 2, 3)
    for b, task in enumerate([1, 1, 2]):
        x = torch.cat([drawn.support.x[b].view(5, 2, -1), drawn.query.x[b].view(5, 3, -1)], 1)
        for n in range(5):  # 5 distinct examples of class n, all from task's own pool of class n
            own = stream.x[task, n].flatten(1)
            hits = (x[n][:, None] == own[None]).all(-1)  # (5, P)
            assert hits.any(1).all() and hits.float().argmax(1).unique().numel() == 5
        assert torch.equal(drawn.support.y[b], torch.arange(5).repeat_interleave(2))
    assert not torch.equal(drawn.support.x[0], drawn.support.x[1])  # a new draw at each visit
    # the classification path end to end: one round of every method on the 5-way task
    at = online.start(run, Path("unused"))
    scores = online.meet(run, at, stream.meeting(torch.tensor([0]), 2, 3), 0)
    assert set(scores) == set(METHODS)
    assert all(0.0 <= score <= 1.0 for _, score in scores.values())


def test_the_prior_that_meets_task_t_has_seen_tasks_before_t_and_nothing_of_task_t(tmp_path):
    run = tiny()
    held = play(run, tmp_path / "a")
    for t in range(4):
        assert held[t]["buffer"] == list(range(t))
    # The same stream with task 2's data replaced by other values: the priors that meet tasks
    # 0, 1 and 2 are the same to the bit; only the one that meets task 3 (after 2) differs.
    changed = tiny()
    stream = online.start(changed, tmp_path / "b").stream
    stream.y[2] = torch.randn_like(stream.y[2]) * 3
    other = play(changed, tmp_path / "b", stream)
    for t in range(3):
        for key, value in held[t]["prior"].items():
            assert torch.equal(value, other[t]["prior"][key]), (t, key)
    assert any(not torch.equal(v, other[3]["prior"][k]) for k, v in held[3]["prior"].items())
    # FTML and FTL meet the first task with the same initial weights and the same U_t:
    # the learner's evaluate and adapt_steps agree; a fresh initialisation does not
    records = held[-1]["records"]
    assert records["ftml"]["loss"][0] == pytest.approx(records["ftl"]["loss"][0], rel=1e-5)
    assert records["scratch"]["loss"][0] != pytest.approx(records["ftml"]["loss"][0], rel=1e-3)


def test_a_tiny_sinusoid_stream_runs_end_to_end_with_a_curve_for_each_method(tmp_path):
    results = quiet_train(tiny(), tmp_path)
    assert results["trainer"] == "online" and results["metric"] == "mse"
    assert set(results["methods"]) == {"ftml", "ftl", "toe", "scratch"}
    best = torch.tensor(results["comparator"]["loss"], dtype=torch.float64).cumsum(0)
    for entry in results["methods"].values():
        assert len(entry["score"]) == len(entry["regret"]) == 4
        losses = torch.tensor(entry["loss"], dtype=torch.float64)
        assert torch.allclose(
            torch.tensor(entry["regret"], dtype=torch.float64), losses.cumsum(0) - best
        )
        assert entry["score"] == entry["loss"]  # regression: the score is the loss (MSE)
    assert results["test"]["mse"] == results["methods"]["ftml"]["summary"]["mse"]
    assert results["stream"]["inner_steps"] == 2 and results["train"]["rounds"] == 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[2]["online/ftml_mse"] == results["methods"]["ftml"]["score"][2]
    assert (tmp_path / "plots" / "online.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "results.json").read_text())["methods"] == results["methods"]
    table = io.StringIO()
    argv = [str(REPO / "scripts" / "online_table.py"), str(tmp_path / "results.json")]
    with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(table):
        runpy.run_path(argv[0], run_name="__main__")
    table = table.getvalue()
    assert "| FTML |" in table and "| from scratch |" in table and "regret" in table
    (row,) = summarize(tmp_path)  # `metalearn summarize` reads an online run like any other
    assert row["test_mean"] == results["test"]["mse"]["mean"] and row["iterations"] == 0


def test_ftml_learns_a_stream_that_training_from_scratch_cannot(tmp_path):
    """Sinusoids of nearly one shape (A in [4, 5], phase in [0, 0.5]): after a stream of 8 tasks
    FTML's prior fits new tasks of the family in 2 steps with a fraction of the error of its
    initialisation (about 13: chance, the zero function, is about 10), and met the stream's
    later tasks far better than fresh networks did."""
    run = tiny(
        "trainer.tasks=8", "trainer.meta_steps=12", "trainer.meta_batch_size=4",
        "algo.outer_lr=0.01", "data.amplitude=[4.0,5.0]", "data.phase=[0.0,0.5]",
        hidden="[20,20]",
    )  # fmt: skip

    def new_tasks() -> float:  # 20 fixed test tasks, 3 shots, 2 steps
        out = run_episodes(run, "test", episodes=20, ways=1, shots=3, query=4, steps=[2])
        return out["score"].mean().item()

    before = new_tasks()
    results = quiet_train(run, tmp_path)
    assert new_tasks() < 2.0 and before > 8.0
    ftml, scratch = (results["methods"][m]["score"][4:] for m in ("ftml", "scratch"))
    assert statistics.median(ftml) < 0.5 * statistics.median(scratch)


def test_a_resumed_stream_ends_where_an_uninterrupted_one_does(tmp_path):
    whole = quiet_train(tiny(), tmp_path / "whole")
    quiet_train(tiny("trainer.tasks=2"), tmp_path / "parts")  # stopped after round 2 of 4
    resumed = quiet_train(tiny("trainer.resume=true"), tmp_path / "parts")
    for key in ("methods", "comparator", "test", "stream"):
        assert resumed[key] == whole[key], key

    def logged(folder: Path) -> list[dict]:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]

    assert logged(tmp_path / "parts") == logged(tmp_path / "whole")
    saved = [torch.load(tmp_path / f / "checkpoints" / "last.pt") for f in ("whole", "parts")]
    assert saved[0]["buffer"] == saved[1]["buffer"] == [0, 1, 2, 3]
    for key, value in saved[0]["algo_state"]["model"].items():
        assert torch.equal(value, saved[1]["algo_state"]["model"][key]), key
    with pytest.raises(CheckpointError, match="trainer.tasks to at least 4"):
        quiet_train(tiny("trainer.resume=true", "trainer.tasks=3"), tmp_path / "parts")


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["algo.test_inner_steps=0"], ["algo.test_inner_steps", "at least 1"]),
        (["trainer.tasks=0"], ["trainer.tasks", "at least 1"]),
        (["trainer.meta_steps=0"], ["trainer.meta_steps"]),
        (["trainer.pool=5"], ["trainer.pool=5", "at least 7"]),
        (["trainer.nonfinite=skip"], ["trainer.nonfinite=stop"]),
        (["trainer.lr_schedule=cosine"], ["trainer.lr_schedule=null"]),
    ],
)
def test_bad_settings_are_refused_at_start_up(overrides, words):
    with pytest.raises(ConfigError) as error:
        tiny(*overrides)
    for word in words:
        assert word in str(error.value)


def test_a_learner_without_an_initialisation_to_adapt_is_refused():
    overrides = ["trainer=online", "algo=protonet", "data=omniglot", "logger=none"]
    raw = compose_config([*overrides, "trainer.lr_decay_every=null"])  # (tuned/ sets it)
    with pytest.raises(ConfigError, match="algo=protonet is a metric learner: use algo=maml"):
        build_run(raw)  # before any data is read


def test_a_pool_larger_than_the_classes_hold_is_refused(omniglot_root):
    run = tiny("data=omniglot", f"data.root={omniglot_root}", "model.hidden=8", "trainer.pool=21")
    with pytest.raises(ConfigError, match="trainer.pool=21"):
        online.start(run, Path("unused"))
