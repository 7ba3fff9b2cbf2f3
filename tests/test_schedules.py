"""The outer optimiser and learning-rate schedule each algorithm trains with."""

import math

import pytest
import torch
from conftest import compose_config

from metalearn.build import build_run
from metalearn.errors import ConfigError
from metalearn.train.schedule import outer_lr_at, outer_optimizer, schedule

SINUSOID = ["data=sinusoid", "logger=none", "trainer.iterations=100"]


def run_for(*overrides: str):
    return build_run(compose_config([*SINUSOID, *overrides]))


def test_each_algorithm_gets_its_papers_schedule_unless_told_otherwise():
    assert schedule(run_for("algo=maml")) == "constant"
    assert schedule(run_for("algo=mamlpp")) == "cosine"  # MAML++'s cosine annealing
    assert schedule(run_for("algo=reptile")) == "linear"  # Reptile's epsilon -> 0
    assert schedule(run_for("algo=maml", "trainer.lr_decay_every=10")) == "step"
    assert schedule(run_for("algo=mamlpp", "trainer.lr_schedule=constant")) == "constant"


def test_cosine_linear_and_step_schedules_hit_their_end_points():
    run = run_for("algo=mamlpp", "algo.outer_lr=0.01", "trainer.min_lr=0.001")
    assert outer_lr_at(run, 0) == pytest.approx(0.01)
    assert outer_lr_at(run, 50) == pytest.approx(0.001 + 0.5 * 0.009)
    assert outer_lr_at(run, 100) == pytest.approx(0.001)
    run = run_for("algo=reptile", "algo.outer_lr=1.0")
    assert [outer_lr_at(run, i) for i in (0, 25, 100)] == pytest.approx([1.0, 0.75, 0.0])
    run = run_for("algo=maml", "algo.outer_lr=0.1", "trainer.lr_decay_every=30")
    assert outer_lr_at(run, 29) == pytest.approx(0.1) and outer_lr_at(run, 30) == 0.05
    assert outer_lr_at(run, 95) == pytest.approx(0.1 * 0.5**3)
    assert not any(math.isnan(outer_lr_at(run, i)) for i in range(200))


def test_reptile_steps_with_sgd_and_the_rest_with_adam():
    def optimizer(*overrides: str) -> torch.optim.Optimizer:
        run = run_for(*overrides)
        return outer_optimizer(run.config.algo, run.algo)

    assert isinstance(optimizer("algo=reptile"), torch.optim.SGD)
    assert isinstance(optimizer("algo=reptile", "algo.outer_optimizer=adam"), torch.optim.Adam)
    assert isinstance(optimizer("algo=metasgd"), torch.optim.Adam)
    # Meta-SGD's learned step sizes are stepped by the same optimiser as the weights
    run = run_for("algo=metasgd")
    assert len(optimizer("algo=metasgd").param_groups[0]["params"]) == 2 * len(
        list(run.model.parameters())
    )


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("trainer.lr_schedule=exponential", ["trainer.lr_schedule", "cosine"]),
        ("trainer.lr_schedule=step", ["lr_decay_every"]),
        ("trainer.min_lr=-1", ["trainer.min_lr"]),
    ],
)
def test_bad_schedules_are_refused(override: str, words: list[str]):
    with pytest.raises(ConfigError) as error:
        run_for("algo=maml", override)
    for word in words:
        assert word in str(error.value)
