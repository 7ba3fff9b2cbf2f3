"""`metalearn bench`'s steps: one meta-iteration of each implementation that is timed.

`metalearn bench`: meta-training speed and peak memory, side by side with reference code.

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

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algos import ALGOS
from metalearn.data.tasks import EpisodeSampler, Split, TaskBatch
from metalearn.hardware import (
    synchronize,
)
from metalearn.tools.bench.config import SHAPES, BenchConfig


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


def bench_conv4(cfg: BenchConfig, shape: str, out: int, fused: bool, device) -> nn.Module:
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
    task_chunk: int | None = None,
):
    """One meta-iteration of metalearn's algorithm, exactly as the trainer runs it (with
    `compiled`, as build.py sets up hardware.compile=true; with `task_chunk`, one backward pass
    per chunk of tasks, as hardware.task_chunk)."""
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
    model = bench_conv4(cfg, shape, cfg.ways, fused_batchnorm_is_exact(algo_cls, batching), device)
    algo = algo_cls(algo_cfg, model, "classification", batching)
    if compiled:
        compile_training(algo, batching)
    optimizer = outer_optimizer(algo_cfg, algo)
    batch = synthetic_batch(cfg, shape, device)

    chunk = task_chunk or batch.tasks

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, batch.tasks, chunk):
            objective, _ = algo.meta_loss(batch[start : start + chunk])
            (objective * (chunk / batch.tasks)).backward()
        optimizer.step()

    return step


def learn2learn_step(cfg: BenchConfig, first_order: bool, shape: str, steps: int, device):
    """learn2learn's MAML, written as its examples do, on the same network and data."""
    import learn2learn as l2l

    model = bench_conv4(cfg, shape, cfg.ways, True, device)  # native BatchNorm: exact without vmap
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


def plain_conv4() -> nn.Module:
    """The references' network: nn.Sequential conv4 with nn.BatchNorm2d (batch statistics in
    train mode) and nn.MaxPool2d, flattened."""

    def block(c_in: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(1), *block(64), *block(64), *block(64), nn.Flatten())


def _straightforward_protonet(batch: TaskBatch, device):
    """The reference: plain_conv4, torch.cdist, one episode."""
    net = plain_conv4().to(device)
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
