"""The one place config names become objects: typed, validated configs and the run they describe."""

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metalearn.algos import ALGOS
from metalearn.algos.objectives import metric_name
from metalearn.checks import check_combination, check_tasks, check_train_shape
from metalearn.config import as_dict, check_seed, from_dict
from metalearn.data.gp import GPConfig, GPTasks
from metalearn.data.images.cifar import PREPROCESS as CIFAR_PREPROCESS
from metalearn.data.images.cifar import CIFARFSConfig, FC100Config, cifarfs_tasks, fc100_tasks
from metalearn.data.images.completion import CompletionConfig, CompletionTasks
from metalearn.data.images.cub import PREPROCESS as CUB_PREPROCESS
from metalearn.data.images.cub import CUBConfig, cub_tasks
from metalearn.data.images.miniimagenet import PREPROCESS as MINIIMAGENET_PREPROCESS
from metalearn.data.images.miniimagenet import MiniImageNetConfig, miniimagenet_tasks
from metalearn.data.images.omniglot import PREPROCESS as OMNIGLOT_PREPROCESS
from metalearn.data.images.omniglot import OmniglotConfig, omniglot_tasks
from metalearn.data.images.tieredimagenet import PREPROCESS as TIEREDIMAGENET_PREPROCESS
from metalearn.data.images.tieredimagenet import TieredImageNetConfig, tieredimagenet_tasks
from metalearn.data.optimizees import DigitsMLPConfig, DigitsTasks, QuadraticConfig, QuadraticTasks
from metalearn.data.sinusoid import SinusoidConfig, SinusoidTasks
from metalearn.envs.bandits import BanditConfig, BanditTasks, DependentBanditConfig
from metalearn.envs.causal import CausalConfig, CausalTasks
from metalearn.envs.cheetah import CheetahConfig, CheetahTasks
from metalearn.envs.harlow import HarlowConfig, HarlowTasks
from metalearn.envs.navigation import NavigationConfig, NavigationTasks
from metalearn.envs.tabular_mdp import MDPTasks, TabularMDPConfig
from metalearn.errors import CheckpointError, ConfigError
from metalearn.evaluate import EvalConfig
from metalearn.hardware import HardwareConfig, select_device, task_batching, test_batchings
from metalearn.models import MODELS
from metalearn.records import checkpoint
from metalearn.records.logger import LoggerConfig
from metalearn.run import Run, RunConfig
from metalearn.train.config import OnlineConfig, TrainerConfig

# name -> (config class, function(config, device) -> task source)
DATASETS: dict[str, tuple[type, Any]] = {
    "omniglot": (OmniglotConfig, omniglot_tasks),
    "sinusoid": (SinusoidConfig, SinusoidTasks),
    "gp": (GPConfig, GPTasks),  # Gaussian-process functions with their exact posterior
    "omniglot_completion": (CompletionConfig, CompletionTasks),  # images as functions
    "miniimagenet": (MiniImageNetConfig, miniimagenet_tasks),
    "tieredimagenet": (TieredImageNetConfig, tieredimagenet_tasks),
    "cifarfs": (CIFARFSConfig, cifarfs_tasks),
    "fc100": (FC100Config, fc100_tasks),
    "cub": (CUBConfig, cub_tasks),
    "bandit": (BanditConfig, BanditTasks),
    "dependent_bandit": (DependentBanditConfig, BanditTasks),
    "harlow": (HarlowConfig, HarlowTasks),
    "tabular_mdp": (TabularMDPConfig, MDPTasks),
    "causal": (CausalConfig, CausalTasks),  # causal-reasoning quizzes (Dasgupta et al. 2019)
    "navigation": (NavigationConfig, NavigationTasks),  # MAML's 2-D point robot
    "cheetah_velocity": (CheetahConfig, CheetahTasks),  # HalfCheetah-v5 (the [mujoco] extra)
    "cheetah_direction": (CheetahConfig, CheetahTasks),
    "quadratic": (QuadraticConfig, QuadraticTasks),  # optimizees for learned optimisers
    "digits_mlp": (DigitsMLPConfig, DigitsTasks),
}
# How a user's own images become model inputs, exactly as the cached training data was made.
PREPROCESS = {
    "omniglot": OMNIGLOT_PREPROCESS,
    "miniimagenet": MINIIMAGENET_PREPROCESS,
    "tieredimagenet": TIEREDIMAGENET_PREPROCESS,
    "cifarfs": CIFAR_PREPROCESS,
    "fc100": CIFAR_PREPROCESS,
    "cub": CUB_PREPROCESS,
}
# trainer.name -> its config: the default loop (train/loop.py) or online meta-learning (FTML)
TRAINERS: dict[str, type] = {"default": TrainerConfig, "online": OnlineConfig}
SECTIONS = ("algo", "data", "model", "hardware", "logger", "trainer", "eval", "seed")


def _pick(registry: dict, section: str, raw: dict) -> tuple:
    name = raw.get("name")
    if name not in registry:
        raise ConfigError(f"unknown {section} {name!r}; valid names: {', '.join(sorted(registry))}")
    return registry[name]


def parse_config(raw: dict) -> RunConfig:
    """Validate a plain resolved config dict into a RunConfig (errors name the bad key)."""
    missing = [s for s in SECTIONS if s not in raw]
    if missing:
        raise ConfigError(f"config lacks section(s) {', '.join(missing)}")
    extra = sorted(set(raw) - set(SECTIONS) - {"checkpoint", "episode"})
    if extra:
        raise ConfigError(
            f"unknown top-level key(s) {', '.join(extra)}; valid: {', '.join(SECTIONS)}"
        )
    check_seed(raw["seed"], "seed")
    trainer = {"name": "default", **raw["trainer"]}  # configs saved before trainer had names
    return RunConfig(
        algo=from_dict(_pick(ALGOS, "algo", raw["algo"])[0], raw["algo"], "algo"),
        data=from_dict(_pick(DATASETS, "data", raw["data"])[0], raw["data"], "data"),
        model=from_dict(_pick(MODELS, "model", raw["model"])[0], raw["model"], "model"),
        hardware=from_dict(HardwareConfig, raw["hardware"], "hardware"),
        logger=from_dict(LoggerConfig, raw["logger"], "logger"),
        trainer=from_dict(_pick(TRAINERS, "trainer", trainer), trainer, "trainer"),
        eval=from_dict(EvalConfig, raw["eval"], "eval"),
        seed=raw["seed"],
    )


def build_run(raw: dict, *, training: bool = True, tasks: Any = None) -> Run:
    """Parse the config, then build data, model and algorithm; check task shapes before training.

    `training=False` (re-testing a checkpoint) skips what only meta-training uses (a teacher);
    `tasks` (a checkpoint's StoredTasks) stands in for the data set, which is then not read."""
    config = parse_config(raw)
    data, algo_cfg = config.data, config.algo
    algo_cls = ALGOS[algo_cfg.name][1]
    train_shape, test_shape = _task_shapes(config)
    device = select_device(config.hardware)
    model_cls = MODELS[config.model.name][1]
    batching = task_batching(
        config.hardware,
        device,
        model_cls.convolutional,
        examples_per_task=train_shape[0] * (train_shape[1] + train_shape[2]),
    )
    shapes = (train_shape, test_shape)
    check_combination(config, algo_cls, model_cls, shapes, batching)
    torch.manual_seed(config.seed)
    if tasks is None:
        tasks = DATASETS[data.name][1](data, device)
        check_tasks(config, algo_cls, tasks, train_shape, test_shape)
    # a head: one output per training way (classification) or action (meta-RL), or one value
    out_features = train_shape[0] if tasks.kind in ("classification", "rl") else 1
    model = model_cls(
        config.model,
        tasks.in_shape,
        out_features if algo_cls.needs_head else 0,
        channels_last=config.hardware.channels_last,
        fused_batchnorm=fused_batchnorm_is_exact(algo_cls, batching),
        running_stats=algo_cfg.running_batchnorm(),
    ).to(device)
    extra = _learner_needs(algo_cls, algo_cfg, tasks, train_shape, device, training)
    algo = algo_cls(algo_cfg, model, tasks.kind, batching, **extra)
    batching = getattr(algo, "task_batching", batching)  # what it does (VMAML: always a loop)
    test_batching = batching
    if algo_cls.batches_tasks:  # test tasks are often larger: `auto` decides for them apart
        hardware, convolutional = config.hardware, model.convolutional
        batchings = test_batchings(hardware, device, convolutional, test_shape)
        algo.adapt_batching, algo.test_batching = batchings
        test_batching = algo.test_batching
    if config.hardware.compile:
        compile_training(algo, batching)
    return Run(
        config=config,
        config_dict=as_dict(config),
        device=device,
        tasks=tasks,
        model=model,
        algo=algo,
        task_batching=batching,
        test_batching=test_batching,
        train_shape=train_shape,
        test_shape=test_shape,
        test_steps=_test_steps(config, algo_cls),
        metric=algo_cls.metric or metric_name(tasks.kind),
        preprocess=_preprocess(data),
        name=f"{_loop_name(config)}{algo_cfg.name}-{data.name}-{_task_name(data)}-seed{config.seed}",
    )


def _learner_needs(
    algo_cls: type, algo_cfg: Any, tasks: Any, train_shape: tuple, device, training: bool
) -> dict[str, Any]:
    """The constructor arguments a learner declares it needs beyond config, model and kind."""
    extra: dict[str, Any] = {}
    if algo_cls.needs_ways:  # sequence learners: the label inputs' width
        extra["ways"] = train_shape[0]
    if algo_cls.optimizees:  # the unroll's length
        extra["steps"] = tasks.cfg.steps
    if algo_cls.needs_train_classes:  # pre-training over all train classes
        classification = tasks.kind == "classification"  # else the algorithm says why not
        extra["train_classes"] = tasks.classes("train") if classification else 0
        if algo_cfg.distill_from and classification and training:
            extra["teacher"] = _teacher(algo_cfg.distill_from, tasks, device)
    return extra


def _task_shapes(config: RunConfig) -> tuple[tuple, tuple]:
    """(ways, shots, query) of training and of test tasks; meta-RL: (actions, pulls, 0)."""
    data, algo_cfg = config.data, config.algo
    if data.task_kind == "rl":
        shape = (data.actions, data.steps, 0)
        return shape, shape
    if data.task_kind == "optimization":  # one problem of data.steps optimiser steps
        shape = (1, data.steps, 0)
        return shape, shape
    # (pre-training baselines have no training episodes: their shape is the test one)
    ways, shots, query = check_train_shape(algo_cfg.train_shape(), data.task_kind)
    train_shape = (ways or data.ways, shots or data.shots, query or data.query)
    return train_shape, (data.ways, data.shots, config.eval.query or data.query)


def _test_steps(config: RunConfig, algo_cls: type) -> int:
    """Inner steps at validation and test: an inner loop's, or a learned optimiser's unroll."""
    if algo_cls.inner_loop:
        return config.algo.test_inner_steps
    return config.data.steps if config.data.task_kind == "optimization" else 0


def _loop_name(config: RunConfig) -> str:
    """The run name's prefix: none for the default loop, 'online-' for FTML's stream."""
    return "" if config.trainer.name == "default" else f"{config.trainer.name}-"


def _task_name(data: Any) -> str:
    """e.g. 5w1s; 5arms10pulls; 100steps; -0.5to0.5goals100horizon (a range: low 'to' high)."""
    if data.task_kind in ("rl", "optimization"):

        def value(v: Any) -> str:
            return "to".join(map(str, v)) if isinstance(v, list | tuple) else str(v)

        return "".join(f"{value(v)}{k}" for k, v in data.describe().items())
    return f"{data.ways}w{data.shots}s"


def _teacher(path: str, tasks: Any, device: torch.device) -> nn.Module:
    """RFS-distill's teacher: the embedding and classifier of an earlier pre-training run."""
    state = checkpoint.load(Path(path))
    config = parse_config(state["config"])
    algo_cls = ALGOS[config.algo.name][1]
    if not algo_cls.pretrains:
        raise CheckpointError(
            f"algo.distill_from={path} holds a {config.algo.name} run; a teacher must come "
            f"from a pre-training run (algo=baseline, baselinepp or rfs)"
        )
    model = MODELS[config.model.name][1](config.model, tasks.in_shape, 0, fused_batchnorm=True)
    model.to(device)
    teacher_cfg = dataclasses.replace(config.algo, distill_from=None)
    teacher = algo_cls(teacher_cfg, model, tasks.kind, "loop", train_classes=tasks.classes("train"))
    try:
        teacher.load_state_dict(state["algo_state"])
    except (RuntimeError, KeyError) as error:
        raise CheckpointError(
            f"the teacher {path} does not fit this data set's classes ({error}); distil from a "
            f"run on the same data set and split"
        ) from error
    return nn.Sequential(model, teacher.classifier).eval().requires_grad_(False)


def compile_training(algo: Any, batching: str) -> None:
    """hardware.compile=true: torch.compile what meta-training runs; evaluation stays eager (many
    step counts and shapes). With the per-task loop, one task's graph is compiled once, whatever
    the meta-batch size, and called for every task; otherwise the objective is one graph."""
    if algo.batches_tasks and batching == "loop":
        algo.compile_tasks = True
    else:
        setattr(algo, algo.compiled, torch.compile(getattr(algo, algo.compiled)))


def fused_batchnorm_is_exact(algo_cls: type, batching: str) -> bool:
    """The native BatchNorm kernel is exact unless second-order gradients go through it under
    vmap (the torch 2.14 trap described in TaskBatchNorm2d); it is about 1.7x faster on CPU."""
    vmapped = batching == "vmap" or algo_cls.vmaps_within_tasks
    return not (algo_cls.differentiates_inner_loop and vmapped)


def _preprocess(data: Any) -> dict | None:
    """How user images become inputs for this data set (None: not an image data set)."""
    if data.name not in PREPROCESS:
        return None
    return {**PREPROCESS[data.name], "size": data.image_size}
