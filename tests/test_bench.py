"""`metalearn bench` on tiny settings: every group runs, writes its JSON and markdown, and
compares with its reference in the same run (learn2learn where installed)."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from metalearn.errors import ConfigError
from metalearn.tools.bench.config import BenchConfig
from metalearn.tools.bench.report import markdown
from metalearn.tools.bench.run import count_flops, run_bench

HAVE_L2L = importlib.util.find_spec("learn2learn") is not None


def test_tiny_bench_writes_results_with_ratios(tmp_path):
    cfg = BenchConfig(
        groups=["peak", "family", "sampler"],
        algos=["maml", "reptile"],
        shapes=["omniglot"],
        steps=[1],
        meta_batch=2,
        task_chunks=[1],
        query=2,
        warmup=0,
        min_iterations=1,
        min_seconds=0.0,
        threads=1,
        out=str(tmp_path),
    )
    lines: list[str] = []
    report = run_bench(cfg, echo=lines.append)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["results"] == report["results"]
    kinds = {(r["kind"], r.get("algo"), r.get("batching")) for r in report["results"]}
    assert ("ours", "maml", "vmap") in kinds and ("ours", "maml", "loop") in kinds
    chunked = [r for r in report["results"] if r.get("task_chunk")]
    assert {r["algo"] for r in chunked} == {"maml"} and "chunks of 1" in "\n".join(lines)
    compiled = next(r for r in report["results"] if r.get("compile"))
    assert compiled["algo"] == "maml" and compiled["first_call_seconds"] > 0
    assert "compiled" in (tmp_path / "bench.md").read_text()
    assert ("ours", "reptile", "vmap") in kinds  # task_batching=auto: small tasks on CPU
    for r in report["results"]:
        assert r["seconds"] > 0 and r["calls"] >= 1
        if r["group"] == "family":
            assert r["gflop"] > 0 and 0 < r["fraction_of_matmul_peak"]
    vmap, loop = (
        next(r for r in report["results"] if r.get("batching") == b and r["algo"] == "maml")
        for b in ("vmap", "loop")
    )
    assert vmap["gflop"] == pytest.approx(loop["gflop"]), "the same arithmetic, counted once"
    assert compiled["gflop"] == pytest.approx(loop["gflop"])
    markdown = (tmp_path / "bench.md").read_text()
    assert "Intel" in markdown or "threads" in markdown
    assert report["peak"]["matmul_gflops"] > 0
    if HAVE_L2L:
        assert ("learn2learn", "maml", "loop") in kinds
        ours = next(r for r in report["results"] if r["kind"] == "ours" and r["algo"] == "maml")
        assert ours["speedup_vs_learn2learn"] > 0 and "x |" in markdown
        sampler = next(r for r in report["results"] if r.get("variant") == "ours")
        assert sampler["speedup_vs_learn2learn"] > 0


def test_the_report_shows_a_dash_for_what_it_did_not_measure():
    """Without the peak group there is no fraction of the matmul peak: "-", never "0%"."""
    row = {
        "group": "family",
        "kind": "ours",
        "algo": "maml",
        "batching": "vmap",
        "shape": "omniglot",
    }
    report = {
        "hardware": {"cpu": "x86_64", "threads": 2, "torch": "2"},
        "config": {"meta_batch": 32},
        "results": [row | {"steps": 1, "seconds": 0.5, "peak_memory_mib": 300.0}],
    }
    family_row = next(line for line in markdown(report).splitlines() if line.startswith("| maml"))
    assert "| - | - |" in family_row and "0%" not in family_row


def test_flop_count_of_a_matmul_is_exact():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


@pytest.mark.parametrize(
    ("options", "word"),
    [
        ({"groups": ["speed"]}, "group"),
        ({"algos": ["maml", "snail"]}, "algos"),
        ({"meta_batch": 0}, "meta_batch"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_bench_options_are_refused(options, word):
    with pytest.raises(ConfigError, match=word):
        BenchConfig(**options)


PEAK_WINDOW = """
import torch
from metalearn.hardware import peak_memory_mib, reset_peak_memory

device = torch.device("cpu")
before = reset_peak_memory(device)
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
del block
print(peak_memory_mib(device) - before)
"""


def test_peak_memory_window_sees_a_temporary_allocation():
    # In a fresh process: in this one, earlier tests may leave freed memory resident that the
    # allocation reuses without raising the peak.
    done = subprocess.run(
        [sys.executable, "-c", PEAK_WINDOW], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert 60 < float(done.stdout.split()[-1]) < 200


@pytest.mark.reference("torchvision")
def test_the_pipeline_group_times_the_cache_against_imagefolder(tmp_path):
    cfg = BenchConfig(groups=["pipeline"], min_seconds=0.0, threads=1, out=str(tmp_path))
    report = run_bench(cfg, echo=lambda line: None)
    pipeline = report["pipeline"]
    ours, base = pipeline["results"]["ours"], pipeline["results"]["imagefolder_dataloader"]
    assert pipeline["images_per_batch"] == 4 * 5 * 16 and pipeline["image_size"] == 84
    assert ours["images_per_second"] > 0 and base["images_per_second"] > 0
    assert pipeline["speedup"] == ours["images_per_second"] / base["images_per_second"]
    assert "ImageFolder + DataLoader" in (tmp_path / "bench.md").read_text()
