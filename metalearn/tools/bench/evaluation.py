"""`metalearn bench`'s eval group: test episodes per second, metalearn's evaluation against a
straightforward per-episode loop, on the same synthetic episodes.

Two cases, each the one the issue of slow validation named: MAML on Omniglot 5-way 1-shot with
15 queries per class and 3 test steps (scored after 0 and 3, as validation does), and ProtoNet
on Omniglot 20-way 1-shot with 15 queries per class. One timed step is `meta_batch` episodes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalearn.hardware import HardwareConfig, test_batchings
from metalearn.tools.bench.config import BenchConfig
from metalearn.tools.bench.learners import bench_conv4, plain_conv4, synthetic_batch

# algo -> (ways, shots, query, test steps), the episodes validation draws
EPISODES = {"maml": (5, 1, 15, 3), "protonet": (20, 1, 15, 0)}
MAML_INNER_LR = 0.4  # Finn et al.'s Omniglot step size


def eval_cases() -> list[dict]:
    return [
        {"group": "eval", "kind": "eval", "algo": algo, "variant": variant}
        for algo in EPISODES
        for variant in ("straightforward", "ours")
    ]


def eval_step(cfg: BenchConfig, algo: str, variant: str, device: torch.device):
    """`meta_batch` test episodes scored by metalearn's evaluate, or by a plain loop."""
    ways, shots, query, steps = EPISODES[algo]
    batch = synthetic_batch(cfg, "omniglot", device, ways=ways, shots=shots, query=query)
    if algo == "maml":
        return _maml(cfg, batch, steps, variant, device)
    return _protonet(batch, variant, device)


def _maml(cfg: BenchConfig, batch, steps: int, variant: str, device):
    from metalearn.algos.bilevel.maml import MAML, MAMLConfig

    if variant == "straightforward":
        model = bench_conv4(cfg, "omniglot", batch.ways, True, device)
        return lambda: _adapt_each_episode(model, batch, steps)
    # as build.py sets it up: training tasks (1 query per class) under vmap with the primitive
    # BatchNorm, test tasks batched as hardware.task_batching=auto picks for their size
    model = bench_conv4(cfg, "omniglot", batch.ways, False, device)
    algo_cfg = MAMLConfig(inner_lr=MAML_INNER_LR, inner_steps=1, test_inner_steps=steps)
    algo = MAML(algo_cfg, model, "classification", "vmap")
    shape = EPISODES["maml"][:3]  # (ways, shots, query)
    algo.adapt_batching, algo.test_batching = test_batchings(HardwareConfig(), device, True, shape)
    return lambda: algo.evaluate(batch, [0, steps])


def _adapt_each_episode(model: nn.Module, batch, steps: int) -> None:
    """Per episode: SGD steps from the trained weights with torch.autograd.grad (no graph kept
    across steps), the query scored before and after, as a hand-written evaluation does."""
    start = dict(model.named_parameters())
    for t in range(batch.tasks):
        params = {k: v.detach().requires_grad_() for k, v in start.items()}
        with torch.no_grad():
            functional_call(model, params, (batch.query.x[t],)).argmax(-1)
        for _ in range(steps):
            loss = F.cross_entropy(
                functional_call(model, params, (batch.support.x[t],)), batch.support.y[t]
            )
            grads = torch.autograd.grad(loss, list(params.values()))
            params = {
                k: (v - MAML_INNER_LR * g).detach().requires_grad_()
                for (k, v), g in zip(params.items(), grads, strict=True)
            }
        with torch.no_grad():
            functional_call(model, params, (batch.query.x[t],)).argmax(-1)


def _protonet(batch, variant: str, device):
    from metalearn.algos.metric.protonet import ProtoNet, ProtoNetConfig
    from metalearn.models.conv4 import Conv4, Conv4Config

    torch.manual_seed(0)
    if variant == "straightforward":
        net = plain_conv4().to(device)
        return lambda: _embed_each_episode(net, batch)
    config = Conv4Config(hidden=64, downsample="maxpool")
    model = Conv4(config, (1, 28, 28), 0, fused_batchnorm=True).to(device)
    algo = ProtoNet(ProtoNetConfig(), model, "classification", "loop")
    return lambda: algo.evaluate(batch, [0])


def _embed_each_episode(net: nn.Module, batch) -> None:
    """Per episode: support and query embedded together (the same transductive BatchNorm as
    metalearn's), squared distances to the class means, the arg-max."""
    ways = batch.ways
    with torch.no_grad():
        for t in range(batch.tasks):
            support = batch.support.x[t]
            z = net(torch.cat([support, batch.query.x[t]]))
            prototypes = z[: len(support)].view(ways, -1, z.shape[-1]).mean(1)
            (-(torch.cdist(z[len(support) :], prototypes) ** 2)).argmax(-1)
