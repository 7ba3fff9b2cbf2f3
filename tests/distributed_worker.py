"""Run under torchrun by test_distributed.py: one meta-gradient of a rank's share of the
meta-batch, all-reduced, saved by rank 0.

Usage: torchrun --nproc-per-node 2 tests/distributed_worker.py OUT.pt override ...
"""

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from metalearn import distributed
from metalearn.build import build_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def meta_gradient(run, group) -> dict[str, torch.Tensor]:
    """The (group-averaged) meta-gradient of the run's first training meta-batch."""
    size = run.config.trainer.meta_batch_size
    generator = torch.Generator(run.device).manual_seed(run.config.seed)
    batch = run.tasks.sample("train", generator, size, *run.train_shape)
    loss, _ = run.algo.meta_loss(group.shard(batch, size), 0)
    loss.backward()
    params = [p for p in run.algo.parameters() if p.requires_grad]
    group.average_gradients(params, loss.detach().reshape(1))
    return {str(i): p.grad.clone() for i, p in enumerate(params) if p.grad is not None}


def compose_run(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose("train", overrides=overrides)
    return build_run(OmegaConf.to_container(cfg, resolve=True))


if __name__ == "__main__":
    out, overrides = sys.argv[1], sys.argv[2:]
    group = distributed.init("cpu")
    torch.manual_seed(0)
    grads = meta_gradient(compose_run(overrides), group)
    if group.main:
        torch.save({"world": group.world, "grads": grads}, out)
    distributed.shutdown()
