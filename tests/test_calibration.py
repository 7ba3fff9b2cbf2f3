"""Calibration of the classifiers' test predictions: the scores against a hand computation and
against a predictor calibrated by construction, temperature scaling, and the report on real runs
(its accuracy is the test's, so `predict` and `evaluate` agree)."""

import json
import math

import pytest
import torch
from conftest import compose_config

from metalearn.errors import ConfigError
from metalearn.records.calibration import (
    fit_temperature,
    predicted,
    predictions,
    scores,
    summarize,
)
from metalearn.reevaluate import evaluate_checkpoint


def test_the_scores_of_four_predictions_by_hand():
    """Confidences 0.9 (right), 0.9 (wrong), 0.62 (right), 0.42 (wrong): three bins.
    ECE = 2/4 |0.5 - 0.9| + 1/4 |1 - 0.62| + 1/4 |0 - 0.42| = 0.4; MCE = 0.42."""
    probs = torch.tensor(
        [[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.62, 0.2, 0.18], [0.2, 0.38, 0.42]],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 1, 0, 0])
    out = scores(probs.log(), labels)
    assert out["ece"] == pytest.approx(0.4)
    assert out["mce"] == pytest.approx(0.42)
    nll = -(math.log(0.9) + math.log(0.05) + math.log(0.62) + math.log(0.2)) / 4
    assert out["nll"] == pytest.approx(nll)
    brier = (0.015 + 1.715 + 0.2168 + 0.9608) / 4  # sum_c (p_c - [c = y])^2, each prediction
    assert out["brier"] == pytest.approx(brier)


def calibrated(n: int, classes: int, generator: torch.Generator, sharpen: float = 1.0):
    """Logits whose softmax is the true class distribution (then sharpened: over-confident),
    and labels drawn from it."""
    logits = 2.0 * torch.randn(n, classes, generator=generator, dtype=torch.float64)
    labels = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    return sharpen * logits, labels


def test_a_calibrated_predictor_has_an_ece_within_sampling_error_of_zero():
    """20,000 predictions of a predictor calibrated by construction: ECE below 0.015 (sampling
    error at 15 bins is about sqrt(15 / 20000) / 2 = 0.014 at most); the same sharpened by 3 is
    far off, and temperature scaling on other draws finds the 3 back."""
    gen = torch.Generator().manual_seed(0)
    logits, labels = calibrated(20_000, 5, gen)
    assert scores(logits.log_softmax(-1), labels)["ece"] < 0.015
    sharp, sharp_labels = calibrated(20_000, 5, gen, sharpen=3.0)
    assert scores(sharp.log_softmax(-1), sharp_labels)["ece"] > 0.1
    fit_logits, fit_labels = calibrated(20_000, 5, gen, sharpen=3.0)
    assert fit_temperature(fit_logits[None], fit_labels[None]) == pytest.approx(3.0, rel=0.05)


def test_per_episode_and_pooled_scores_differ_as_their_definitions_say():
    """Two episodes: one always right at confidence 0.6, one always wrong at 0.6. Pooled, the
    bin holds accuracy 0.5 at confidence 0.6 (ECE 0.1); per episode, 0.4 and 0.6 (mean 0.5)."""
    right = torch.tensor([[0.6, 0.4]] * 4, dtype=torch.float64).log()
    logits = torch.stack([right, right])
    labels = torch.tensor([[0] * 4, [1] * 4])
    out = summarize(logits, labels)
    assert out["pooled"]["ece"] == pytest.approx(0.1)
    assert out["per_task"]["ece"]["mean"] == pytest.approx(0.5)
    assert sum(b["count"] for b in out["reliability"]) == 8


def test_eval_reports_calibration_and_temperature_for_a_checkpoint(protonet_run_dir, tmp_path):
    """A real ProtoNet checkpoint on real Omniglot: test.calibration pooled and per episode,
    raw and at the temperature fitted on validation episodes, the reliability diagram; the
    bins' accuracy is the test's accuracy (predict and evaluate give the same predictions)."""
    checkpoint = protonet_run_dir / "checkpoints" / "best.pt"
    overrides = [f"checkpoint={checkpoint}", "eval.episodes=8", "eval.val_episodes=4"]
    overrides += ["eval.temperature=true", "logger=none"]
    results = evaluate_checkpoint(
        compose_config(overrides, config_name="eval"), overrides, tmp_path / "eval"
    )
    calibration = results["test"]["calibration"]
    for entry in (calibration, calibration["temperature"]):
        assert set(entry["pooled"]) == {"ece", "mce", "nll", "brier"}
        assert set(entry["per_task"]) == {"ece", "mce", "nll", "brier"}
        assert 0 <= entry["pooled"]["ece"] <= entry["pooled"]["mce"] <= 1
    assert calibration["temperature"]["value"] > 0
    bins = calibration["reliability"]
    total = sum(b["count"] for b in bins)
    assert total == 8 * 5 * results["task"]["query"]
    accuracy = sum(b["count"] * b["accuracy"] for b in bins if b["count"]) / total
    assert accuracy == pytest.approx(results["test"]["accuracy"]["mean"], abs=1e-6)
    assert (tmp_path / "eval" / "plots" / "reliability.png").is_file()
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["test"]["calibration"]["pooled"] == calibration["pooled"]


def test_temperature_without_calibration_is_refused():
    from metalearn.build import build_run

    overrides = ["debug=smoke", "eval.calibration=false", "eval.temperature=true"]
    with pytest.raises(ConfigError, match="eval.calibration=true"):
        build_run(compose_config(overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        ["algo=maml"],
        ["algo=maml", "hardware.task_batching=loop"],
        ["algo=reptile", "algo.test_inner_steps=3"],
        ["algo=protonet"],
        ["algo=metaoptnet_ridge"],
        ["algo=baselinepp"],
        ["algo=snail"],
        ["algo=metalstm", "algo.updates=2"],
        ["algo=emaml", "algo.particles=2"],
    ],
    ids=lambda o: "-".join(x.split("=")[1] for x in o[:2]),
)
def test_the_test_pass_returns_the_logits_predict_gives(overrides, omniglot_root):
    """The calibration report reads the query logits that the test pass (`evaluate`) returns;
    they equal what `predict` gives for each episode on its own (the path `metalearn eval
    episode.support=...` takes), labels included."""
    from metalearn.build import build_run

    config = ["data=omniglot", f"data.root={omniglot_root}", "debug=smoke", *overrides]
    run = build_run(compose_config(config))
    run.model.train(False)
    fast = predictions(run, "test", 3)
    slow = predicted(run, "test", 3)
    assert fast[0].shape == slow[0].shape == (3, 5 * run.test_shape[2], 5)
    assert torch.equal(fast[1], slow[1])
    torch.testing.assert_close(fast[0], slow[0], atol=1e-4, rtol=1e-4)
