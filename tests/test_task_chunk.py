"""hardware.task_chunk: a meta-batch meta-trained a chunk of tasks at a time gives the whole
meta-batch's gradient, loss and metrics; a chunk that does not divide it, or a learner without
tasks to split, is refused at start-up."""

import pytest
import torch
from conftest import compose_config

from metalearn.build import build_run
from metalearn.errors import ConfigError
from metalearn.train.loop import _backward_passes

SMOKE = ["debug=smoke", "hardware.threads=1", "trainer.meta_batch_size=6"]


def gradients_and_metrics(overrides: list[str]) -> tuple[dict, torch.Tensor, dict]:
    run = build_run(compose_config([*SMOKE, *overrides]))
    batch = run.tasks.sample("train", torch.Generator().manual_seed(0), 6, *run.train_shape)
    (loss, metrics), *more = list(_backward_passes(run, batch, iteration=0))
    assert not more  # one outer step
    grads = {n: p.grad.clone() for n, p in run.model.named_parameters()}
    return grads, loss.detach(), {k: torch.as_tensor(v).float() for k, v in metrics.items()}


@pytest.mark.parametrize("learner", ["maml_sinusoid", "protonet_omniglot"])
def test_chunks_give_the_whole_meta_batch_gradient(learner, request):
    extra = []  # MAML on sinusoid (vmap over tasks, second order)
    if learner == "protonet_omniglot":  # BatchNorm over each task's own batch
        root = request.getfixturevalue("omniglot_root")
        extra = ["experiment=protonet_omniglot_5w1s", f"data.root={root}", "model.hidden=8"]
        extra += ["algo.train_ways=5", "algo.train_query=2"]
    whole = gradients_and_metrics(extra)
    for chunk in (1, 2, 3):
        chunked = gradients_and_metrics([*extra, f"hardware.task_chunk={chunk}"])
        for name in whole[0]:
            torch.testing.assert_close(chunked[0][name], whole[0][name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(chunked[1], whole[1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(chunked[2]["score"], whole[2]["score"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["hardware.task_chunk=4"], ["does not divide trainer.meta_batch_size=6", "[1, 2, 3]"]),
        (["hardware.task_chunk=0"], ["hardware.task_chunk must be a positive"]),
        (["algo=rl2", "data=bandit", "hardware.task_chunk=2"], ["trials", "task_chunk=null"]),
    ],
)
def test_a_task_chunk_that_cannot_split_the_meta_batch_is_refused(overrides, words):
    with pytest.raises(ConfigError) as error:
        build_run(compose_config([*SMOKE, *overrides]))
    for word in words:
        assert word in str(error.value)
