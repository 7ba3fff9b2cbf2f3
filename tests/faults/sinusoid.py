"""The run most fault tests train: MAML on sinusoid, validated and checkpointed every 5
iterations, on tiny episodes (a second or two a run)."""

from pathlib import Path

from conftest import compose_config

from metalearn.build import build_run
from metalearn.cli import train
from metalearn.run import Run

SINUSOID = [
    "debug=smoke",
    "hardware.threads=1",
    "trainer.eval_every=5",
    "eval.episodes=10",
    "eval.val_episodes=4",
    "eval.shots=[]",
    "eval.steps=[]",
]


def build(*extra: str) -> Run:
    return build_run(compose_config([*SINUSOID, *extra]))


def run(run_dir: Path, *extra: str) -> dict:
    """Train into run_dir; results.json's dict."""
    return train(build(*extra), run_dir)
