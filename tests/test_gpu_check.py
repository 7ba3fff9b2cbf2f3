"""scripts/gpu_check.sh, with GPU_CHECK_DEVICE=cpu: every step the GPU run takes (the CUDA-marked
tests, the bench, a timed MAML run and its accuracy line) runs on the CPU at tiny sizes, so the
script is ready when a GPU is lent."""

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_its_steps_on_the_cpu(tmp_path, omniglot_root):
    env = os.environ | {
        "GPU_CHECK_DEVICE": "cpu",
        "GPU_CHECK_MINUTES": "0.02",
        "GPU_CHECK_K": "meta_gradient and fomaml and loop",
        "METALEARN_DATA": str(omniglot_root),
        "OUT": str(tmp_path),
    }
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "1 passed" in (tmp_path / "tests.txt").read_text()
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert {(r["algo"], r["variant"]) for r in bench["results"]} == {
        (algo, variant) for algo in ("maml", "protonet") for variant in ("straightforward", "ours")
    }
    assert "MAML Omniglot 5w1s on" in done.stdout and "test accuracy" in done.stdout
