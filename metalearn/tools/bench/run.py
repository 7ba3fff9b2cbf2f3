"""Running `metalearn bench`: the cases, each timed in its own spawned process (so that its peak
memory is its own), the machine's peak rates, and the report written as bench.json and bench.md.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.config import from_dict
from metalearn.hardware import (
    HardwareConfig,
    describe,
    peak_memory_mib,
    reset_peak_memory,
    task_batching,
)
from metalearn.tools.bench.config import SHAPES, BenchConfig
from metalearn.tools.bench.evaluation import eval_cases, eval_step
from metalearn.tools.bench.learners import (
    bench_conv4,
    learn2learn_step,
    ours_step,
    protonet_step,
    sampler_step,
)
from metalearn.tools.bench.pipeline import markdown as pipeline_markdown
from metalearn.tools.bench.pipeline import pipeline_bench
from metalearn.tools.bench.report import add_ratios, describe_result, markdown

PIPELINE_TASKS = 4  # pipeline batches: 4 tasks of N-way (K+Q) images (320 at 5-way 1+15)


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
            m
            for m in bench_conv4(cfg, shape, 0, True, device).modules()
            if isinstance(m, nn.Conv2d)
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
            cfg,
            case["algo"],
            case["shape"],
            case["steps"],
            case["batching"],
            device,
            compiled,
            case.get("task_chunk"),
        )
    elif kind == "learn2learn":
        step = learn2learn_step(cfg, case["algo"] == "fomaml", case["shape"], case["steps"], device)
    elif kind == "protonet":
        step = protonet_step(cfg, case["variant"], device)
    elif kind == "eval":
        step = eval_step(cfg, case["algo"], case["variant"], device)
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
        flops = 0.0 if kind in ("sampler", "eval") else count_flops(step)  # also the warm-up
        if kind == "eval":  # its rate is in episodes per second, not FLOPs: a plain warm-up
            step()
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
                    variants = [(b, False, None) for b in batchings]
                    if algo in ("maml", "fomaml"):
                        variants += [(auto, False, c) for c in cfg.task_chunks]
                        if cfg.compile:
                            variants.append((auto, True, None))  # hardware.compile=true
                    for batching, compiled, chunk in variants:
                        out.append(
                            {
                                "group": "family",
                                "kind": "ours",
                                "algo": algo,
                                "shape": shape,
                                "steps": steps,
                                "batching": batching,
                                "compile": compiled,
                                "task_chunk": chunk,
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
    if "eval" in cfg.groups:
        out += eval_cases()
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
        echo(describe_result(result))
    report["results"] = results
    add_ratios(report)
    if "pipeline" in cfg.groups and importlib.util.find_spec("torchvision") is None:
        echo("torchvision is not installed (`make reference`): the pipeline group is skipped")
    elif "pipeline" in cfg.groups:
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
