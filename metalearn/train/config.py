"""The trainer's settings (`trainer.*`), checked when the config is parsed: the default loop's
(`trainer=default`) and online meta-learning's (`trainer=online`), which adds its stream's."""

import math
from dataclasses import dataclass

from metalearn.config import check_seed
from metalearn.errors import ConfigError

SCHEDULES = ("constant", "step", "cosine", "linear")  # trainer.lr_schedule (schedule.py)
NONFINITE = ("stop", "skip")  # trainer.nonfinite: what a NaN or Inf loss or gradient does
# trainer.optimizer (schedule.py): the outer optimiser, overriding the algorithm's own; the *_hd
# ones learn their rate by hypergradient descent (metalearn.optim.hypergradient)
OPTIMIZERS = ("adam", "sgd", "sgdn", "adam_hd", "sgd_hd", "sgdn_hd")


@dataclass
class TrainerConfig:
    """Budget, schedule and checkpointing of meta-training."""

    name: str = "default"  # which loop: 'default' (train/loop.py) or 'online' (train/online.py)
    iterations: int = 1000  # outer (meta) iterations
    max_minutes: float | None = None  # wall-clock budget: stop, validate and test when spent
    # CPU-time budget of training and validation (the process's, all threads): the same work
    # whatever else shares the machine; with hardware.threads=1, CPU minutes of one core
    max_cpu_minutes: float | None = None
    meta_batch_size: int = 32  # tasks per outer step
    eval_every: int = 500  # validate (and checkpoint) every this many iterations
    log_every: int = 20  # write training metrics every this many iterations
    resume: bool = False  # continue from <run dir>/checkpoints/last.pt if it exists
    # outer learning-rate schedule: 'constant', 'step' (x lr_decay every lr_decay_every
    # iterations), 'cosine' or 'linear' (from algo.outer_lr to min_lr over `iterations`);
    # None: 'step' if lr_decay_every is set, else the algorithm's own (MAML++ cosine, Reptile
    # linear, others constant)
    lr_schedule: str | None = None
    lr_decay_every: int | None = None  # multiply the outer learning rate by lr_decay this often
    lr_decay: float = 0.5  # step decay factor (ProtoNets halve it every 2000 episodes)
    min_lr: float = 0.0  # where 'cosine' and 'linear' end
    progress: bool = True  # show a progress bar
    # a NaN or Inf in the loss or the meta-gradient: 'stop' (the last good checkpoint stays), or
    # 'skip': drop that meta-batch (no outer step), count it, go on
    nonfinite: str = "stop"
    max_skipped: int = 100  # nonfinite=skip: stop all the same after this many skipped batches
    # rescale the meta-gradient to at most this L2 norm before each outer step (null: never);
    # logged as train/grad_norm (the norm before clipping)
    clip_grad_norm: float | None = None
    # the outer optimiser: one of OPTIMIZERS; None: the algorithm's own (Adam, or SGD where its
    # paper says). sgdn and sgdn_hd take the algorithm's SGD momentum, else 0.9 (Baydin et al.)
    optimizer: str | None = None
    # the *_hd optimisers' hypergradient rate beta; None: the authors' (1e-3 SGD, 1e-7 Adam)
    hypergrad_lr: float | None = None

    def __post_init__(self) -> None:
        for key in ("iterations", "meta_batch_size", "eval_every", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key} must be positive, got {getattr(self, key)}")
        for key in ("max_minutes", "max_cpu_minutes"):
            value = getattr(self, key)
            if value is not None and not 0 < value < math.inf:
                raise ConfigError(
                    f"trainer.{key} must be positive and finite (null: no limit), got {value}"
                )
        if self.lr_decay_every is not None and self.lr_decay_every < 1:
            raise ConfigError(f"trainer.lr_decay_every must be positive, got {self.lr_decay_every}")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"trainer.lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.lr_schedule not in (None, *SCHEDULES):
            raise ConfigError(
                f"trainer.lr_schedule must be one of {', '.join(SCHEDULES)}, got "
                f"{self.lr_schedule!r}"
            )
        if self.lr_schedule == "step" and self.lr_decay_every is None:
            raise ConfigError("trainer.lr_schedule=step needs trainer.lr_decay_every")
        if not 0 <= self.min_lr < math.inf:
            raise ConfigError(f"trainer.min_lr must be finite and >= 0, got {self.min_lr}")
        if self.nonfinite not in NONFINITE:
            raise ConfigError(
                f"trainer.nonfinite must be one of {', '.join(NONFINITE)}, got {self.nonfinite!r}"
            )
        if self.max_skipped < 0:
            raise ConfigError(f"trainer.max_skipped must be >= 0, got {self.max_skipped}")
        self._check_optimizer()
        if self.clip_grad_norm is not None and not 0 < self.clip_grad_norm < math.inf:
            raise ConfigError(
                f"trainer.clip_grad_norm must be positive and finite (null: no clipping), got "
                f"{self.clip_grad_norm}"
            )

    def _check_optimizer(self) -> None:
        if self.optimizer not in (None, *OPTIMIZERS):
            raise ConfigError(
                f"trainer.optimizer must be one of {', '.join(OPTIMIZERS)} (null: the "
                f"algorithm's own), got {self.optimizer!r}"
            )
        if self.hypergrad_lr is None:
            return
        if not (self.optimizer or "").endswith("_hd"):
            raise ConfigError(
                "trainer.hypergrad_lr applies to a hypergradient optimiser; set "
                "trainer.optimizer=adam_hd, sgd_hd or sgdn_hd, or trainer.hypergrad_lr=null"
            )
        if not 0 <= self.hypergrad_lr < math.inf:
            raise ConfigError(
                f"trainer.hypergrad_lr must be >= 0 and finite, got {self.hypergrad_lr}"
            )


@dataclass
class OnlineConfig(TrainerConfig):
    """Online meta-learning (`trainer=online`, FTML: Finn et al. 2019): a seeded stream of tasks
    from the training split, one per round, each scored after k = algo.test_inner_steps updates
    before it joins the buffer; metrics.jsonl gets a line per round. Of the keys it shares with
    the default loop it reads meta_batch_size (tasks per meta-update, drawn from the buffer),
    optimizer, hypergrad_lr, clip_grad_norm, max_minutes, resume and progress; iterations,
    eval_every, log_every and max_skipped stay for the presets that set them (tuned/) and are
    not read."""

    name: str = "online"
    tasks: int = 100  # T: the stream's length, one new task per round
    stream_seed: int | None = None  # seed of the stream's tasks (None: the run's seed)
    # each task's own data: examples per class (classification) or points (regression); the
    # round scores on the first data.shots + data.query of each class, the buffer redraws them
    pool: int = 20
    meta_steps: int = 10  # FTML's meta-gradient steps after each round (Algorithm 1's N_meta)
    # TOE's and FTL's joint-training steps per round (None: meta_steps)
    joint_steps: int | None = None
    scratch_steps: int | None = None  # from scratch: SGD steps on the task (None: k, as the others)
    checkpoint_every: int = 10  # rounds between saves of last.pt (and after the last round)

    def seed_of_stream(self, run_seed: int) -> int:
        """The seed the stream's tasks are drawn from: stream_seed, else the run's."""
        return run_seed if self.stream_seed is None else self.stream_seed

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tasks < 1:
            raise ConfigError(
                f"trainer.tasks is the stream's length and must be at least 1, got {self.tasks}"
            )
        for key in ("pool", "meta_steps", "joint_steps", "scratch_steps", "checkpoint_every"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"trainer.{key} must be at least 1, got {value}")
        if self.stream_seed is not None:
            check_seed(self.stream_seed, "trainer.stream_seed")
        if self.lr_schedule not in (None, "constant") or self.lr_decay_every is not None:
            raise ConfigError(
                "trainer=online keeps FTML's outer rate constant (algo.outer_lr, Adam); set "
                "trainer.lr_schedule=null and trainer.lr_decay_every=null"
            )
        if self.max_cpu_minutes is not None:
            raise ConfigError(
                "trainer=online budgets wall time only: use trainer.max_minutes, and set "
                "trainer.max_cpu_minutes=null"
            )
        if self.nonfinite != "stop":
            raise ConfigError(
                "trainer=online stops at a non-finite meta-gradient (a skipped update would "
                "change the prior that meets the next task); set trainer.nonfinite=stop"
            )
