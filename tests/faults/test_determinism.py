"""The same seed gives the same numbers: two runs of one config, and a run stopped and resumed,
write identical metrics and results on the CPU (wall times and throughput aside), on sinusoid
and on real Omniglot; hardware.deterministic=true turns on PyTorch's deterministic kernels."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config

from metalearn.build import build_run
from metalearn.cli import train

REPO = Path(__file__).resolve().parents[2]
SINUSOID = ["debug=smoke", "hardware.threads=1", "trainer.iterations=8", "trainer.eval_every=4"]


@pytest.fixture
def omniglot(omniglot_root: Path) -> list[str]:
    return [
        "algo=maml",
        "data=omniglot",
        f"data.root={omniglot_root}",
        "debug=smoke",
        "hardware.threads=1",
        "trainer.iterations=8",
        "trainer.eval_every=4",
        "trainer.meta_batch_size=2",
        "eval.episodes=4",
        "eval.val_episodes=2",
    ]


def numbers(run_dir: Path) -> tuple[dict, list[dict]]:
    """results.json and metrics.jsonl, less wall times and throughput."""
    results = json.loads((run_dir / "results.json").read_text())
    results["train"] = {k: v for k, v in results["train"].items() if "second" not in k}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return results, [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def run(run_dir: Path, overrides: list[str], *extra: str) -> None:
    train(build_run(compose_config([*overrides, *extra])), run_dir)


@pytest.mark.parametrize("base", ["sinusoid", "omniglot"])
def test_same_seed_same_numbers_across_runs_and_across_resume(base, tmp_path, request, tally):
    overrides = SINUSOID if base == "sinusoid" else request.getfixturevalue("omniglot")
    run(tmp_path / "a", overrides)
    run(tmp_path / "b", overrides)
    assert numbers(tmp_path / "a") == numbers(tmp_path / "b")
    tally["determinism"] += 1
    whole = [o for o in overrides if not o.startswith("trainer.iterations=")]
    run(tmp_path / "c", whole, "trainer.iterations=4")
    run(tmp_path / "c", whole, "trainer.iterations=8", "trainer.resume=true")
    assert numbers(tmp_path / "c") == numbers(tmp_path / "a")
    tally["determinism"] += 1
    other = tmp_path / "seed1"
    run(other, overrides, "seed=1")
    assert numbers(other)[0]["test"] != numbers(tmp_path / "a")[0]["test"]  # the seed matters


def test_hardware_deterministic_turns_on_deterministic_kernels(tmp_path, tally):
    """In a subprocess: the switch is process-wide, and must not leak into other tests."""
    runs = []
    for name in ("a", "b"):
        done = subprocess.run(
            [sys.executable, "-m", "metalearn.cli", "train", *SINUSOID]
            + ["hardware.deterministic=true", f"hydra.run.dir={tmp_path / name}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(numbers(tmp_path / name))
    assert runs[0] == runs[1]
    assert runs[0][0]["hardware"]["deterministic"] is True
    tally["determinism"] += 1
