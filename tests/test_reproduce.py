"""`metalearn reproduce`: a table's rows run over seeds, reused when finished, written beside the
published numbers; a row whose data is missing says so instead of stopping the table."""

import csv
import json
from pathlib import Path

import pytest

from metalearn.errors import ConfigError
from metalearn.tools.reproduce import (
    budget_overrides,
    experiment_config,
    load_table,
    reproduce,
    tables,
)

TINY = ["debug=smoke", "hardware.threads=1", "eval.episodes=4", "eval.val_episodes=4"]


def test_every_table_names_existing_experiments_with_published_values():
    assert {"maml_omniglot", "protonet_omniglot", "maml_sinusoid", "rl2_bandits"} <= set(tables())
    experiments = {p.stem for p in Path("configs/experiment").glob("*.yaml")}
    for name in tables():
        spec, rows = load_table(name)
        assert spec["source"] and rows
        for row in rows:
            assert row.experiment in experiments, (name, row.experiment)
            assert row.published["mean"] > 0


def test_a_budget_scales_iterations_validation_and_decay():
    config = experiment_config("protonet_omniglot_5w1s")  # 20000 iterations, decay every 2000
    assert budget_overrides(config, 0.01) == [
        "trainer.iterations=200",
        "trainer.eval_every=200",
        "trainer.lr_decay_every=20",
    ]
    assert budget_overrides(config, 1.0)[0] == "trainer.iterations=20000"


def test_reproduce_writes_the_table_and_reuses_finished_runs(tmp_path, capsys):
    out, results = tmp_path / "runs", tmp_path / "results"
    md = reproduce("maml_sinusoid", budget=1e-4, seeds=2, out=out, results_dir=results, extra=TINY)
    assert "| K=5, 10 steps |" in md and "0.350" in md and "`metalearn train" in md
    rows = list(csv.DictReader((results / "maml_sinusoid.csv").open()))
    assert [r["row"] for r in rows] == ["K=5, 1 step", "K=5, 5 steps", "K=5, 10 steps"]
    seed0 = json.loads(
        (out / "maml_sinusoid/budget0.0001/maml_sinusoid/seed0/results.json").read_text()
    )
    [entry] = [e for e in seed0["test"]["breakdown"] if (e["shots"], e["inner_steps"]) == (5, 10)]
    seed1 = json.loads(
        (out / "maml_sinusoid/budget0.0001/maml_sinusoid/seed1/results.json").read_text()
    )
    [other] = [e for e in seed1["test"]["breakdown"] if (e["shots"], e["inner_steps"]) == (5, 10)]
    mean = (entry["mse"]["mean"] + other["mse"]["mean"]) / 2
    assert float(rows[2]["mean"]) == pytest.approx(mean)
    assert float(rows[2]["difference"]) == pytest.approx(mean - 0.35)
    assert rows[2]["seeds"] == "2" and rows[2]["iterations"] == "7"
    assert (results / "maml_sinusoid_curves.png").stat().st_size > 0
    assert (results / "maml_sinusoid_steps.png").stat().st_size > 0
    capsys.readouterr()
    reproduce("maml_sinusoid", budget=1e-4, seeds=2, out=out, results_dir=results, extra=TINY)
    assert "[reproduce]" not in capsys.readouterr().out  # both seeds reused, nothing rerun
    reproduce("maml_sinusoid", budget=2e-4, seeds=1, out=out, results_dir=results, extra=TINY)
    assert "trainer.iterations=14" in capsys.readouterr().out  # another budget: run afresh


def test_a_row_without_its_data_says_not_run(tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    md = reproduce(
        "miniimagenet",
        budget=1e-4,
        seeds=1,
        out=tmp_path / "runs",
        results_dir=tmp_path / "results",
        extra=[*TINY, f"data.root={empty}", "data.download=false"],
    )
    assert md.count("not run:") == 6 and "miniImageNet" in md


def test_bad_arguments_fail_early():
    with pytest.raises(ConfigError, match="no table 'nope'"):
        load_table("nope")
    with pytest.raises(ConfigError, match="--budget must be in"):
        reproduce("maml_sinusoid", budget=2.0)


def test_only_runs_the_named_experiments_and_lists_the_rest(tmp_path):
    with pytest.raises(ConfigError, match="--only names nope, not in table maml_omniglot"):
        reproduce("maml_omniglot", only=["nope"], out=tmp_path, results_dir=tmp_path)
    md = reproduce(
        "maml_omniglot",
        budget=1e-4,
        seeds=1,
        out=tmp_path / "runs",
        results_dir=tmp_path / "results",
        extra=TINY,
        only=[],
    )
    assert md.count("not run: left out (--only)") == 4
    assert not (tmp_path / "runs").exists()
