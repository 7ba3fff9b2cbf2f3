"""Meta-LSTM (algo=metalstm): one update against a hand-written meta-LSTM cell, the meta-gradient
reaching every meta-weight, non-transductive testing, and a short real run on Omniglot."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config

from metalearn.algos.optimizers.metalstm import preprocess
from metalearn.build import build_run
from metalearn.data.tasks import Split

TINY = ["debug=smoke", "hardware.threads=1", "model.hidden=4", "experiment=metalstm_omniglot_5w1s"]


@pytest.fixture
def run(omniglot_root):
    return build_run(compose_config([*TINY, f"data.root={omniglot_root}", "algo.updates=2"]))


def one_task(run):
    batch = run.tasks.sample("train", torch.Generator().manual_seed(0), 1, 5, 1, 3)
    return batch, Split(batch.support.x[0], batch.support.y[0])


def test_preprocessing_is_the_papers():
    """(log|x| / p, sign x) above e^-p, (-1, e^p x) below (Andrychowicz et al. 2016)."""
    x = torch.tensor([2.0, -0.5, 1e-6, -1e-6, 0.0])
    out = preprocess(x, 10.0)
    torch.testing.assert_close(out[:2, 0], torch.log(torch.tensor([2.0, 0.5])) / 10)
    torch.testing.assert_close(out[:2, 1], torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(out[2:, 0], torch.tensor([-1.0, -1.0, -1.0]))
    torch.testing.assert_close(out[2:, 1], math.exp(10) * x[2:])


@pytest.mark.usefixtures("float64")
def test_one_update_equals_a_hand_written_meta_lstm_cell(run):
    """theta_1 from the learner's code path against the paper's equations written out."""
    algo, m = run.algo, run.algo.meta
    _, support = one_task(run)
    support = Split(support.x.double(), support.y)
    theta, _ = algo._adapt(support, 1)
    # by hand: the loss and gradient at c_I, the LSTM's gates, the meta-LSTM cell
    c0 = m.c_init.detach().clone().requires_grad_()
    loss = F.cross_entropy(algo._forward(c0, support.x), support.y)
    (g,) = torch.autograd.grad(loss, c0)
    g = g / len(support.y)
    n = c0.numel()
    x = torch.cat([preprocess(loss.detach(), 10.0).expand(n, 2), preprocess(g, 10.0)], 1)
    gates = x @ m.lstm.weight_ih.T + m.lstm.bias_ih + m.lstm.bias_hh  # h0 = 0
    i, f, cand, o = gates.chunk(4, dim=1)
    cell = torch.sigmoid(i) * torch.tanh(cand)  # c0 = 0
    h = torch.sigmoid(o) * torch.tanh(cell)
    zero = torch.zeros(n, 1, dtype=torch.float64)
    f_gate = torch.cat([h, c0.detach()[:, None], zero], 1) @ m.w_f + m.b_f
    i_gate = torch.cat([h, c0.detach()[:, None], zero], 1) @ m.w_i + m.b_i
    expected = torch.sigmoid(f_gate) * c0.detach() - torch.sigmoid(i_gate) * g
    torch.testing.assert_close(theta, expected, rtol=1e-10, atol=1e-12)


def test_the_meta_gradient_reaches_every_meta_weight(run):
    batch, _ = one_task(run)
    loss, metrics = run.algo.meta_loss(batch)
    loss.backward()
    for name, p in run.algo.meta.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert 0 <= metrics["score"] <= 1


def test_a_query_is_classified_alone(run):
    """Test queries are normalised with the support steps' running statistics: one query's
    logits do not depend on the others in its batch (not transductive)."""
    batch, support = one_task(run)
    queries = batch.query.x[0]
    together = run.algo.predict(support, queries)
    alone = torch.cat([run.algo.predict(support, q[None]) for q in queries])
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-5)


def test_a_short_run_trains_validates_and_tests(omniglot_root, tmp_path):
    from metalearn.cli import train

    overrides = [*TINY, f"data.root={omniglot_root}", "algo.updates=2", "trainer.iterations=4"]
    results = train(build_run(compose_config(overrides)), tmp_path)
    assert 0 <= results["test"]["accuracy"]["mean"] <= 1
    assert (tmp_path / "checkpoints" / "best.pt").is_file()
