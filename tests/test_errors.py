"""Bad input fails before training starts, with a message that says what is wrong and the fix."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config, real_data_root

from metalearn import hardware
from metalearn.algos import ALGOS
from metalearn.build import build_run
from metalearn.cli import train
from metalearn.errors import CheckpointError, ConfigError, DataError, TrainingError
from metalearn.evaluate import run_episodes
from metalearn.reevaluate import evaluate_checkpoint

BASE = ["debug=smoke", "hardware.threads=1"]
VALID_NAMES = {
    "algo": sorted(ALGOS),  # every registered learner (a new one needs no line here)
    "data": sorted(
        ["cifarfs", "cub", "fc100", "miniimagenet", "omniglot", "sinusoid", "tieredimagenet"]
        + ["bandit", "dependent_bandit", "harlow", "tabular_mdp", "causal", "quadratic"]
        + ["digits_mlp"]
        + ["gp", "omniglot_completion", "navigation", "cheetah_velocity", "cheetah_direction"]
    ),
    "model": ["conv4", "gaussian_mlp", "identity", "lstm_optimizer", "mlp", "mlp_optimizer"]
    + ["recurrent", "resnet12"],
}
# Sinusoid MAML that validates and checkpoints after every iteration, on tiny episodes.
SINUSOID_EVERY_STEP = [
    *BASE,
    "trainer.eval_every=1",
    "eval.episodes=2",
    "eval.val_episodes=2",
    "eval.shots=[]",
    "eval.steps=[]",
]


def build(overrides: list[str]):
    return build_run(compose_config([*BASE, *overrides]))


@pytest.fixture
def omniglot(omniglot_root: Path) -> list[str]:
    return ["data=omniglot", f"data.root={omniglot_root}"]


def finite_weights(path: Path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=False)
    return all(torch.isfinite(t).all() for t in state["algo_state"]["model"].values())


# --- unknown names, keys and types -------------------------------------------------------------


@pytest.mark.parametrize("group", sorted(VALID_NAMES))
def test_an_unknown_group_option_lists_the_available_ones(group: str):
    with pytest.raises(Exception) as error:  # Hydra's MissingConfigException
        compose_config([f"{group}=nope"])
    message = str(error.value)
    assert f"{group}/nope" in message
    for name in VALID_NAMES[group]:
        assert name in message


@pytest.mark.parametrize("section", sorted(VALID_NAMES))
def test_an_unknown_name_key_lists_the_valid_names(section: str):
    with pytest.raises(ConfigError) as error:
        build([f"{section}.name=nope"])
    assert f"unknown {section} 'nope'" in str(error.value)
    assert ", ".join(VALID_NAMES[section]) in str(error.value)


@pytest.mark.parametrize(
    ("override", "named", "valid"),
    [
        ("+algo.foo=1", "algo.foo", ["inner_lr", "outer_lr", "inner_steps"]),
        ("+data.colour=red", "data.colour", ["amplitude", "shots", "query"]),
        ("+trainer.epochs=3", "trainer.epochs", ["iterations", "meta_batch_size"]),
        ("+learning_rate=0.1", "learning_rate", ["algo", "trainer"]),
    ],
)
def test_an_unknown_key_is_named_with_the_valid_keys(override: str, named: str, valid: list):
    with pytest.raises(ConfigError) as error:
        build([override])
    assert named in str(error.value)
    for key in valid:
        assert key in str(error.value)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("data.ways=five", ["data.ways", "int", "five"]),
        ("algo.inner_lr=fast", ["algo.inner_lr", "float", "fast"]),
        ("trainer.resume=maybe", ["trainer.resume", "bool", "maybe"]),
        ("model.hidden_sizes=40", ["model.hidden_sizes", "list", "40"]),
        ("seed=0.5", ["seed", "integer", "0.5"]),
    ],
)
def test_a_value_of_the_wrong_type_is_a_config_error(override: str, words: list[str]):
    with pytest.raises(ConfigError) as error:
        build([override])
    for word in words:
        assert word in str(error.value)


# --- impossible values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "algo.inner_lr=0",
        "algo.outer_lr=-1",
        "algo.test_inner_lr=0",
        "algo.inner_steps=0",
        "eval.episodes=0",
        "eval.val_episodes=-3",
        "trainer.iterations=0",
        "trainer.meta_batch_size=0",
        "data.shots=0",
        "hardware.threads=0",
    ],
)
def test_a_non_positive_value_is_a_config_error_naming_key_and_value(override: str):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as error:
        build([override])
    assert key in str(error.value)
    assert str(float(value)) in str(error.value) or value in str(error.value)


def test_a_non_positive_protonet_learning_rate_is_a_config_error(omniglot):
    with pytest.raises(ConfigError, match=r"algo\.outer_lr .*positive.* -1"):
        build(["algo=protonet", *omniglot, "algo.outer_lr=-1"])


@pytest.mark.parametrize(
    ("overrides", "numbers", "fix"),
    [
        (["data.ways=2000"], ["2000-way", "688"], "data.ways"),
        (["algo=protonet", "algo.train_ways=5000"], ["5000-way", "4112"], "algo.train_ways"),
        (["data.shots=10", "data.query=15"], ["10 + 15 = 25", "20 per class"], "data.shots"),
        (["algo=protonet", "algo.train_query=20"], ["1 + 20 = 21", "20 per class"], "data.query"),
        (["eval.shots=[10]"], ["10 + 15 = 25", "20 per class"], "data.shots"),
    ],
)
def test_tasks_larger_than_the_data_set_are_a_data_error(omniglot, overrides, numbers, fix):
    with pytest.raises(DataError) as error:
        build([*omniglot, *overrides])
    for text in [*numbers, fix]:
        assert text in str(error.value)


def test_a_maml_head_trained_on_other_ways_than_it_is_tested_on_is_a_config_error(omniglot):
    with pytest.raises(ConfigError, match=r"10-way .* 5-way .*algo\.train_ways"):
        build(["algo=maml", *omniglot, "algo.train_ways=10"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="hardware=cpu or auto"):
        build(["hardware=cuda"])


def test_bf16_on_a_cpu_that_would_emulate_it_is_a_config_error(monkeypatch):
    """On a CPU with neither AVX512-BF16 nor AMX (faked here where this one has them) bf16 would
    be slower than fp32: refused at start-up, naming the key and the value to use."""
    if hardware.cpu_has_bf16():
        build(["hardware.precision=bf16"])
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    with pytest.raises(
        ConfigError, match=r"hardware.precision=bf16 .* use hardware.precision=fp32"
    ):
        build(["hardware.precision=bf16"])


def test_a_conv_net_on_vector_inputs_is_a_config_error():
    with pytest.raises(ConfigError) as error:
        build(["data=sinusoid", "model=conv4"])
    assert "conv4" in str(error.value) and "sinusoid" in str(error.value)


def test_an_mlp_on_images_either_works_or_is_refused_at_build_time(omniglot):
    try:
        run = build(["algo=protonet", *omniglot, "model=mlp", "algo.train_ways=5"])
    except ConfigError as error:
        assert "mlp" in str(error)
        return
    batch = run.tasks.sample("train", torch.Generator().manual_seed(0), 1, *run.train_shape)
    loss, _ = run.algo.meta_loss(batch)
    assert torch.isfinite(loss)


# --- missing or corrupt data -------------------------------------------------------------------


def test_missing_omniglot_names_the_archive_and_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataError) as error:
        build(["data=omniglot", f"data.root={root}", "data.download=false"])
    message = str(error.value)
    assert "images_background.zip" in message and "images_evaluation.zip" in message
    assert str(root) in message
    assert "download is disabled" in message and "data.root=" in message


def test_a_truncated_archive_is_a_data_error_naming_the_file(tmp_path, monkeypatch, omniglot_root):
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))  # no cached decode to reuse
    real = omniglot_root / "omniglot"
    (tmp_path / "omniglot").mkdir()
    truncated = tmp_path / "omniglot" / "images_background.zip"
    with (real / "images_background.zip").open("rb") as f:
        truncated.write_bytes(f.read(1000))
    (tmp_path / "omniglot" / "images_evaluation.zip").symlink_to(real / "images_evaluation.zip")
    with pytest.raises(DataError) as error:
        build(["data=omniglot", f"data.root={tmp_path}", "data.download=false"])
    assert str(truncated) in str(error.value)
    assert "truncated or corrupt" in str(error.value)


# --- checkpoints -------------------------------------------------------------------------------


def evaluate(overrides: list[str], run_dir: Path) -> dict:
    composed = compose_config([*overrides, "hardware.threads=1"], "eval")
    return evaluate_checkpoint(composed=composed, overrides=overrides, run_dir=run_dir)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("algo=maml", ["algo=protonet", "algo=maml"]),
        ("model=mlp", ["model=conv4", "model=mlp"]),
        ("algo.name=maml", ["algo=protonet", "algo=maml"]),
    ],
)
def test_evaluating_a_checkpoint_as_another_algo_or_model_is_refused(
    protonet_run_dir, tmp_path, override, words
):
    best = protonet_run_dir / "checkpoints" / "best.pt"
    with pytest.raises(CheckpointError) as error:
        evaluate([f"checkpoint={best}", override], tmp_path)
    assert str(best) in str(error.value)
    for word in words:
        assert word in str(error.value)
    assert not (tmp_path / "results.json").exists()


def test_resuming_a_run_with_another_algorithm_is_refused(protonet_run_dir, tmp_path, omniglot):
    run_dir = tmp_path / "run"
    shutil.copytree(protonet_run_dir, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    before = last.read_bytes()
    run = build(["algo=maml", *omniglot, "trainer.resume=true", "trainer.iterations=4"])
    with pytest.raises(CheckpointError) as error:
        train(run, run_dir)
    assert "algo=protonet" in str(error.value) and "algo=maml" in str(error.value)
    assert str(last) in str(error.value)
    assert last.read_bytes() == before


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"not a checkpoint at all", ["cannot read checkpoint"]),
        ({"weights": torch.zeros(2)}, ["not a metalearn checkpoint"]),
        (None, ["no checkpoint at", "checkpoint=<run dir>/checkpoints/best.pt"]),
    ],
    ids=["garbage", "other-torch-file", "missing"],
)
def test_a_file_that_is_not_a_checkpoint_is_a_checkpoint_error(tmp_path, content, words):
    path = tmp_path / "model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError) as error:
        evaluate([f"checkpoint={path}"], tmp_path / "eval")
    assert str(path) in str(error.value)
    for word in words:
        assert word in str(error.value)


# --- divergence --------------------------------------------------------------------------------


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    # Two healthy iterations (each validated and checkpointed), then resume with an inner step
    # so large that the very next meta-loss is not finite.
    train(build([*SINUSOID_EVERY_STEP, "trainer.iterations=2"]), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    good = last.read_bytes()
    diverging = [*SINUSOID_EVERY_STEP, "trainer.iterations=4", "trainer.resume=true"]
    with pytest.raises(TrainingError) as error:
        train(build([*diverging, "algo.inner_lr=1e20"]), tmp_path)
    message = str(error.value)
    assert "at iteration 3" in message
    assert str(last) in message
    assert "algo.inner_lr" in message and "trainer.resume=true" in message
    assert last.read_bytes() == good
    assert finite_weights(last)
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["progress"]["iteration"] == 2


def test_a_diverging_outer_step_is_caught_within_one_iteration(tmp_path):
    # Step 1 multiplies the weights by ~1e30; the loss at iteration 2 (or the validation after
    # iteration 1) is then infinite. Whatever checkpoint is left must hold finite numbers.
    with pytest.raises(TrainingError, match=r"iteration [12]\b"):
        train(build([*SINUSOID_EVERY_STEP, "trainer.iterations=4", "algo.outer_lr=1e30"]), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    assert not last.is_file() or finite_weights(last)


def test_divergence_before_any_checkpoint_does_not_point_at_a_missing_file(tmp_path):
    with pytest.raises(TrainingError, match="at iteration 1") as error:
        train(build([*SINUSOID_EVERY_STEP, "algo.inner_lr=1e20"]), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    assert last.is_file() or "last.pt" not in str(error.value)


def test_the_checkpoint_kept_after_divergence_validates_to_a_finite_score(tmp_path):
    overrides = [*SINUSOID_EVERY_STEP, "trainer.iterations=4", "algo.outer_lr=1e30"]
    with pytest.raises(TrainingError):
        train(build(overrides), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    if last.is_file():
        run = build(overrides)
        run.load_algo_state(torch.load(last, map_location="cpu", weights_only=False), last)
        ways, shots, query = run.test_shape
        out = run_episodes(run, "val", episodes=2, ways=ways, shots=shots, query=query, steps=[1])
        assert torch.isfinite(out["loss"]).all()


def test_diverging_validation_episodes_warn_and_never_become_the_best(tmp_path):
    """Test-time adaptation can blow up on some episodes while training is healthy (more or
    larger test steps than in training): training goes on, the best checkpoint stays."""
    train(build([*SINUSOID_EVERY_STEP, "trainer.iterations=2"]), tmp_path)
    diverging = [*SINUSOID_EVERY_STEP, "trainer.iterations=4", "trainer.resume=true"]
    with pytest.warns(UserWarning, match="diverged in test-time adaptation.*iteration 2"):
        results = train(build([*diverging, "algo.test_inner_lr=1e20"]), tmp_path)
    assert results["train"]["iterations"] == 4
    assert results["val"]["best_iteration"] in (1, 2)
    assert math.isfinite(results["val"]["mse"]["mean"])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    diverged = [line["step"] for line in lines if "val/diverged" in line]
    assert diverged == [3, 4] and all(
        line["val/diverged"] == 1.0 for line in lines if "val/diverged" in line
    )


# --- the command line --------------------------------------------------------------------------


def cli_cases() -> list:
    train = ["train", "debug=smoke", "hardware.threads=1"]
    cases = [
        pytest.param([*train, "algo.inner_lr=-1", "logger=none"], "algo.inner_lr", id="config"),
        pytest.param(["eval", "checkpoint=no/such.pt"], "no checkpoint at", id="checkpoint"),
    ]
    root = real_data_root()
    if root is not None:
        data = ["data=omniglot", f"data.root={root}", "data.ways=2000"]
        cases.append(pytest.param([*train, *data], "2000-way", id="data"))
    return cases


@pytest.mark.parametrize(("args", "words"), cli_cases())
def test_the_cli_prints_one_error_line_and_exits_with_status_1(tmp_path, args, words):
    out = subprocess.run(
        [sys.executable, "-m", "metalearn.cli", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    assert words in lines[0]
    assert "Traceback" not in out.stderr + out.stdout
