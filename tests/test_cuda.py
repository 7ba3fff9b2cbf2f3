"""The CUDA path, on a GPU (skipped without one; `scripts/gpu_check.sh` runs them): the inner
loop and the meta-gradient equal the CPU's in float64, deterministic reruns are identical, and
bf16 autocast, channels-last and torch.compile train to finite numbers.

METALEARN_CUDA_TESTS_ON=cpu runs the same tests on the CPU: a check of the tests themselves
where no GPU is lent (tests/test_gpu_check.py does it)."""

import copy
import json
import os

import pytest
import torch
from conftest import compose_config
from test_bilevel import image_tasks, tiny_conv
from test_gradient_family import BILEVEL, build, outer_grads

from metalearn.build import build_run
from metalearn.cli import train
from metalearn.data.tasks import Split, TaskBatch

pytestmark = pytest.mark.cuda
CUDA = torch.device(os.environ.get("METALEARN_CUDA_TESTS_ON", "cuda"))
SMOKE = ["debug=smoke", f"hardware={CUDA.type}", "trainer.iterations=6", "trainer.eval_every=3"]


def on(batch: TaskBatch, device: torch.device) -> TaskBatch:
    return TaskBatch(
        Split(batch.support.x.to(device), batch.support.y.to(device)),
        Split(batch.query.x.to(device), batch.query.y.to(device)),
        batch.ways,
    )


@pytest.mark.parametrize("name", BILEVEL)
@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_the_meta_gradient_on_cuda_equals_the_cpus_in_float64(name, batching, float64):
    batch = image_tasks()
    cpu_algo = build(name, tiny_conv(), batching=batching)
    gpu_algo = build(name, copy.deepcopy(tiny_conv()).to(CUDA), batching=batching)
    cpu, gpu = outer_grads(cpu_algo, batch), outer_grads(gpu_algo, on(batch, CUDA))
    assert cpu.keys() == gpu.keys() and cpu
    for key in cpu:
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=1e-7, atol=1e-9)
    cpu_eval = cpu_algo.evaluate(batch, [0, 2])["loss"]
    gpu_eval = gpu_algo.evaluate(on(batch, CUDA), [0, 2])["loss"].cpu()
    torch.testing.assert_close(gpu_eval, cpu_eval, rtol=1e-7, atol=1e-9)


def run(overrides: list[str], run_dir) -> dict:
    return train(build_run(compose_config([*SMOKE, *overrides])), run_dir)


def numbers(results: dict) -> tuple:
    return results["test"][results["metric"]], results["test"]["loss"], results["val"]


def test_deterministic_cuda_reruns_are_identical(tmp_path, omniglot_root):
    overrides = ["experiment=maml_omniglot_5w1s", f"data.root={omniglot_root}"]
    overrides += ["hardware.deterministic=true", "trainer.meta_batch_size=4"]
    first = run(overrides, tmp_path / "a")
    second = run(overrides, tmp_path / "b")
    assert first["hardware"]["device"] == CUDA.type and first["hardware"]["deterministic"]
    assert numbers(first) == numbers(second)


@pytest.mark.parametrize(
    "extra",
    [
        ["hardware.precision=bf16"],
        ["hardware.channels_last=true", "hardware.task_batching=loop"],
        ["hardware.compile=true"],
        ["hardware.task_chunk=2", "trainer.meta_batch_size=4"],
    ],
)
def test_cuda_options_train_maml_on_omniglot_to_finite_numbers(extra, tmp_path, omniglot_root):
    overrides = ["experiment=maml_omniglot_5w1s", f"data.root={omniglot_root}", *extra]
    results = run(overrides, tmp_path)
    assert results["hardware"]["device"] == CUDA.type
    assert 0.0 <= results["test"]["accuracy"]["mean"] <= 1.0
    assert json.loads((tmp_path / "results.json").read_text())["test"] == results["test"]
