"""Prototypical Networks: logits on a hand-computed case, and predictions from unsorted labels
(the episode-level contract is test_metric's, for every metric learner)."""

import torch

from metalearn.algos.metric.protonet import prototype_logits


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
