"""Every published protocol on the image benchmarks has its benchmark's image size (test_configs
builds it at that size on a fixture in the real on-disk format), and runs one training step and
one evaluation batch."""

import pytest
import torch
from conftest import CONFIGS, compose_config
from test_configs import SMOKE, load_yaml

from metalearn.build import build_run
from metalearn.evaluate import run_episodes
from metalearn.train.schedule import outer_optimizer

ALL = {"maml", "protonet", "matchingnet", "relationnet", "metaoptnet_svm", "metaoptnet_ridge",
       "baseline", "baselinepp", "rfs"}  # fmt: skip
# benchmark -> (its image size, the algorithms whose published protocols it must have)
BENCHMARKS = {
    "miniimagenet": (84, ALL),
    "tieredimagenet": (84, ALL),
    "cifarfs": (32, ALL),
    "fc100": (32, ALL),
    "cub": (84, {"maml", "protonet", "matchingnet", "relationnet", "baselinepp"}),
}
EXPERIMENTS = sorted(
    p.stem for p in (CONFIGS / "experiment").glob("*.yaml") if p.stem.split("_")[-2] in BENCHMARKS
)
# The step runs at a reduced size so that the suite stays fast on 2 CPU cores (ResNet-12 on
# 84x84 images costs about 7 GFLOP per image); the build above it is at the protocol's size.
SMALL = ["data.image_size=20"]
SMALL_MODEL = {"resnet12": ["model.widths=[8,8,8,8]"], "conv4": ["model.hidden=8"]}


def test_each_benchmark_has_the_protocols_of_every_algorithm():
    for benchmark, (_, algos) in BENCHMARKS.items():
        for algo in algos:
            for shots in (1, 5):
                assert f"{algo}_{benchmark}_5w{shots}s" in EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_protocol_builds_and_takes_a_step(experiment: str, data_root):
    preset = load_yaml(CONFIGS / "experiment" / f"{experiment}.yaml")
    data = next(e["override /data"] for e in preset["defaults"] if "override /data" in e)
    overrides = [f"experiment={experiment}", *SMOKE, f"data.root={data_root(data)}"]
    # test_configs builds every experiment at its own size; here the size is the benchmark's
    size = BENCHMARKS[data][0]
    assert compose_config(overrides)["data"]["image_size"] == size
    small = compose_config([*overrides, *SMALL])
    small_model = SMALL_MODEL[small["model"]["name"]]
    run = build_run(compose_config([*overrides, *SMALL, *small_model]))
    assert run.tasks.in_shape == (3, 20, 20)  # colour images, at the size asked for
    optimizer = outer_optimizer(run.config.algo, run.algo)
    generator = torch.Generator().manual_seed(0)
    if run.algo.pretrains:
        batch = run.tasks.sample_labelled("train", generator, 8)
    else:
        batch = run.tasks.sample("train", generator, 2, *run.train_shape)
    before = [p.detach().clone() for p in run.algo.parameters()]
    loss, _ = run.algo.meta_loss(batch)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, run.algo.parameters(), strict=True))
    ways, shots, query = run.test_shape
    out = run_episodes(
        run, "val", episodes=2, ways=ways, shots=shots, query=query, steps=[run.test_steps]
    )
    assert out["score"].shape == (2, 1) and torch.isfinite(out["loss"]).all()
