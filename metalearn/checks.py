"""Start-up checks of a parsed config, before any data is read or any step is taken:
settings that contradict each other, and task shapes that a data set cannot fill. Each error
names the key and what to use instead."""

from typing import Any

from metalearn.data.gp import GPConfig
from metalearn.data.images.completion import CompletionConfig
from metalearn.errors import ConfigError, DataError
from metalearn.run import RunConfig
from metalearn.train.config import OnlineConfig

# what the meta-RL learners act on (a reinforcement learner with the wrong data set reads it)
META_RL_PAIRS = (
    "pair algo=rl2 (discrete actions) with data=bandit, dependent_bandit, harlow or "
    "tabular_mdp, and algo=maml_trpo, emaml_trpo or promp (continuous actions) with "
    "data=navigation, cheetah_velocity or cheetah_direction"
)


def check_actions(config: RunConfig, algo_cls: type, tasks: Any) -> None:
    """A meta-RL learner acts in the task family's kind of action space: RL²'s softmax over
    discrete actions, or a Gaussian policy's continuous ones."""
    if not algo_cls.reinforcement or algo_cls.continuous_actions == tasks.continuous_actions:
        return
    kinds = {True: "continuous", False: "discrete"}
    raise ConfigError(
        f"algo={config.algo.name} takes {kinds[algo_cls.continuous_actions]} actions and "
        f"data={config.data.name} has {kinds[tasks.continuous_actions]} ones; {META_RL_PAIRS}"
    )


def check_tasks(
    config: RunConfig, algo_cls: type, tasks: Any, train_shape: tuple, test_shape: tuple
) -> None:
    """Every split holds enough classes and examples for its tasks, and a meta-RL learner acts
    in the task family's kind of action space, before any training."""
    check_actions(config, algo_cls, tasks)
    try:
        tasks.check("train", *train_shape)
    except DataError as error:
        advice = config.algo.shape_advice(str(error))
        if not advice:
            raise
        raise DataError(advice) from error
    for split in ("val", "test"):
        for shots in {test_shape[1], *config.eval.shots}:
            tasks.check(split, test_shape[0], shots, test_shape[2])


def check_train_shape(shape: tuple, kind: str) -> tuple:
    """The config's training (ways, shots, query): each null, for the data set's own, or a count
    that fits the task kind; 0 must not fall back to the default."""
    ways, shots, query = shape
    if kind == "regression" and ways not in (None, 1):
        raise ConfigError(
            f"regression tasks have one output: algo.train_ways must be 1 (or null), got {ways}"
        )
    if kind == "classification" and ways is not None and ways < 2:
        raise ConfigError(f"algo.train_ways must be >= 2 (a task tells classes apart), got {ways}")
    for key, value in (("train_shots", shots), ("train_query", query)):
        if value is not None and value < 1:
            raise ConfigError(f"algo.{key} must be positive, got {value}")
    return shape


def check_combination(
    config: RunConfig,
    algo_cls: type,
    model_cls: type,
    shapes: tuple[tuple, tuple],
    batching: str,
) -> None:
    """Settings that contradict each other, refused before any data is loaded; `shapes`: the
    (ways, shots, query) of training and of test tasks."""
    name = config.algo.name
    train_shape, test_shape = shapes
    check_optimizees(config, algo_cls, model_cls)
    config.algo.check_data(config.data)
    reinforcement = algo_cls.reinforcement
    if reinforcement != (config.data.task_kind == "rl"):
        raise ConfigError(
            f"algo={name} learns from rewards in environments and data={config.data.name} "
            f"holds supervised tasks; {META_RL_PAIRS}"
            if reinforcement
            else f"algo={name} learns from labelled tasks and data={config.data.name} is a "
            f"meta-RL environment; {META_RL_PAIRS}, or use a supervised data set such as "
            f"data=omniglot or sinusoid"
        )
    if reinforcement and config.model.name != algo_cls.policy_model:
        raise ConfigError(
            f"algo={name} trains model={algo_cls.policy_model}, not model={config.model.name}; "
            f"set model={algo_cls.policy_model} or leave model= out"
        )
    if not reinforcement and getattr(model_cls, "policy", False):
        raise ConfigError(
            f"model={config.model.name} is a Gaussian policy for continuous-control meta-RL "
            f"(algo=maml_trpo, emaml_trpo, promp, pretrained_trpo); algo={name} needs a "
            f"supervised network such as model=conv4 or mlp, or leave model= out"
        )
    if not reinforcement and model_cls.recurrent:
        raise ConfigError(
            f"model={config.model.name} is a meta-RL agent; algo={name} needs a "
            f"supervised network such as model=conv4 or mlp"
        )
    classification = config.data.task_kind == "classification"
    if algo_cls.needs_head and classification and train_shape[0] != test_shape[0]:
        raise ConfigError(
            f"algo={name} ends in a {train_shape[0]}-way linear head, so it cannot be "
            f"tested on {test_shape[0]}-way tasks; set algo.train_ways equal to data.ways"
        )
    hardware = config.hardware
    vmapped = algo_cls.batches_tasks and batching == "vmap"
    if hardware.channels_last and vmapped:
        raise ConfigError(
            f"hardware.channels_last cannot be used inside vmap (algo={name}); set "
            "hardware.task_batching=loop or hardware.channels_last=false"
        )
    check_task_chunk(config, algo_cls)
    check_own_step(config, algo_cls)
    check_learned_rate(config, algo_cls)
    check_context(config, algo_cls)
    if isinstance(config.trainer, OnlineConfig):
        check_online(config, algo_cls, shapes)


def check_online(config: RunConfig, algo_cls: type, shapes: tuple[tuple, tuple]) -> None:
    """trainer=online (FTML) meta-learns a prior that k gradient steps adapt to each new task:
    a learner of the MAML family, k >= 1, and tasks whose pools hold their shots and queries."""
    name, trainer = config.algo.name, config.trainer
    if algo_cls.family != "bilevel" or not algo_cls.inner_loop:
        raise ConfigError(
            f"trainer=online runs FTML, which meta-learns an initialisation that gradient steps "
            f"adapt; algo={name} is a {algo_cls.family} learner: use algo=maml (or fomaml, "
            f"metasgd, anil)"
        )
    if config.data.task_kind not in ("classification", "regression"):
        raise ConfigError(
            f"trainer=online streams supervised tasks; data={config.data.name} holds "
            f"{config.data.task_kind} problems: use data=sinusoid or omniglot"
        )
    if config.algo.test_inner_steps < 1:
        raise ConfigError(
            f"trainer=online scores each new task after k = algo.test_inner_steps updates, which "
            f"must be at least 1, got {config.algo.test_inner_steps}"
        )
    if config.hardware.task_chunk is not None:
        raise ConfigError("hardware.task_chunk splits trainer=default's meta-batches; set it null")
    (_, shots, query), (_, test_shots, test_query) = shapes
    need = max(shots + query, test_shots + test_query)
    if trainer.pool < need:
        raise ConfigError(
            f"trainer.pool={trainer.pool} examples per task and class cannot hold the {need} "
            f"that a task's support and query take (data.shots + data.query, or algo.train_query "
            f"and eval.query where set); raise trainer.pool to at least {need}"
        )


CONTEXT_SETS = (GPConfig, CompletionConfig)  # data sets whose context sizes vary per task


def check_context(config: RunConfig, algo_cls: type) -> None:
    """Context sets of different sizes (data=gp's U{min_shots..shots}) suit only learners that
    condition on a set; an inner loop adapts on a fixed-size support set of at least one point."""
    data = config.data
    if not isinstance(data, CONTEXT_SETS) or algo_cls.variable_context or not algo_cls.inner_loop:
        return  # (a classifier's own error says why it cannot take these data sets)
    name, data_name = config.algo.name, data.name
    if data.min_shots < 1:
        raise ConfigError(
            f"algo={name} adapts on the context points and needs at least one, but "
            f"data={data_name} draws U{{{data.min_shots}..{data.shots}}} of them; set "
            f"data.min_shots=data.shots "
            f"(a fixed context size of at least 1), or use a neural process (algo=cnp, ...)"
        )
    if data.variable_context:
        raise ConfigError(
            f"algo={name} adapts on a support set of fixed size, but data={data_name} draws "
            f"U{{{data.min_shots}..{data.shots}}} context points per task; set data.min_shots="
            f"data.shots"
        )


def check_optimizees(config: RunConfig, algo_cls: type, model_cls: type) -> None:
    """Learned optimisers train on optimizee problems, and nothing else does."""
    name, data, model = config.algo.name, config.data.name, config.model.name
    optimizes = algo_cls.optimizees
    if optimizes != (config.data.task_kind == "optimization"):
        raise ConfigError(
            f"algo={name} learns an optimiser from problems to minimise, and data={data} holds "
            f"tasks; pair it with data=quadratic or digits_mlp"
            if optimizes
            else f"data={data} holds problems for a learned optimiser; use algo=l2o there"
        )
    if optimizes != model_cls.learned_optimizer:
        raise ConfigError(
            f"algo={name} meta-trains a learned optimiser: set model=lstm_optimizer or "
            f"mlp_optimizer (model={model} is not one)"
            if optimizes
            else f"model={model} is a learned optimiser, which only algo=l2o trains"
        )


def check_own_step(config: RunConfig, algo_cls: type) -> None:
    """A learner that takes its outer step itself (MAML-TRPO's trust-region step) has no outer
    optimiser: the trainer's settings of one would silently do nothing."""
    trainer = config.trainer
    settings = ("optimizer", "clip_grad_norm", "lr_schedule", "lr_decay_every", "hypergrad_lr")
    given = [
        f"trainer.{k}={getattr(trainer, k)}" for k in settings if getattr(trainer, k) is not None
    ]
    if algo_cls.steps_itself and given:
        raise ConfigError(
            f"algo={config.algo.name} takes its own outer step (TRPO: a natural-gradient step "
            f"within a KL trust region, algo.max_kl), with no outer optimiser, so "
            f"{', '.join(given)} would do nothing; set it null"
        )


def check_learned_rate(config: RunConfig, algo_cls: type) -> None:
    """A hypergradient optimiser's rate is learned: a schedule that sets it is a contradiction."""
    trainer = config.trainer
    if not (trainer.optimizer or "").endswith("_hd"):
        return
    own = "step" if trainer.lr_decay_every else algo_cls.outer_schedule
    schedule = trainer.lr_schedule or own
    if schedule != "constant":
        raise ConfigError(
            f"trainer.optimizer={trainer.optimizer} learns its own learning rate, and the "
            f"{schedule!r} schedule (trainer.lr_schedule, trainer.lr_decay_every or "
            f"algo={config.algo.name}'s own) would overwrite it each step; set "
            f"trainer.lr_schedule=constant trainer.lr_decay_every=null, or trainer.optimizer=adam"
        )


def check_task_chunk(config: RunConfig, algo_cls: type) -> None:
    """hardware.task_chunk splits a meta-batch of tasks: episodic learners only, evenly."""
    chunk, size = config.hardware.task_chunk, config.trainer.meta_batch_size
    if chunk is None:
        return
    if algo_cls.pretrains or algo_cls.reinforcement or algo_cls.optimizees:
        unit = {True: "labelled batches", False: "trials"}[algo_cls.pretrains]
        unit = "unrolls of problems" if algo_cls.optimizees else unit
        raise ConfigError(
            f"hardware.task_chunk splits a meta-batch of tasks; algo={config.algo.name} trains "
            f"on {unit}: set "
            f"hardware.task_chunk=null (smaller batches: algo.batch_size or "
            f"trainer.meta_batch_size)"
        )
    if size % chunk:
        divisors = [d for d in range(1, size) if size % d == 0]
        raise ConfigError(
            f"hardware.task_chunk={chunk} does not divide trainer.meta_batch_size={size} "
            f"(equal chunks keep every task's weight in the meta-gradient); use one of "
            f"{divisors} or null"
        )
