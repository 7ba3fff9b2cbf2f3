"""`metalearn bench`'s settings (`metalearn bench key=value ...`) and the cases they name."""

from __future__ import annotations

from dataclasses import dataclass, field

from metalearn.algos import ALGOS
from metalearn.errors import ConfigError

FAMILY = [name for name, (_, cls) in ALGOS.items() if cls.family == "bilevel"]

# name -> (image shape, conv4 width, downsampling): Omniglot as MAML trains it, and
# miniImageNet-shaped inputs with MAML's 32-filter conv4
SHAPES = {
    "omniglot": ((1, 28, 28), 64, "stride"),
    "mini84": ((3, 84, 84), 32, "maxpool"),
}


GROUPS = ("peak", "family", "protonet", "eval", "sampler", "pipeline")


@dataclass
class BenchConfig:
    """What to time and how long."""

    groups: list[str] = field(
        default_factory=lambda: ["peak", "family", "protonet", "eval", "sampler", "pipeline"]
    )  # any of: GROUPS
    algos: list[str] = field(default_factory=lambda: list(FAMILY))
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    steps: list[int] = field(default_factory=lambda: [1, 5])  # inner steps
    meta_batch: int = 32
    ways: int = 5
    shots: int = 1
    query: int = 15
    warmup: int = 0  # untimed calls first (counting FLOPs has already run the step once)
    min_iterations: int = 1  # timed iterations at least ...
    min_seconds: float = 10.0  # ... and until this much time has passed
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    reference: bool = True  # time learn2learn too when it is installed
    compile: bool = True  # time MAML and FOMAML with hardware.compile=true too
    # time MAML and FOMAML with hardware.task_chunk=c too, for each c (less memory)
    task_chunks: list[int] = field(default_factory=lambda: [8])
    loader_workers: int = 2  # DataLoader workers of the pipeline group's ImageFolder baseline
    out: str = "outputs/bench"  # bench.json and bench.md go here

    def __post_init__(self) -> None:
        unknown = set(self.groups) - set(GROUPS)
        if unknown:
            raise ConfigError(
                f"unknown bench group(s) {sorted(unknown)}; valid: {', '.join(GROUPS)}"
            )
        if set(self.algos) - set(FAMILY):
            raise ConfigError(f"bench algos must be among {', '.join(FAMILY)}, got {self.algos}")
        if set(self.shapes) - set(SHAPES):
            raise ConfigError(f"bench shapes must be among {', '.join(SHAPES)}, got {self.shapes}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"bench device must be cpu or cuda, got {self.device!r}")
        if any(c < 1 or self.meta_batch % c for c in self.task_chunks):
            raise ConfigError(
                f"bench task_chunks must divide meta_batch={self.meta_batch}, got "
                f"{self.task_chunks}: give divisors (task_chunks=[4]) or none (task_chunks=[])"
            )
        for key in ("meta_batch", "ways", "shots", "query", "min_iterations"):
            if getattr(self, key) < 1:
                raise ConfigError(f"bench {key} must be positive, got {getattr(self, key)}")
