"""Every config group, experiment and (algo, data) pair composes, validates and builds."""

import dataclasses
import importlib.util
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, PROCEDURAL, REPO, compose_config
from omegaconf import OmegaConf

from metalearn.algos import ALGOS as REGISTRY
from metalearn.build import build_run, parse_config
from metalearn.config import as_dict, from_dict
from metalearn.errors import ConfigError

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
ALGOS = sorted(p.stem for p in (CONFIGS / "algo").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml"))
# A tiny run: a few iterations and episodes, no W&B, one CPU thread.
SMOKE = ["debug=smoke", "hardware.threads=1"]
# Pairs that cannot work, and the words the error must contain.
# from the registry and what each learner declares: a new learner needs no line here
BILEVEL = sorted(name for name, (_, cls) in REGISTRY.items() if cls.family == "bilevel")
PRETRAINING = sorted(name for name, (_, cls) in REGISTRY.items() if cls.pretrains)
# metric learners, and the black-box sequence learners that classify too
METRIC = sorted(
    name
    for name, (_, cls) in REGISTRY.items()
    if cls.family in ("metric", "blackbox") and not cls.reinforcement
)
REINFORCEMENT = sorted(name for name, (_, cls) in REGISTRY.items() if cls.reinforcement)
OPTIMIZEES = sorted(name for name, (_, cls) in REGISTRY.items() if cls.optimizees)
UPDATE_RULES = sorted(  # learned update rules on tasks (Meta-LSTM)
    name for name, (_, cls) in REGISTRY.items() if cls.family == "optimizers" and not cls.optimizees
)
PROCESSES = sorted(name for name, (_, cls) in REGISTRY.items() if cls.family == "processes")
IMPOSSIBLE = {
    (name, data): [name, "classification", "omniglot"]
    for name in METRIC + PRETRAINING + UPDATE_RULES
    for data in ("sinusoid", "gp", "omniglot_completion")
}
# data=gp draws U{0..50} context points: an inner loop needs at least one, of a fixed number
IMPOSSIBLE |= {
    (name, data): [name, "at least one", "data.min_shots"]
    for name in BILEVEL
    for data in ("gp", "omniglot_completion")
}
# meta-RL: its learners only on environments, and only they there; RL² on the discrete-action
# families, the gradient-based learners (a Gaussian policy) on continuous ones
META_RL_DATA = ["bandit", "dependent_bandit", "harlow", "tabular_mdp", "causal", "navigation"]
MUJOCO_DATA = ["cheetah_velocity", "cheetah_direction"]  # need the [mujoco] extra
META_RL_DATA += MUJOCO_DATA
CONTINUOUS_DATA = ["navigation", *MUJOCO_DATA]
SUPERVISED_DATA = ["cifarfs", "cub", "fc100", "miniimagenet", "omniglot", "sinusoid"]
SUPERVISED_DATA += ["tieredimagenet", "gp", "omniglot_completion"]
# neural processes predict real values: regression data only
IMPOSSIBLE |= {
    (name, data): [name, "regression", "data=gp or sinusoid"]
    for name in PROCESSES
    for data in SUPERVISED_DATA + META_RL_DATA
    if data not in ("sinusoid", "gp", "omniglot_completion")
}
# ConvCNP puts x itself on its grid: sinusoid's default network (MAML's MLP) does not fit
IMPOSSIBLE[("convcnp", "sinusoid")] = ["convcnp", "model=identity"]
IMPOSSIBLE |= {
    (name, data): [name, "supervised", data] for name in REINFORCEMENT for data in SUPERVISED_DATA
}
IMPOSSIBLE |= {
    (name, data): [name, "meta-RL", "rl2"]
    for name in BILEVEL + METRIC + PRETRAINING + UPDATE_RULES
    for data in META_RL_DATA
}
# each meta-RL learner's policy model, which the other kind of action space's default is not
IMPOSSIBLE |= {
    (name, data): [name, f"model={REGISTRY[name][1].policy_model}"]
    for name in REINFORCEMENT
    for data in META_RL_DATA
    if REGISTRY[name][1].continuous_actions != (data in CONTINUOUS_DATA)
}
# learned optimisers train on optimizee problems, and only they do
OPTIMIZEE_DATA = ["digits_mlp", "quadratic"]
IMPOSSIBLE |= {
    (name, data): [name, "quadratic or digits_mlp"]
    for name in OPTIMIZEES
    for data in SUPERVISED_DATA + META_RL_DATA
}
IMPOSSIBLE |= {
    (name, data): [data, "algo=l2o"]
    for name in sorted(set(REGISTRY) - set(OPTIMIZEES))
    for data in OPTIMIZEE_DATA
}
# The groups `metalearn train --help` must list, with their options.
GROUPS = {
    "algo": sorted(REGISTRY),
    "data": sorted(SUPERVISED_DATA + META_RL_DATA + OPTIMIZEE_DATA),
    "model": ["conv4", "conv4_32", "gaussian_mlp", "gaussian_mlp_maml", "identity"]
    + ["lstm_optimizer", "mlp", "mlp_optimizer", "recurrent", "resnet12"],
    "hardware": ["auto", "cpu", "cuda"],
    "logger": ["none", "wandb"],
    "debug": ["smoke"],
    "experiment": EXPERIMENTS,
}


def load_yaml(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path))


def test_the_config_folders_hold_what_the_tests_expect():
    assert ALGOS == GROUPS["algo"]
    assert DATASETS == sorted(GROUPS["data"])
    assert len(EXPERIMENTS) >= 10


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds(experiment: str, data_root):
    preset = load_yaml(CONFIGS / "experiment" / f"{experiment}.yaml")
    data_name = next(e["override /data"] for e in preset["defaults"] if "override /data" in e)
    if data_name in MUJOCO_DATA and importlib.util.find_spec("mujoco") is None:
        pytest.skip("MuJoCo is an optional extra: pip install -e '.[mujoco]'")
    root = data_root(data_name)
    run = build_run(compose_config([f"experiment={experiment}", *SMOKE, f"data.root={root}"]))
    built = run.config_dict
    if len(run.tasks.in_shape) == 3:  # images, loaded at the protocol's own size
        size = run.config.data.image_size
        assert run.tasks.in_shape[1:] == (size, size), experiment
    smoke = load_yaml(CONFIGS / "debug" / "smoke.yaml")
    for entry in preset.pop("defaults"):  # e.g. {"override /algo": "maml"}
        ((key, choice),) = entry.items()
        group = key.removeprefix("override /")
        # the option's own name (model=conv4_32 is conv4 with 32 filters)
        assert built[group]["name"] == load_yaml(CONFIGS / group / f"{choice}.yaml")["name"]
    # The preset's values beat the group defaults and tuned/; debug=smoke beats the preset.
    for section, values in preset.items():
        for key, value in values.items():
            expected = smoke.get(section, {}).get(key, value)
            assert built[section][key] == expected, f"{experiment}: {section}.{key}"
    assert run.config.trainer.iterations == smoke["trainer"]["iterations"]
    data, algo = preset.get("data", {}), preset.get("algo", {})
    if run.metric == "loglik":  # neural-process presets keep the data set's own counts
        data = {"shots": run.config.data.shots, "query": run.config.data.query} | data
    if run.metric in ("reward", "return"):  # meta-RL: (actions, steps of a trial, 0)
        shape = (run.config.data.actions, run.config.data.steps, 0)
        assert run.train_shape == run.test_shape == shape
        return
    if run.metric == "final_loss":  # learned optimisers: one problem, an unroll of data.steps
        assert run.train_shape == run.test_shape == (1, run.config.data.steps, 0)
        return
    train_ways = algo.get("train_ways") or data.get("ways", 1)
    train_query = algo.get("train_query") or data["query"]
    train_shots = algo.get("train_shots") or data["shots"]
    assert run.train_shape == (train_ways, train_shots, train_query)
    test_query = preset.get("eval", {}).get("query") or data["query"]  # eval.query: the test's
    assert run.test_shape == (data.get("ways", 1), data["shots"], test_query)


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("algo", ALGOS)
def test_every_algo_data_pair_builds_or_says_why_not(algo: str, data: str, data_root):
    if data in MUJOCO_DATA and importlib.util.find_spec("mujoco") is None:
        pytest.skip("MuJoCo is an optional extra: pip install -e '.[mujoco]'")
    overrides = [f"algo={algo}", f"data={data}", *SMOKE]
    if data not in PROCEDURAL:
        overrides.append(f"data.root={data_root(data)}")
    if data not in ("omniglot", "omniglot_completion", *PROCEDURAL):
        overrides.append("data.query=5")  # the fixtures have 21 images per class
    raw = compose_config(overrides)
    if (algo, data) in IMPOSSIBLE:
        with pytest.raises(ConfigError) as error:
            build_run(raw)
        for word in IMPOSSIBLE[algo, data]:
            assert word in str(error.value)
        return
    run = build_run(raw)
    assert (run.config.algo.name, run.config.data.name) == (algo, data)
    # Each data set gets its usual network unless model=<name> says otherwise.
    regression = data in ("sinusoid", "gp", "omniglot_completion")
    kind = "rl" if data in META_RL_DATA else "regression" if regression else "images"
    kind = "optimization" if data in OPTIMIZEE_DATA else kind
    models = {"rl": "recurrent", "regression": "mlp", "images": "conv4"}
    models |= {"rl": "gaussian_mlp"} if data in CONTINUOUS_DATA else {}
    models |= {"optimization": "lstm_optimizer"} | (
        {"regression": "identity"} if data in ("gp", "omniglot_completion") else {}
    )
    assert run.config.model.name == models[kind]
    metrics = {"rl": "reward", "regression": "mse", "images": "accuracy"}
    metrics |= {"optimization": "final_loss"} | (
        {"regression": "loglik"} if algo in PROCESSES else {}
    )
    metrics |= {"rl": "return"} if data in CONTINUOUS_DATA else {}  # after the inner steps
    assert run.metric == metrics[kind]
    assert run.tasks.kind == {"images": "classification"}.get(kind, kind)
    assert run.name.startswith(f"{algo}-{data}-")
    if algo == "fomaml":
        assert run.config.algo.first_order


def test_the_default_config_is_maml_on_sinusoid_as_in_the_paper():
    raw = compose_config([])
    assert raw["algo"]["name"] == "maml" and raw["algo"]["first_order"] is False
    assert raw["data"]["name"] == "sinusoid"
    assert raw["model"] == {"name": "mlp", "hidden_sizes": [40, 40]}
    assert raw["algo"]["inner_lr"] == 0.01
    assert raw["algo"]["inner_steps"] == 1
    assert raw["trainer"]["meta_batch_size"] == 25
    assert raw["data"]["amplitude"] == [0.1, 5.0]
    assert raw["data"]["x_range"] == [-5.0, 5.0]
    assert raw["hardware"]["device"] == "cpu"


def test_algo_and_data_choices_pick_their_model_and_tuned_values():
    raw = compose_config(["algo=maml", "data=omniglot"])
    assert raw["model"]["name"] == "conv4"
    assert raw["algo"]["inner_lr"] == 0.4
    raw = compose_config(["algo=fomaml"])  # tuned/fomaml_sinusoid
    assert raw["algo"]["first_order"] is True and raw["algo"]["inner_lr"] == 0.01
    raw = compose_config(["algo=protonet", "data=omniglot"])  # tuned/protonet_omniglot
    assert (raw["algo"]["train_ways"], raw["trainer"]["meta_batch_size"]) == (60, 1)
    assert compose_config(["data=omniglot", "model=mlp"])["model"]["name"] == "mlp"


def test_experiment_values_beat_tuned_ones_and_the_command_line_beats_both():
    tuned = load_yaml(CONFIGS / "tuned" / "maml_omniglot.yaml")["algo"]
    raw = compose_config(["experiment=maml_omniglot_20w1s"])
    assert tuned["inner_lr"] == 0.4 and raw["algo"]["inner_lr"] == 0.1
    assert tuned["inner_steps"] == 1 and raw["algo"]["inner_steps"] == 5
    raw = compose_config(["experiment=maml_omniglot_20w1s", "algo.inner_lr=0.2"])
    assert raw["algo"]["inner_lr"] == 0.2


def is_typed(value, hint) -> bool:
    """Whether `value` is exactly of type `hint` (no int where a float is declared)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(is_typed(value, a) for a in args)
    if origin is list:
        return type(value) is list and all(is_typed(v, args[0]) for v in value)
    return hint is typing.Any or type(value) is hint


ROUND_TRIP = [[], *([f"experiment={e}"] for e in EXPERIMENTS)]
ROUND_TRIP += [
    [f"algo={a}", f"data={d}"] for a in ALGOS for d in DATASETS if (a, d) not in IMPOSSIBLE
]


@pytest.mark.parametrize("overrides", ROUND_TRIP, ids=lambda o: " ".join(o) or "default")
def test_every_value_of_the_saved_config_survives_parse_config_typed(overrides, tmp_path):
    # What Hydra writes to <run dir>/.hydra/config.yaml, read back as the CLI would.
    path = tmp_path / "config.yaml"
    OmegaConf.save(OmegaConf.create(compose_config(overrides)), path)
    saved = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    parsed = parse_config(saved)
    for section, values in saved.items():
        if not isinstance(values, dict):
            assert getattr(parsed, section) == values
            continue
        config = getattr(parsed, section)
        hints = typing.get_type_hints(type(config))
        for key, value in values.items():
            got = getattr(config, key)
            if value is None and key.startswith(("test_inner_", "test_updates")):  # as training
                assert got == getattr(config, key.removeprefix("test_"))
                continue
            assert got == value, f"{section}.{key}"
            assert is_typed(got, hints[key]), f"{section}.{key}: {got!r} is not {hints[key]}"
    # A checkpoint stores as_dict(config); reading it back must give the same config.
    assert parse_config(as_dict(parsed)) == parsed
    assert dataclasses.is_dataclass(parsed.trainer)


def test_integer_learning_rates_become_floats():
    parsed = parse_config(compose_config(["algo.inner_lr=1", "algo.outer_lr=1"]))
    assert type(parsed.algo.inner_lr) is float and type(parsed.algo.outer_lr) is float


@pytest.mark.parametrize("command", ["train", "eval"])
def test_help_lists_every_group_and_its_options(command: str):
    out = subprocess.run(
        [sys.executable, "-m", "metalearn.cli", command, "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    for group, options in GROUPS.items():
        assert f"{group}: {', '.join(options)}" in lines, f"{group} not listed as expected"
    assert f"metalearn {command}" in out.stdout


def test_auto_task_batching_loops_only_over_large_conv_tasks_on_cpu():
    from metalearn.hardware import LOOP_ABOVE_EXAMPLES, HardwareConfig, task_batching

    auto, cpu, large = HardwareConfig(), torch.device("cpu"), LOOP_ABOVE_EXAMPLES + 1
    assert task_batching(auto, cpu, True, large) == "loop"  # 5-way 1-shot, 15 queries: 80
    assert task_batching(auto, cpu, True, LOOP_ABOVE_EXAMPLES) == "vmap"  # MAML's 1 query: 10
    assert task_batching(auto, cpu, True, 10) == "vmap"
    assert task_batching(auto, cpu, False, large) == "vmap"  # MLPs
    assert task_batching(auto, torch.device("cuda"), True, large) == "vmap"
    assert task_batching(HardwareConfig(task_batching="loop"), cpu, False, 2) == "loop"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_algo_yaml_holds_its_dataclass_defaults_and_nothing_else(name: str):
    """The dataclass is the one source of an algorithm's defaults: its YAML lists every key (so
    each can be overridden on the command line) with the value the dataclass gives, or, for the
    other names a class serves (fomaml, baselinepp, ...), the changes its VARIANTS declare."""
    config_cls = REGISTRY[name][0]
    raw = load_yaml(CONFIGS / "algo" / f"{name}.yaml")
    assert set(raw) == {f.name for f in dataclasses.fields(config_cls)}
    declared = config_cls.VARIANTS.get(name, {})
    assert from_dict(config_cls, raw, "algo") == config_cls(**{"name": name, **declared})


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_learners_metric_says_how_it_is_logged_and_which_way_is_better(name: str):
    from metalearn.algos.objectives import METRICS

    cls = REGISTRY[name][1]
    assert cls.metric is None or cls.metric in METRICS
