"""The episodic sampler: task shapes, labels, disjointness and fixed, seeded episodes."""

import pytest
import torch

from metalearn.data.sinusoid import SinusoidConfig, SinusoidTasks
from metalearn.data.tasks import EpisodeSampler
from metalearn.errors import DataError

CLASSES, EXAMPLES = 12, 6


@pytest.fixture
def sampler() -> EpisodeSampler:
    # pixel (0, 0) encodes the class and pixel (0, 1) the example, so tasks can be decoded
    images = torch.zeros(CLASSES, EXAMPLES, 1, 4, 4, dtype=torch.uint8)
    images[:, :, 0, 0, 0] = torch.arange(CLASSES)[:, None]
    images[:, :, 0, 0, 1] = torch.arange(EXAMPLES)[None, :]
    return EpisodeSampler(images, torch.device("cpu"))


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codes = (x[..., 0, 0, :2] * 255).round().long()
    return codes[..., 0], codes[..., 1]  # class, example


def test_task_shapes_labels_and_disjoint_support_and_query(sampler):
    g = torch.Generator().manual_seed(0)
    batch = sampler.sample(g, tasks=50, ways=5, shots=2, query=3)
    assert batch.support.x.shape == (50, 10, 1, 4, 4) and batch.query.x.shape == (50, 15, 1, 4, 4)
    assert batch.support.x.dtype == torch.float32 and batch.support.x.max() <= 1
    s_class, s_example = decode(batch.support.x)
    q_class, q_example = decode(batch.query.x)
    for t in range(50):
        # a label is one class within a task, and the classes of a task are distinct
        label_to_class = {}
        for label, cls in zip(
            batch.support.y[t].tolist() + batch.query.y[t].tolist(),
            s_class[t].tolist() + q_class[t].tolist(),
            strict=True,
        ):
            assert label_to_class.setdefault(label, cls) == cls
        assert len(set(label_to_class.values())) == 5 and sorted(label_to_class) == list(range(5))
        assert torch.bincount(batch.support.y[t]).tolist() == [2] * 5
        assert torch.bincount(batch.query.y[t]).tolist() == [3] * 5
        support = set(zip(s_class[t].tolist(), s_example[t].tolist(), strict=True))
        query = set(zip(q_class[t].tolist(), q_example[t].tolist(), strict=True))
        assert len(support) == 10 and len(query) == 15 and not support & query


def test_labels_are_shuffled_per_task(sampler):
    batch = sampler.sample(torch.Generator().manual_seed(1), tasks=200, ways=3, shots=1, query=1)
    cls, _ = decode(batch.support.x)
    # the class that gets label 0 varies from task to task, and every class is drawn
    assert len(set(cls[:, 0].tolist())) > 6
    assert set(cls.flatten().tolist()) == set(range(CLASSES))


def test_fixed_episodes_do_not_depend_on_the_batch_size(sampler):
    a = list(sampler.episodes(20, 4, 1, 2, seed=7, batch_size=3))
    b = list(sampler.episodes(20, 4, 1, 2, seed=7, batch_size=20))
    c = list(sampler.episodes(20, 4, 1, 2, seed=8, batch_size=20))
    xa = torch.cat([e.query.x for e in a])
    torch.testing.assert_close(xa, b[0].query.x)
    assert not torch.equal(xa, c[0].query.x)


def test_impossible_tasks_are_refused_with_the_numbers(sampler):
    with pytest.raises(DataError, match="13-way tasks need 13 classes but the train split has 12"):
        sampler.check("train", 13, 1, 1)
    with pytest.raises(DataError, match="4 \\+ 3 = 7 examples per class.*has 6 per class"):
        sampler.check("test", 5, 4, 3)
    sampler.check("test", 12, 3, 3)


def test_sinusoid_tasks_follow_the_maml_family():
    tasks = SinusoidTasks(SinusoidConfig(), torch.device("cpu"))
    batch = tasks.sample("train", torch.Generator().manual_seed(0), 2000, 1, 10, 10)
    amplitude, phase = batch.info["amplitude"], batch.info["phase"]
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0 and amplitude.std() > 1
    assert 0 <= phase.min() and phase.max() <= torch.pi
    assert batch.support.x.abs().max() <= 5 and batch.support.x.shape == (2000, 10, 1)
    want = amplitude[:, None, None] * torch.sin(batch.query.x - phase[:, None, None])
    torch.testing.assert_close(batch.query.y, want)
    fixed = [b.support.x for b in tasks.episodes("test", 10, 1, 5, 10, seed=3, batch_size=4)]
    again = [b.support.x for b in tasks.episodes("test", 10, 1, 5, 10, seed=3, batch_size=10)]
    torch.testing.assert_close(torch.cat(fixed), again[0])


def test_classes_of_different_sizes_are_sampled_within_each_class():
    counts = torch.tensor([3, 7, 5, 4])
    owner = torch.repeat_interleave(torch.arange(4), counts)  # image i belongs to class owner[i]
    position = torch.cat([torch.arange(int(c)) for c in counts])
    images = (owner * 16 + position).to(torch.uint8).view(-1, 1, 1, 1)  # value = 16 c + e
    sampler = EpisodeSampler(images, torch.device("cpu"), counts)
    assert (sampler.classes, sampler.examples_per_class, sampler.fewest_examples) == (4, 7, 3)
    with pytest.raises(DataError, match="has 3 in its smallest class"):
        sampler.check("train", 2, 2, 2)
    seen = set()
    for seed in range(30):
        batch = sampler.sample(torch.Generator().manual_seed(seed), 2, 4, 1, 2)
        values = torch.cat([batch.support.x, batch.query.x], 1).mul(255).round().long().flatten(1)
        labels = torch.cat([batch.support.y, batch.query.y], 1)
        for task_values, task_labels in zip(values, labels, strict=True):
            for label in range(4):
                drawn = task_values[task_labels == label]
                classes = drawn // 16
                assert (classes == classes[0]).all() and len(set(drawn.tolist())) == 3
                assert (drawn % 16 < counts[classes[0]]).all()
                seen.update(drawn.tolist())
    assert len(seen) == int(counts.sum())  # every example of every class gets drawn
    batch = sampler.sample_labelled(torch.Generator().manual_seed(0), 200)
    assert torch.equal(batch.x.flatten().mul(255).round().long() // 16, batch.y)
