"""Black-box sequence learners: the fast paths equal their definitions, queries stay apart, and
each learns real Omniglot tasks from a few iterations."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config

from metalearn.algos.blackbox.cores import CORES
from metalearn.algos.blackbox.sequence import SequenceConfig, instance_accuracies
from metalearn.build import build_run
from metalearn.data.tasks import Split
from metalearn.errors import ConfigError, DataError
from metalearn.train.schedule import outer_optimizer

NAMES = ["mann", "lstm", "snail", "icl_transformer"]


def task_inputs(tasks=3, shots=5, queries=7, dim=12, ways=5):
    g = torch.Generator().manual_seed(0)
    support = torch.randn(tasks, shots, dim, generator=g, dtype=torch.float64)
    labels = F.one_hot(torch.arange(shots) % ways, ways).double().expand(tasks, -1, -1)
    query = torch.randn(tasks, queries, dim, generator=g, dtype=torch.float64)
    return support, labels, query


SMALL = {"hidden": 16, "layers": 2, "heads": 2, "key_size": 8, "value_size": 4}
SMALL |= {"memory_slots": 16, "memory_width": 8, "read_heads": 2}


def core(name: str, dim: int = 12, ways: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return CORES[name](SequenceConfig(name=name, **SMALL), dim + ways, ways).double()


def test_snail_queries_at_the_support_end_equal_one_full_sequence_per_query():
    snail = core("snail")
    support, labels, query = task_inputs()
    fast = snail(support, labels, query)  # (T, M, N)
    sequences = torch.cat(
        [
            torch.cat([support, labels], -1).repeat_interleave(query.shape[1], 0),
            torch.cat([query, torch.zeros_like(query[..., :5])], -1).flatten(0, 1)[:, None],
        ],
        1,
    ).transpose(1, 2)  # (T*M, C, S + 1): the paper's sequences
    for block in snail.blocks:
        sequences = block(sequences)
    reference = snail.out(sequences[:, :, -1]).view(fast.shape)
    assert torch.allclose(fast, reference, atol=1e-12)


def test_lstm_queries_equal_one_more_lstm_step_after_the_support_set():
    mann = core("lstm")
    support, labels, query = task_inputs()
    fast = mann(support, labels, query)
    previous = F.pad(labels[:, :-1], (0, 0, 1, 0))  # (x_t, y_{t-1})
    for t in range(query.shape[0]):
        for m in range(query.shape[1]):
            steps = torch.cat([support[t], previous[t]], -1)
            last = torch.cat([query[t, m], labels[t, -1]])[None]
            out, _ = mann.lstm(torch.cat([steps, last])[None])
            assert torch.allclose(fast[t, m], mann.out(out[0, -1]), atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_a_query_never_sees_another_query(name: str):
    model = core(name)
    support, labels, query = task_inputs()
    base = model(support, labels, query)
    changed = query.clone()
    changed[:, 0] += 10.0
    out = model(support, labels, changed)
    assert torch.allclose(out[:, 1:], base[:, 1:], atol=1e-10)
    assert not torch.allclose(out[:, 0], base[:, 0])


@pytest.mark.parametrize("name", NAMES)
def test_the_support_labels_drive_the_predictions(name: str):
    model = core(name)
    support, labels, query = task_inputs()
    swapped = labels[:, [1, 0, 2, 3, 4]]
    assert not torch.allclose(model(support, labels, query), model(support, swapped, query))


def matching_tasks(g: torch.Generator, ways: int, tasks=32, queries=10, dim=16):
    """A tiny task family: each query is a noisy copy of one support item; its label is that
    item's (random) label. A learner must bind items to labels in context and match."""
    support = torch.randn(tasks, ways, dim, generator=g)
    order = torch.rand(tasks, ways, generator=g).argsort(1)  # support item i has label order[i]
    qy = torch.randint(0, ways, (tasks, queries), generator=g)
    item = order.argsort(1).gather(1, qy)  # which support item carries label qy
    noise = 0.3 * torch.randn(tasks, queries, dim, generator=g)
    query = support.gather(1, item[..., None].expand(-1, -1, dim)) + noise
    return support, F.one_hot(order, ways).float(), query, qy


@pytest.mark.parametrize(
    ("name", "ways", "lr", "steps"),
    [
        ("mann", 2, 1e-2, 300),
        ("lstm", 2, 1e-2, 300),
        ("snail", 5, 3e-3, 200),
        ("icl_transformer", 5, 3e-3, 300),
    ],
)
def test_the_loss_falls_on_a_tiny_task_family(name: str, ways: int, lr: float, steps: int):
    """Chance is ln(ways) (1.61 at 5 ways, 0.69 at 2); each core gets far below it in seconds.
    (The recurrent learners, which must hold each example until its label arrives, are the
    slowest to learn, as in Santoro et al.'s comparison: they get the 2-way family.)"""
    torch.manual_seed(0)
    cfg = SequenceConfig(name=name, **(SMALL | {"hidden": 64, "key_size": 16, "value_size": 8}))
    cfg.max_length, cfg.memory_slots, cfg.memory_width = 8, 32, 16
    model = CORES[name](cfg, 16 + ways, ways)
    optimizer = torch.optim.Adam(model.parameters(), lr)
    g, losses = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        support, labels, query, qy = matching_tasks(g, ways)
        loss = F.cross_entropy(model(support, labels, query).flatten(0, 1), qy.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[:10]) / 10 > 0.9 * math.log(ways)
    assert sum(losses[-20:]) / 20 < 0.3 * math.log(ways), losses[-20:]


@pytest.mark.parametrize("name", NAMES)
def test_each_learner_trains_and_tests_on_real_omniglot_episodes(name: str, omniglot_root):
    overrides = [f"experiment={name}_omniglot_5w1s", "debug=smoke", "hardware.threads=1"]
    overrides += [f"data.root={omniglot_root}", "model.hidden=16", "data.query=3"]
    run = build_run(compose_config(overrides))
    optimizer = outer_optimizer(run.config.algo, run.algo)
    batch = run.tasks.sample("train", torch.Generator().manual_seed(0), 2, *run.train_shape)
    before = [p.detach().clone() for p in run.algo.parameters()]
    loss, metrics = run.algo.meta_loss(batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    moved = [not torch.equal(a, p) for a, p in zip(before, run.algo.parameters(), strict=True)]
    assert all(moved[: len(list(run.model.parameters()))]) and any(moved[-3:])  # body and core
    (episodes,) = run.tasks.episodes("test", 4, 5, 1, 3, seed=0, batch_size=4)
    out = run.algo.evaluate(episodes, [0])
    assert out["score"].shape == (4, 1) and torch.isfinite(out["loss"]).all()
    support = Split(episodes.support.x[0], episodes.support.y[0])
    logits = run.algo.predict(support, episodes.query.x[0])
    assert logits.shape == (15, 5)


# --- protocol=santoro: Santoro et al. (2016)'s sequences, every step scored ----------------------

SANTORO = ["mann", "lstm"]


@pytest.mark.parametrize("name", SANTORO)
def test_santoro_steps_are_causal_and_read_the_previous_label(name: str):
    """Logits at step t depend on x_1..x_t and y_1..y_{t-1} only: y_t enters at step t + 1."""
    model = core(name)
    z, labels, _ = task_inputs(shots=8)  # (T, L, D), (T, L, N)
    base = model.sequence(z, labels)  # (T, L, N)
    t = 4
    later_z = z.clone()
    later_z[:, t + 1 :] += 10.0
    assert torch.allclose(model.sequence(later_z, labels)[:, : t + 1], base[:, : t + 1])
    swapped = labels.clone()
    swapped[:, t] = labels[:, t].roll(1, -1)  # y_t changes
    out = model.sequence(z, swapped)
    assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-12)  # not seen at step t
    assert not torch.allclose(out[:, t + 1], base[:, t + 1])  # seen at step t + 1
    unlabelled = labels.clone()
    unlabelled[:, -1] = 0.0  # the last label is never an input
    assert torch.equal(model.sequence(z, unlabelled), base)


@pytest.mark.parametrize("name", SANTORO)
def test_santoro_last_step_equals_the_query_path(name: str):
    """A query is one more step after the support set, given y_{t-1} = the last support label:
    the training sequences and the (unchanged) evaluation compute the same function."""
    model = core(name)
    support, labels, query = task_inputs()
    fast = model(support, labels, query)  # (T, M, N)
    for m in range(query.shape[1]):
        z = torch.cat([support, query[:, m : m + 1]], 1)
        steps = torch.cat([labels, torch.zeros_like(labels[:, :1])], 1)  # its own label unused
        assert torch.allclose(model.sequence(z, steps)[:, -1], fast[:, m], atol=1e-12)


def test_instance_accuracies_count_each_class_presentation():
    y = torch.tensor([[0, 1, 0, 0, 1, 1]])
    correct = torch.tensor([[False, True, True, False, True, True]])
    acc = instance_accuracies(correct, y, ways=2, instances=3)
    assert {k: v.item() for k, v in acc.items()} == {
        "instance_acc_1": 0.5,  # steps 0 and 1
        "instance_acc_2": 1.0,  # steps 2 and 4
        "instance_acc_3": 0.5,  # steps 3 and 5
    }


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"name": "snail", "protocol": "santoro"}, ["algo.protocol=santoro", "snail"]),
        ({"name": "icl_transformer", "protocol": "santoro"}, ["algo.protocol", "mann or lstm"]),
        ({"name": "lstm", "protocol": "santoro_2016"}, ["algo.protocol", "episodic, santoro"]),
        ({"name": "mann", "protocol": "santoro", "instances": 1}, ["algo.instances"]),
        ({"name": "lstm", "protocol": "santoro", "train_query": 4}, ["algo.train_query"]),
    ],
)
def test_bad_protocol_settings_fail_naming_the_key(overrides: dict, words: list[str]):
    with pytest.raises(ConfigError) as error:
        SequenceConfig(**overrides)
    for word in words:
        assert word in str(error.value)


def test_santoro_is_refused_for_snail_before_any_data_is_loaded(tmp_path):
    raw = compose_config(["algo=snail", "algo.protocol=santoro", "data=omniglot", "debug=smoke"])
    raw["data"]["root"] = str(tmp_path)  # empty: the config fails first
    with pytest.raises(ConfigError, match="algo.protocol=santoro"):
        build_run(raw)


def santoro_sequences(g: torch.Generator, ways: int, instances: int, tasks=32, dim=16):
    """A tiny family of Santoro-style sequences: `instances` noisy copies of each of `ways`
    random class vectors, labels a random class order, in random order (T, L, D), (T, L)."""
    classes = torch.randn(tasks, ways, dim, generator=g)
    y = torch.arange(ways).repeat(instances).expand(tasks, -1)
    y = y.gather(1, torch.rand(y.shape, generator=g).argsort(1))
    noise = 0.3 * torch.randn(tasks, y.shape[1], dim, generator=g)
    return classes.gather(1, y[..., None].expand(-1, -1, dim)) + noise, y


def test_lstm_learns_santoro_sequences_to_well_above_chance():
    """3 classes, 5 instances each, every step scored: after a few seconds the LSTM is right on
    ~90% of 2nd-5th presentations (chance 1/3), which needs binding each label to its class
    in context; the 1st presentation can only be guessed."""
    torch.manual_seed(0)
    ways, instances = 3, 5
    model = CORES["lstm"](SequenceConfig(name="lstm", hidden=64), 16 + ways, ways)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(800):
        z, y = santoro_sequences(g, ways, instances)
        logits = model.sequence(z, F.one_hot(y, ways).float())
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        z, y = santoro_sequences(torch.Generator().manual_seed(1), ways, instances, tasks=256)
        correct = model.sequence(z, F.one_hot(y, ways).float()).argmax(-1) == y
    acc = instance_accuracies(correct, y, ways, instances)
    later = [acc[f"instance_acc_{k}"].item() for k in range(2, instances + 1)]
    assert min(later) > 0.75, acc
    assert acc["instance_acc_2"] > acc["instance_acc_1"] + 0.2, acc


def test_santoro_meta_training_scores_every_step_of_real_omniglot_sequences(omniglot_root):
    overrides = ["experiment=lstm_omniglot_5w1s", "debug=smoke", "hardware.threads=1"]
    overrides += [f"data.root={omniglot_root}", "model.hidden=16", "algo.hidden=16"]
    overrides += ["algo.protocol=santoro", "algo.instances=4"]
    run = build_run(compose_config(overrides))
    assert run.train_shape == (5, 1, 3)  # 4 examples per class: one sequence of 20 steps
    batch = run.tasks.sample("train", torch.Generator().manual_seed(0), 2, *run.train_shape)
    logits, y = run.algo.sequence_logits(batch)
    assert (
        logits.shape == (2, 20, 5)
        and (y.sort(1).values == torch.arange(5).repeat_interleave(4)).all()
    )
    loss, metrics = run.algo.meta_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and set(metrics) == {"loss", "score"} | {
        f"instance_acc_{k}" for k in (1, 2, 3, 4)
    }
    assert all(p.grad is not None for p in run.algo.parameters())
    (episodes,) = run.tasks.episodes("test", 4, 5, 1, 3, seed=0, batch_size=4)
    out = run.algo.evaluate(episodes, [0])  # the standard protocol, as every other learner's
    assert out["score"].shape == (4, 1) and torch.isfinite(out["loss"]).all()


def test_santoro_sequences_longer_than_a_class_fail_naming_algo_instances(omniglot_root):
    overrides = ["experiment=lstm_omniglot_5w1s", f"data.root={omniglot_root}"]
    overrides += ["algo.protocol=santoro", "algo.instances=30"]  # Omniglot has 20 per class
    with pytest.raises(DataError, match=r"algo.instances=30 .* Lower algo.instances"):
        build_run(compose_config(overrides))
