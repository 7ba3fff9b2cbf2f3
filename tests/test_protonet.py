"""Prototypical Networks: logits on a hand-computed case, and the episode-level contract."""

import torch

from metalearn.algos.metric.protonet import ProtoNet, ProtoNetConfig, prototype_logits
from metalearn.data.tasks import Split, TaskBatch
from metalearn.models.conv4 import Conv4, Conv4Config


def test_logits_are_negative_squared_distances_to_class_means():
    # two classes in 2-D: class 0 at (0,0) and (2,0) -> mean (1,0); class 1 at (0,4) -> mean (0,4)
    support = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]]])
    labels = torch.tensor([[0, 0, 1]])
    query = torch.tensor([[[1.0, 1.0], [3.0, 4.0]]])
    logits = prototype_logits(support, labels, query, ways=2)
    # (1,1): to (1,0) -> 1, to (0,4) -> 1 + 9 = 10; (3,4): to (1,0) -> 4 + 16 = 20, to (0,4) -> 9
    expected = -torch.tensor([[[1.0, 10.0], [20.0, 9.0]]])
    torch.testing.assert_close(logits, expected)


def test_labels_need_not_be_sorted_and_predictions_follow_the_nearest_prototype():
    support = torch.tensor([[[5.0], [0.0], [5.2], [0.2]]])
    labels = torch.tensor([[1, 0, 1, 0]])
    query = torch.tensor([[[4.9], [0.1]]])
    assert prototype_logits(support, labels, query, ways=2).argmax(-1).tolist() == [[1, 0]]


def test_meta_loss_gradient_reaches_the_embedding_and_evaluate_has_one_column():
    torch.manual_seed(0)
    model = Conv4(Conv4Config(hidden=8), (1, 28, 28), 0, fused_batchnorm=True)
    algo = ProtoNet(ProtoNetConfig(), model, "classification", "vmap")
    ways, shots, query = 4, 2, 3
    batch = TaskBatch(
        support=Split(
            torch.rand(2, ways * shots, 1, 28, 28),
            torch.arange(ways).repeat_interleave(shots).expand(2, -1),
        ),
        query=Split(
            torch.rand(2, ways * query, 1, 28, 28),
            torch.arange(ways).repeat_interleave(query).expand(2, -1),
        ),
        ways=ways,
    )
    loss, metrics = algo.meta_loss(batch)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    out = algo.evaluate(batch, [0])
    assert out["loss"].shape == out["score"].shape == (2, 1)
    torch.testing.assert_close(out["loss"].mean(), loss.detach(), rtol=1e-5, atol=1e-6)
    assert 0 <= metrics["score"] <= 1
