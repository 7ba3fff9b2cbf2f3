"""torchrun with 2 CPU processes (gloo) against the single-process run: the same meta-gradient,
the same parameters after training and after a resume across ranks, the same results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalearn.distributed import SINGLE
from metalearn.records import checkpoint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_worker import compose_run, meta_gradient  # noqa: E402

TINY_MAML = [
    "experiment=maml_omniglot_5w1s",
    "debug=smoke",
    "hardware.threads=1",
    "trainer.meta_batch_size=4",
    "eval.episodes=4",
    "eval.val_episodes=4",
    "data.query=2",
]


# A conv bias right before BatchNorm has a meta-gradient of zero up to round-off (the norm
# subtracts it again); Adam divides that round-off by its own size, so these biases wander by
# about the learning rate whatever the process count. The gradient test above covers them.
BIAS_BEFORE_BATCHNORM = {f"features.{i}.bias" for i in (0, 3, 6, 9)}


def torchrun(args: list[str], env: dict, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}"]
    command += ["--standalone", *args]  # a free port of its own, so tests never collide
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture
def env(omniglot_root: Path, tmp_path: Path) -> dict:
    return os.environ | {
        "METALEARN_DATA": str(omniglot_root),
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmp_path / "scratch"),  # where ranks > 0 keep Hydra's files
    }


@pytest.mark.parametrize(
    "overrides",
    [TINY_MAML, ["algo=maml", "data=sinusoid", "trainer.meta_batch_size=6"]],
    ids=["maml-omniglot", "maml-sinusoid"],
)
def test_two_ranks_all_reduce_the_single_process_meta_gradient(overrides, env, tmp_path):
    (tmp_path / "scratch").mkdir()
    out = tmp_path / "grads.pt"
    torchrun(["tests/distributed_worker.py", str(out), *overrides], env)
    two = torch.load(out, weights_only=True)
    assert two["world"] == 2
    torch.manual_seed(0)
    one = meta_gradient(compose_run(overrides), SINGLE)  # the whole meta-batch in one process
    assert one.keys() == two["grads"].keys() and one
    for name, grad in one.items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # a sum instead of a mean, or one rank's share alone, would be far off
    assert max(g.abs().max().item() for g in one.values()) > 1e-3


def _train(run_dir: Path, env: dict, extra: list[str], processes: int) -> dict:
    args = ["train", *TINY_MAML, f"hydra.run.dir={run_dir}", *extra]
    if processes == 1:
        command = [sys.executable, "-m", "metalearn.cli", *args]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        torchrun(["-m", "metalearn.cli", *args], env, processes)
    return json.loads((run_dir / "results.json").read_text())


def _weights(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / "checkpoints" / "last.pt")["algo_state"]


def test_torchrun_training_and_resume_equal_the_single_process_run(env, tmp_path):
    (tmp_path / "scratch").mkdir()
    one = _train(tmp_path / "one", env, [], processes=1)
    two = _train(tmp_path / "two", env, [], processes=2)
    # resumed across ranks: 2 iterations, killed-and-restarted as a fresh torchrun, 2 more
    _train(tmp_path / "resumed", env, ["trainer.iterations=2"], processes=2)
    resumed = _train(tmp_path / "resumed", env, ["trainer.resume=true"], processes=2)
    for other, run_dir in ((two, "two"), (resumed, "resumed")):
        assert other["train"]["iterations"] == one["train"]["iterations"] == 4
        for split in ("val", "test"):
            assert other[split]["accuracy"]["mean"] == pytest.approx(
                one[split]["accuracy"]["mean"], abs=1e-6
            )
            assert other[split]["loss"]["mean"] == pytest.approx(
                one[split]["loss"]["mean"], rel=1e-4
            )
        theirs, ours = _weights(tmp_path / run_dir), _weights(tmp_path / "one")
        for name, value in ours["model"].items():
            if name in BIAS_BEFORE_BATCHNORM:
                continue
            torch.testing.assert_close(theirs["model"][name], value, rtol=1e-4, atol=1e-5)
    # rank 0 alone wrote the run directory; the other rank's scratch folder is gone
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    assert list((tmp_path / "scratch").glob("metalearn-rank*")) == []
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if "train/loss" in json.loads(line)] == [
        1,
        2,
        3,
        4,
    ]


def test_torchrun_refuses_a_meta_batch_that_does_not_split(env, tmp_path):
    (tmp_path / "scratch").mkdir()
    args = ["-m", "metalearn.cli", "train", "debug=smoke", "trainer.meta_batch_size=3"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    done = subprocess.run(
        [*command, "--standalone", *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "trainer.meta_batch_size=3 does not split evenly across 2 processes" in done.stderr
