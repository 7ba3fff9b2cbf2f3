"""Out of memory in second-order MAML (and BMAML with many particles), for real: a subprocess
caps its own address space (RLIMIT_AS) a little above what it holds after building the run,
then meta-trains tasks whose second-order graph needs far more. The allocator fails, and
training stops with an error that names the iteration, the peak memory and the settings that
need less (first order, gradient checkpointing, fewer particles, a smaller meta-batch)."""

import subprocess
import sys
from pathlib import Path

import pytest

resource = pytest.importorskip("resource")  # POSIX

REPO = Path(__file__).resolve().parents[2]
# 64 tasks of 2000 query points through a 1024-wide MLP, 5 second-order inner steps: about
# 64 * 5 * 2 * 2000 * 1024 * 4 bytes = 5 GB of graph, against 1.5 GB of headroom
WORKER = """
import resource, sys
sys.path.insert(0, "tests")
from conftest import compose_config
from metalearn.build import build_run
from metalearn.errors import TrainingError
from metalearn.cli import train

run = build_run(compose_config([
    "debug=smoke", "hardware.threads=1", "trainer.iterations=3", "trainer.meta_batch_size=64",
    "data.shots=20", "data.query=2000", "model.hidden_sizes=[1024,1024]", "algo.inner_steps=5",
    "hardware.task_batching=vmap", *sys.argv[2:],
]))
with open("/proc/self/status") as status:
    held = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmSize:"))
limit = held + 1536 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    train(run, __import__("pathlib").Path(sys.argv[1]))
except TrainingError as error:
    print("TrainingError:", error)
    sys.exit(3)
print("no error")
"""


def out_of_memory(tmp_path: Path, *overrides: str) -> str:
    """Run WORKER with `overrides` under its memory cap; the TrainingError's message."""
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(tmp_path), *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 3, (done.stdout + done.stderr)[-3000:]
    return done.stdout.split("TrainingError: ", 1)[1]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_out_of_memory_in_second_order_maml_names_peak_memory_and_remedies(tmp_path, tally):
    message = out_of_memory(tmp_path)
    assert message.startswith("out of memory at iteration 1 in second-order maml")
    assert "trainer.meta_batch_size=64" in message
    assert "GiB of host memory (peak resident set)" in message
    assert "hardware.task_chunk=32" in message  # half the meta-batch of 64: the same gradient
    for remedy in ("algo.first_order=true", "algo.checkpoint=true", "trainer.meta_batch_size"):
        assert remedy in message
    assert "can't allocate memory" in message  # the allocator's own words, kept
    tally["oom"] += 1


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_out_of_memory_with_many_particles_names_algo_particles(tmp_path, tally):
    """The same tasks through 16 particles of the same network: the advice names the particle
    count and half of it first."""
    message = out_of_memory(tmp_path, "algo=bmaml", "algo.particles=16")
    assert message.startswith("out of memory at iteration 1 in second-order bmaml")
    assert "with algo.particles=16 sets of weights" in message
    assert message.index("algo.particles=8") < message.index("trainer.meta_batch_size=32")
    tally["oom"] += 1
