"""`metalearn bench`: meta-training speed and peak memory, side by side with reference code.

Every case runs in its own spawned process (so that its peak memory is its own), on the same
synthetic tensors for every implementation, and reports seconds per meta-iteration, tasks per
second, peak memory and the arithmetic rate (GFLOP counted once per case with
torch.utils.flop_counter, divided by the time) as a fraction of the machine's measured peak: a
large matmul, and the model's own convolutions run as one plain batch. References, timed in
the same run: learn2learn's MAML (when installed: `make reference`), a straightforward
PyTorch ProtoNet, and learn2learn's TaskDataset sampler.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import multiprocessing
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algos import ALGOS
from metalearn.config import from_dict
from metalearn.data.tasks import EpisodeSampler, Split, TaskBatch
from metalearn.errors import ConfigError
from metalearn.hardware import (
    HardwareConfig,
    describe,
    peak_memory_mib,
    reset_peak_memory,
    synchronize,
    task_batching,
)
from metalearn.tools.bench.pipeline import markdown as pipeline_markdown
from metalearn.tools.bench.pipeline import pipeline_bench

PIPELINE_TASKS = 4  # pipeline batches: 4 tasks of N-way (K+Q) images (320 at 5-way 1+15)
FAMILY = [name for name, (_, cls) in ALGOS.items() if cls.family == "bilevel"]
# name -> (image shape, conv4 width, downsampling): Omniglot as MAML trains it, and
# miniImageNet-shaped inputs with MAML's 32-filter conv4
SHAPES = {
    "omniglot": ((1, 28, 28), 64, "stride"),
    "mini84": ((3, 84, 84), 32, "maxpool"),
}


@dataclass
class BenchConfig:
    """What to time and how long."""

    groups: list[str] = field(
        default_factory=lambda: ["peak", "family", "protonet", "sampler", "pipeline"]
    )  # any of: peak, family, protonet, sampler, pipeline
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
    loader_workers: int = 2  # DataLoader workers of the pipeline group's ImageFolder baseline
    out: str = "outputs/bench"  # bench.json and bench.md go here

    def __post_init__(self) -> None:
        unknown = set(self.groups) - {"peak", "family", "protonet", "sampler", "pipeline"}
        if unknown:
            raise ConfigError(
                f"unknown bench group(s) {sorted(unknown)}; valid: peak, family, protonet, "
                f"sampler, pipeline"
            )
        if set(self.algos) - set(FAMILY):
            raise ConfigError(f"bench algos must be among {', '.join(FAMILY)}, got {self.algos}")
        if set(self.shapes) - set(SHAPES):
            raise ConfigError(f"bench shapes must be among {', '.join(SHAPES)}, got {self.shapes}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"bench device must be cpu or cuda, got {self.device!r}")
        for key in ("meta_batch", "ways", "shots", "query", "min_iterations"):
            if getattr(self, key) < 1:
                raise ConfigError(f"bench {key} must be positive, got {getattr(self, key)}")


# -- the timed steps ----------------------------------------------------------------------------
def synthetic_batch(
    cfg: BenchConfig,
    shape: str,
    device: torch.device,
    ways=None,
    shots=None,
    query=None,
    tasks=None,
) -> TaskBatch:
    """Random images and balanced labels of the given task shape (identical for all code)."""
    g = torch.Generator().manual_seed(0)
    image = SHAPES[shape][0]
    ways, shots = ways or cfg.ways, shots or cfg.shots
    query, tasks = query or cfg.query, tasks or cfg.meta_batch

    def split(per_class: int) -> Split:
        x = torch.rand(tasks, ways * per_class, *image, generator=g)
        y = torch.arange(ways).repeat_interleave(per_class).expand(tasks, -1).clone()
        return Split(x.to(device), y.to(device))

    return TaskBatch(split(shots), split(query), ways)


def _conv4(cfg: BenchConfig, shape: str, out: int, fused: bool, device) -> nn.Module:
    from metalearn.models.conv4 import Conv4, Conv4Config

    image, hidden, downsample = SHAPES[shape]
    torch.manual_seed(0)
    config = Conv4Config(hidden=hidden, downsample=downsample)
    return Conv4(config, image, out, fused_batchnorm=fused).to(device)


def ours_step(
    cfg: BenchConfig,
    algo_name: str,
    shape: str,
    steps: int,
    batching: str,
    device,
    compiled: bool = False,
):
    """One meta-iteration of metalearn's algorithm, exactly as the trainer runs it (with
    `compiled`, as build.py sets up hardware.compile=true)."""
    from metalearn.build import compile_training, fused_batchnorm_is_exact
    from metalearn.train.schedule import outer_optimizer

    config_cls, algo_cls = ALGOS[algo_name]
    first_order = algo_name in ("fomaml", "reptile")
    options = {"name": algo_name, "inner_steps": steps, "first_order": first_order}
    if algo_name == "reptile":
        # the same full-batch SGD steps as the other learners, for a like-for-like time
        options.update(inner_optimizer="sgd", inner_lr=0.4, inner_batch=None, inner_loss="mean")
    elif algo_name == "mamlpp":
        options.update(first_order_epochs=0)  # time the second-order phase
    else:
        options.update(inner_lr=0.4)
    algo_cfg = config_cls(**options)
    model = _conv4(cfg, shape, cfg.ways, fused_batchnorm_is_exact(algo_cls, batching), device)
    algo = algo_cls(algo_cfg, model, "classification", batching)
    if compiled:
        compile_training(algo, batching)
    optimizer = outer_optimizer(algo_cfg, algo)
    batch = synthetic_batch(cfg, shape, device)

    def step() -> None:
        objective, _ = algo.meta_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()

    return step


def learn2learn_step(cfg: BenchConfig, first_order: bool, shape: str, steps: int, device):
    """learn2learn's MAML, written as its examples do, on the same network and data."""
    import learn2learn as l2l

    model = _conv4(cfg, shape, cfg.ways, True, device)  # native BatchNorm: exact without vmap
    maml = l2l.algorithms.MAML(model, lr=0.4, first_order=first_order)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    batch = synthetic_batch(cfg, shape, device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for t in range(batch.tasks):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(batch.support.x[t]), batch.support.y[t]))
            loss = F.cross_entropy(learner(batch.query.x[t]), batch.query.y[t]) / batch.tasks
            loss.backward()
        optimizer.step()

    return step


PROTONET_EPISODE = {"ways": 60, "shots": 5, "query": 5, "tasks": 1}


def protonet_step(cfg: BenchConfig, variant: str, device):
    """A 60-way 5-shot 5-query ProtoNet training episode (Snell et al. 2017, Omniglot)."""
    from metalearn.algos.metric.protonet import ProtoNet, ProtoNetConfig
    from metalearn.models.conv4 import Conv4, Conv4Config

    batch = synthetic_batch(cfg, "omniglot", device, **PROTONET_EPISODE)
    torch.manual_seed(0)
    if variant == "straightforward":
        return _straightforward_protonet(batch, device)
    fast = variant == "ours-cl-bf16"
    model = Conv4(
        Conv4Config(hidden=64, downsample="maxpool"),
        (1, 28, 28),
        0,
        fused_batchnorm=True,
        channels_last=fast,
    ).to(device)
    algo = ProtoNet(ProtoNetConfig(), model, "classification", "loop")
    optimizer = torch.optim.Adam(algo.parameters(), lr=1e-3)
    precision = torch.autocast(device.type, dtype=torch.bfloat16) if fast else None

    def step() -> None:
        with precision or contextlib.nullcontext():
            loss, _ = algo.meta_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _straightforward_protonet(batch: TaskBatch, device):
    """The reference: nn.Sequential conv4 with nn.BatchNorm2d, torch.cdist, one episode."""

    def block(c_in: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2)]

    net = nn.Sequential(*block(1), *block(64), *block(64), *block(64), nn.Flatten()).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    ways = batch.ways

    def step() -> None:
        support, query = net(batch.support.x[0]), net(batch.query.x[0])
        prototypes = support.view(ways, -1, support.shape[-1]).mean(1)
        logits = -(torch.cdist(query, prototypes) ** 2)
        loss = F.cross_entropy(logits, batch.query.y[0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


SAMPLER_IMAGES = (1200, 20, 1, 28, 28)  # Omniglot's meta-training classes, uint8


def sampler_step(cfg: BenchConfig, variant: str, device):
    """Draw one meta-batch of tasks (T x N-way (K+Q)-example) from an in-memory class set."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, SAMPLER_IMAGES, dtype=torch.uint8, generator=g)
    per_class = cfg.shots + cfg.query
    if variant == "ours":
        sampler = EpisodeSampler(images, device)
        generator = torch.Generator(device).manual_seed(0)

        def step() -> None:
            batch = sampler.sample(generator, cfg.meta_batch, cfg.ways, cfg.shots, cfg.query)
            synchronize(batch.query.x)

        return step
    import learn2learn as l2l

    classes, examples = SAMPLER_IMAGES[:2]
    data = torch.utils.data.TensorDataset(
        images.flatten(0, 1).float().div(255), torch.arange(classes).repeat_interleave(examples)
    )
    meta = l2l.data.MetaDataset(data)
    transforms = [
        l2l.data.transforms.NWays(meta, cfg.ways),
        l2l.data.transforms.KShots(meta, per_class),
        l2l.data.transforms.LoadData(meta),
        l2l.data.transforms.RemapLabels(meta),
        l2l.data.transforms.ConsecutiveLabels(meta),
    ]
    tasks = l2l.data.TaskDataset(meta, task_transforms=transforms, num_tasks=-1)

    def step() -> None:
        for _ in range(cfg.meta_batch):
            x, _y = tasks.sample()
            synchronize(x.to(device))

    return step


# -- measuring ----------------------------------------------------------------------------------
def count_flops(step: Callable[[], None]) -> float:
    """FLOPs of one call (matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def time_step(cfg: BenchConfig, step: Callable[[], None], device) -> dict[str, float]:
    """Seconds per call (median of the timed calls) after warm-up."""
    for _ in range(cfg.warmup):
        step()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < cfg.min_iterations or time.perf_counter() - started < cfg.min_seconds:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"seconds": times[len(times) // 2], "best_seconds": times[0], "calls": len(times)}


def peak_rates(cfg: BenchConfig, device) -> dict[str, float]:
    """GFLOP/s of a large matmul, and of conv4's convolutions run as one plain batch."""
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    matmul = time_step(cfg, lambda: a @ b, device)["best_seconds"]
    rates = {"matmul_gflops": 2 * n**3 / matmul / 1e9}
    for shape in cfg.shapes:
        image, hidden, downsample = SHAPES[shape]
        images = cfg.meta_batch * cfg.ways * (cfg.shots + cfg.query)
        x = torch.randn(images, *image, device=device)
        convs = [
            m for m in _conv4(cfg, shape, 0, True, device).modules() if isinstance(m, nn.Conv2d)
        ]

        def forward(x=x, convs=convs, downsample=downsample):
            with torch.no_grad():
                h = x
                for conv in convs:
                    h = conv(h)
                    if downsample == "maxpool":
                        h = F.max_pool2d(h, 2)

        flops = count_flops(forward)
        rates[f"conv_{shape}_gflops"] = (
            flops / time_step(cfg, forward, device)["best_seconds"] / 1e9
        )
    return rates


def _run_case(payload: tuple[dict, dict]) -> dict[str, Any]:
    """In a fresh process: build the case, count its FLOPs, time it, read its peak memory."""
    raw, case = payload
    cfg = from_dict(BenchConfig, raw, "bench")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    kind = case["kind"]
    compiled = case.get("compile", False)
    if kind == "ours":
        step = ours_step(
            cfg, case["algo"], case["shape"], case["steps"], case["batching"], device, compiled
        )
    elif kind == "learn2learn":
        step = learn2learn_step(cfg, case["algo"] == "fomaml", case["shape"], case["steps"], device)
    elif kind == "protonet":
        step = protonet_step(cfg, case["variant"], device)
    else:
        step = sampler_step(cfg, case["variant"], device)
    baseline = reset_peak_memory(device)
    # the counter sees vmapped convolutions as larger ones than they are, and compiled code
    # not at all: those cases are counted on the eager per-task loop, whose arithmetic is the same
    count_on_loop = kind == "ours" and (case["batching"] == "vmap" or compiled)
    extra = {}
    if count_on_loop:
        started = time.perf_counter()
        step()  # warm-up (and compilation); FLOPs are counted below
        extra["first_call_seconds"] = time.perf_counter() - started
        step()  # a compiled backward compiles on its first call, after the forward's
        flops = 0.0
    else:
        flops = 0.0 if kind == "sampler" else count_flops(step)  # also the warm-up
    timing = time_step(cfg, step, device)
    memory = peak_memory_mib(device)
    memory -= baseline  # the growth over what the process held before the first step
    if count_on_loop:  # after the memory reading
        del step
        flops = count_flops(
            ours_step(cfg, case["algo"], case["shape"], case["steps"], "loop", device)
        )
    out = {**case, **timing, **extra, "peak_memory_mib": memory, "gflop": flops / 1e9}
    if flops:
        out["gflops"] = flops / timing["seconds"] / 1e9
    return out


def cases(cfg: BenchConfig, have_reference: bool) -> list[dict]:
    """Every case of the configured groups, references next to what they are compared with."""
    out: list[dict] = []
    examples = cfg.ways * (cfg.shots + cfg.query)
    auto = task_batching(HardwareConfig(), torch.device(cfg.device), True, examples)
    other = "vmap" if auto == "loop" else "loop"
    if "family" in cfg.groups:
        for shape in cfg.shapes:
            for steps in cfg.steps:
                for algo in cfg.algos:
                    # the hardware.task_batching=auto choice; MAML and FOMAML also the other
                    batchings = [auto] + ([other] if algo in ("maml", "fomaml") else [])
                    variants = [(b, False) for b in batchings]
                    if cfg.compile and algo in ("maml", "fomaml"):
                        variants.append((auto, True))  # hardware.compile=true
                    for batching, compiled in variants:
                        out.append(
                            {
                                "group": "family",
                                "kind": "ours",
                                "algo": algo,
                                "shape": shape,
                                "steps": steps,
                                "batching": batching,
                                "compile": compiled,
                            }
                        )
                    if have_reference and algo in ("maml", "fomaml"):
                        out.append(
                            {
                                "group": "family",
                                "kind": "learn2learn",
                                "algo": algo,
                                "shape": shape,
                                "steps": steps,
                                "batching": "loop",
                            }
                        )
    if "protonet" in cfg.groups:
        for variant in ("straightforward", "ours", "ours-cl-bf16"):
            out.append({"group": "protonet", "kind": "protonet", "variant": variant})
    if "sampler" in cfg.groups:
        for variant in ["ours", *(["learn2learn"] if have_reference else [])]:
            out.append({"group": "sampler", "kind": "sampler", "variant": variant})
    return out


def run_bench(cfg: BenchConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every case (each in a spawned process); write bench.json and bench.md."""
    have_reference = cfg.reference and importlib.util.find_spec("learn2learn") is not None
    if cfg.reference and not have_reference:
        echo("learn2learn is not installed (`make reference`): timing metalearn alone")
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    report: dict[str, Any] = {
        "config": asdict(cfg),
        "hardware": {**describe(device), "python": platform.python_version()},
        "learn2learn": _version("learn2learn") if have_reference else None,
    }
    if "peak" in cfg.groups:
        report["peak"] = peak_rates(cfg, device)
        echo("peak: " + ", ".join(f"{k} {v:.1f}" for k, v in report["peak"].items()))
    results = []
    context = multiprocessing.get_context("spawn")
    raw = asdict(cfg)
    for case in cases(cfg, have_reference):
        with context.Pool(1) as pool:
            result = pool.apply(_run_case, ((raw, case),))
        results.append(result)
        echo(_describe(result))
    report["results"] = results
    _add_ratios(report)
    if "pipeline" in cfg.groups:
        report["pipeline"] = pipeline_bench(
            device,
            tasks=PIPELINE_TASKS,
            ways=cfg.ways,
            per_class=cfg.shots + cfg.query,
            workers=cfg.loader_workers,
            min_seconds=cfg.min_seconds,
        )
        echo(pipeline_markdown(report["pipeline"]))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(report))
    echo(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return report


def _version(module: str) -> str:
    return getattr(importlib.import_module(module), "__version__", "?")


def _describe(result: dict) -> str:
    what = result.get("algo") or result.get("variant")
    extra = (
        f" {result['shape']} {result['steps']} steps {_code(result)}" if "shape" in result else ""
    )
    return f"{result['kind']:>11} {what}{extra}: {result['seconds']:.4f} s"


def _add_ratios(report: dict) -> None:
    """Speed-up of each of our cases over its reference, and rates as fractions of peak."""
    results, peak = report["results"], report.get("peak", {})
    for r in results:
        # learn2learn has MAML and FOMAML: only those are compared with it
        if r["group"] == "family" and r["kind"] == "ours" and r["algo"] in ("maml", "fomaml"):
            base = r["algo"]
            ref = next(
                (
                    x
                    for x in results
                    if x["kind"] == "learn2learn"
                    and x["algo"] == base
                    and x["shape"] == r["shape"]
                    and x["steps"] == r["steps"]
                ),
                None,
            )
            if ref:
                r["speedup_vs_learn2learn"] = ref["seconds"] / r["seconds"]
        if r["group"] == "protonet" and r["variant"] != "straightforward":
            ref = next(x for x in results if x.get("variant") == "straightforward")
            r["speedup_vs_straightforward"] = ref["seconds"] / r["seconds"]
        if r["group"] == "sampler" and r["variant"] == "ours":
            ref = next(
                (x for x in results if x["group"] == "sampler" and x["variant"] == "learn2learn"),
                None,
            )
            if ref:
                r["speedup_vs_learn2learn"] = ref["seconds"] / r["seconds"]
        if "gflops" in r and peak:
            r["fraction_of_matmul_peak"] = r["gflops"] / peak["matmul_gflops"]
            conv = peak.get(f"conv_{r.get('shape', 'omniglot')}_gflops")
            if conv:
                r["fraction_of_conv_rate"] = r["gflops"] / conv


def markdown(report: dict) -> str:
    """The README's bench tables."""
    hw = report["hardware"]
    lines = [
        f"Hardware: {hw.get('gpu') or hw['cpu']}, {hw['threads']} threads, torch {hw['torch']}"
        + (f", learn2learn {report['learn2learn']}" if report.get("learn2learn") else ""),
        "",
    ]
    peak = report.get("peak")
    if peak:
        lines += [
            "Peak: "
            + ", ".join(f"{k.removesuffix('_gflops')} {v:.1f} GFLOP/s" for k, v in peak.items()),
            "",
        ]
    family = [r for r in report["results"] if r["group"] == "family"]
    if family:
        lines += [
            "| algorithm | code | input | inner steps | tasks | s / iteration | tasks / s "
            "| peak MiB | GFLOP/s | of matmul peak | speed-up vs learn2learn |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        tasks = report["config"]["meta_batch"]
        for r in family:
            lines.append(
                f"| {r['algo']} | {_code(r)} | {r['shape']} | {r['steps']} | {tasks} "
                f"| {r['seconds']:.3f} | {tasks / r['seconds']:.1f} | {r['peak_memory_mib']:.0f} "
                f"| {r.get('gflops', 0):.1f} | {100 * r.get('fraction_of_matmul_peak', 0):.0f}% "
                f"| {_ratio(r.get('speedup_vs_learn2learn'))} |"
            )
        lines.append("")
        first_calls = [
            f"{r['algo']} {r['shape']} {r['steps']} step(s) {r['first_call_seconds']:.0f} s"
            for r in family
            if r.get("compile")
        ]
        if first_calls:
            lines += ["First call of the compiled cases (compilation): " + "; ".join(first_calls)]
            lines.append("")
    proto = [r for r in report["results"] if r["group"] == "protonet"]
    if proto:
        lines += [
            "| ProtoNet 60-way 5-shot 5-query episode | s / episode | GFLOP/s | speed-up |",
            "| --- | --- | --- | --- |",
        ]
        for r in proto:
            lines.append(
                f"| {r['variant']} | {r['seconds']:.3f} | {r.get('gflops', 0):.1f} "
                f"| {_ratio(r.get('speedup_vs_straightforward'))} |"
            )
        lines.append("")
    sampler = [r for r in report["results"] if r["group"] == "sampler"]
    if sampler:
        cfg = report["config"]
        lines += [
            f"| sampler: {cfg['meta_batch']} tasks, {cfg['ways']}-way "
            f"{cfg['shots'] + cfg['query']} examples | ms / meta-batch | speed-up |",
            "| --- | --- | --- |",
        ]
        for r in sampler:
            lines.append(
                f"| {r['variant']} | {1000 * r['seconds']:.1f} "
                f"| {_ratio(r.get('speedup_vs_learn2learn'))} |"
            )
        lines.append("")
    if report.get("pipeline"):
        lines += [pipeline_markdown(report["pipeline"]), ""]
    return "\n".join(lines)


def _code(result: dict) -> str:
    """Which implementation a family case timed, as the tables name it."""
    if result["kind"] == "learn2learn":
        return "learn2learn"
    compiled = ", compiled" if result.get("compile") else ""
    return f"metalearn ({result['batching']}{compiled})"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"
