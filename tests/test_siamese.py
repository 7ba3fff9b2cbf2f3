"""Siamese networks: the weighted L1 verifier on hand-computed cases, one-shot prediction by the
most similar support image, Koch's distortions, within-alphabet episodes, a real learning run."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from test_end_to_end import run_train
from test_omniglot import IDS, read_barcode, write_tiny

from metalearn.algos.metric.siamese import (
    Siamese,
    SiameseConfig,
    class_log_odds,
    pair_logits,
    pair_loss,
)
from metalearn.build import parse_config
from metalearn.data.augment import random_affine
from metalearn.data.images.miniimagenet import MiniImageNetConfig
from metalearn.data.images.omniglot import OmniglotConfig, alphabet_index, omniglot_tasks
from metalearn.data.tasks import EpisodeSampler, Split, TaskBatch
from metalearn.errors import ConfigError, DataError
from metalearn.models.conv4 import Conv4, Conv4Config

IMAGE = (1, 16, 16)


def tiny_siamese(**options) -> Siamese:
    model = Conv4(Conv4Config(hidden=8), IMAGE, 0, fused_batchnorm=True)
    return Siamese(SiameseConfig(**options), model, "classification", "loop")


def distance(alpha: list[float], bias: float) -> torch.nn.Linear:
    layer = torch.nn.Linear(len(alpha), 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([alpha]))
        layer.bias.fill_(bias)
    return layer


# -- the verifier and the one-shot rule ------------------------------------------------------


def test_pair_log_odds_are_the_weighted_l1_distance_plus_bias():
    layer = distance([-1.0, -2.0], 3.0)
    support = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])  # (T=1, S=2, D=2)
    query = torch.tensor([[[0.2, 0.9]]])  # (T=1, M=1, D=2)
    # |q - s0| = (0.2, 0.9): -0.2 - 1.8 + 3 = 1.0; |q - s1| = (0.8, 0.1): -0.8 - 0.2 + 3 = 2.0
    torch.testing.assert_close(pair_logits(layer, support, query), torch.tensor([[[1.0, 2.0]]]))


def test_the_similarity_is_symmetric_through_the_whole_twin(float64):
    torch.manual_seed(0)
    algo = tiny_siamese()  # float64 parameters: the default dtype here
    a, b = torch.rand(1, 3, *IMAGE), torch.rand(1, 3, *IMAGE)
    # f(a, b) and f(b, a): the same six images embedded (one task's BatchNorm batch), swapped
    a_z, b_z = algo._embed(a, b)
    b_z2, a_z2 = algo._embed(b, a)
    forward = pair_logits(algo.distance, a_z, b_z)  # (1, 3 b's, 3 a's)
    backward = pair_logits(algo.distance, b_z2, a_z2)  # (1, 3 a's, 3 b's)
    torch.testing.assert_close(forward, backward.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_one_shot_prediction_is_the_class_of_the_most_similar_support_image():
    layer = distance([-1.0, -2.0], 3.0)
    # 2-way 2-shot; class 0 at (0, 0) and (0.1, 1.0), class 1 at (1, 1) and (5, 5)
    support = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.1, 1.0], [5.0, 5.0]]])
    labels = torch.tensor([[0, 1, 0, 1]])
    query = torch.tensor([[[0.2, 0.9]]])
    pairs = pair_logits(layer, support, query)
    # by hand: 1.0, 2.0, 3 - 0.1 - 0.2 = 2.7, 3 - 4.8 - 8.2 = -10.0
    torch.testing.assert_close(pairs, torch.tensor([[[1.0, 2.0, 2.7, -10.0]]]))
    scores = class_log_odds(pairs, labels, 2)
    torch.testing.assert_close(scores, torch.tensor([[[2.7, 2.0]]]))  # each class's best shot
    assert scores.argmax(-1).item() == labels[0, pairs.argmax(-1).item()]


def test_softmax_over_class_log_odds_is_the_posterior_of_exactly_one_match():
    p = torch.tensor([0.9, 0.3, 0.05, 0.6], dtype=torch.float64)
    log_odds = (p / (1 - p)).log()
    # P(class c is the one match) = p_c prod_{j != c} (1 - p_j), normalised over c
    joint = torch.stack([p[c] * (1 - p).prod() / (1 - p[c]) for c in range(4)])
    torch.testing.assert_close(torch.softmax(log_odds, 0), joint / joint.sum())


def test_balanced_pair_loss_weighs_same_and_different_pairs_equally():
    pairs = torch.tensor([[[2.0, -1.0, 0.5], [0.0, 1.0, -3.0], [1.5, 0.2, 0.7]]])  # 3-way, 1 shot
    same = torch.eye(3, dtype=torch.bool)[None]
    bce = F.binary_cross_entropy_with_logits(pairs, same.float(), reduction="none")
    expected = (bce[same].mean() + bce[~same].mean()) / 2  # 3 same pairs, 6 different ones
    torch.testing.assert_close(pair_loss(pairs, same, balance=True), expected[None])
    torch.testing.assert_close(pair_loss(pairs, same, balance=False), bce.mean()[None])


def test_evaluate_gives_pair_loss_accuracy_and_class_log_odds():
    torch.manual_seed(0)
    algo = tiny_siamese(distortions=False)
    ways, shots, query = 3, 2, 2
    support_y = torch.arange(ways).repeat_interleave(shots).expand(2, -1)
    query_y = torch.arange(ways).repeat_interleave(query).expand(2, -1)
    batch = TaskBatch(
        Split(torch.rand(2, ways * shots, *IMAGE), support_y),
        Split(torch.rand(2, ways * query, *IMAGE), query_y),
        ways,
    )
    out = algo.evaluate(batch, [0])
    assert out["loss"].shape == out["score"].shape == (2, 1)
    assert out["logits"].shape == (2, 1, ways * query, ways)
    predicted = out["logits"][:, 0].argmax(-1)
    torch.testing.assert_close(out["score"][:, 0], (predicted == query_y).float().mean(1))
    loss, _ = algo.meta_loss(batch)  # without distortions: the same objective
    torch.testing.assert_close(out["loss"].mean(), loss.detach())


# -- Koch's affine distortions -----------------------------------------------------------------


def test_distortions_kept_with_probability_zero_are_the_identity():
    x = torch.rand(5, 1, 12, 12)
    same = random_affine(x, rotation=10, shear=0.3, scale=0.2, translate=0.1, p=0.0)
    torch.testing.assert_close(same, x)


def test_a_pure_translation_moves_the_ink_by_at_most_its_range():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 21, 21)
    x[:, :, 9:12, 9:12] = 1.0  # a centred 3x3 block
    moved = random_affine(x, rotation=0, shear=0, scale=0, translate=2 / 21, p=1.0)
    coords = torch.arange(21.0)
    mass = moved.sum((1, 2, 3))
    column = (moved.sum((1, 2)) * coords).sum(-1) / mass
    row = (moved.sum((1, 3)) * coords).sum(-1) / mass
    torch.testing.assert_close(mass, torch.full((64,), 9.0))  # inside the frame: ink is kept
    assert (column - 10).abs().max() <= 2 + 1e-4 and (row - 10).abs().max() <= 2 + 1e-4
    assert (column - 10).abs().max() > 1  # each image its own shift, some of them large
    assert len({round(c, 3) for c in column.tolist()}) > 50


# -- bad input ---------------------------------------------------------------------------------


def test_bad_input_is_refused_with_what_to_change():
    with pytest.raises(ConfigError, match="outer_lr"):
        SiameseConfig(outer_lr=0.0)
    with pytest.raises(ConfigError, match="model=conv4"):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 4))
        Siamese(SiameseConfig(), model, "classification", "loop")
    model = Conv4(Conv4Config(hidden=8), IMAGE, 0)
    with pytest.raises(ConfigError, match="classification"):
        Siamese(SiameseConfig(), model, "regression", "loop")
    with pytest.raises(ValueError, match="do not match"):
        pair_logits(distance([1.0, 1.0], 0.0), torch.zeros(1, 2, 3), torch.zeros(1, 1, 3))
    algo = tiny_siamese()
    support = Split(torch.rand(2, *IMAGE), torch.tensor([0, 2]))  # class 1 has no image
    with pytest.raises(DataError, match=r"classes \[1\] have no support image"):
        algo.predict(support, torch.rand(3, *IMAGE))


# -- data.episode_scope --------------------------------------------------------------------


def coded_classes(classes: int) -> torch.Tensor:
    """(C, 4, 1, 4, 4) images whose pixel (0, 0) holds the class index."""
    images = torch.zeros(classes, 4, 1, 4, 4, dtype=torch.uint8)
    images[:, :, 0, 0, 0] = torch.arange(classes)[:, None]
    return images


def classes_of(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 0, 0, 0] * 255).round().long()


def test_alphabet_episodes_draw_every_class_from_one_eligible_alphabet():
    groups = torch.tensor([0] * 5 + [1] * 2 + [2] * 6 + [3] * 3)  # sizes 5, 2, 6, 3
    sampler = EpisodeSampler(coded_classes(len(groups)), torch.device("cpu"), groups=groups)
    seen = set()
    for batch in sampler.episodes(300, 3, 1, 1, seed=0, batch_size=100):
        for task in classes_of(batch.support.x):
            alphabets = set(groups[task].tolist())
            assert len(alphabets) == 1 and len(set(task.tolist())) == 3
            seen |= alphabets
    assert seen == {0, 2, 3}  # alphabet 1 has fewer than 3 characters: skipped
    g = torch.Generator().manual_seed(1)
    trained = classes_of(sampler.sample(g, 50, 5, 1, 1).query.x)  # 5-way: alphabets 0 and 2
    assert all(len(set(groups[t].tolist())) == 1 for t in trained)


def test_default_scope_gives_the_episodes_of_the_previous_sampler():
    images = coded_classes(16)
    sampler = EpisodeSampler(images, torch.device("cpu"))
    # the previous code: the first N of a random permutation of the classes, then of examples
    generator = torch.Generator().manual_seed(5)
    classes = torch.rand((20, 16), generator=generator).argsort(-1)[:, :4]
    examples = torch.rand((20, 4, 4), generator=generator).argsort(-1)[..., :2]
    expected = images[classes[..., None], examples][:, :, :1].flatten(1, 2).float() / 255
    (batch,) = sampler.episodes(20, 4, 1, 1, seed=5, batch_size=20)
    assert torch.equal(batch.support.x, expected)


def test_no_alphabet_with_n_characters_is_a_config_error_naming_split_n_and_largest():
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    sampler = EpisodeSampler(coded_classes(6), torch.device("cpu"), groups=groups)
    with pytest.raises(ConfigError, match=r"test split has 4 classes \(the largest has 3\)"):
        sampler.check("test", 4, 1, 1)
    with pytest.raises(ConfigError, match="no alphabet"):
        next(sampler.episodes(2, 4, 1, 1, seed=0, batch_size=2))
    sampler.check("test", 3, 1, 1)


def test_rotations_stay_in_their_alphabet():
    names = ["Greek/character01/rot000", "Greek/character01/rot090", "Angelic/character02/rot270"]
    assert alphabet_index(names).tolist() == [1, 1, 0]


def test_omniglot_alphabet_scope_on_the_tiny_archives(tmp_path, monkeypatch):
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    root = write_tiny(tmp_path / "data")
    config = OmniglotConfig(root=str(root), split="background", image_size=105, ways=2)
    tasks = omniglot_tasks(config, torch.device("cpu"))  # default scope: no groups anywhere
    assert all(s.groups is None for s in tasks.samplers.values())
    config = OmniglotConfig(**{**vars(config), "episode_scope": "alphabet"})
    tasks = omniglot_tasks(config, torch.device("cpu"))
    assert tasks.samplers["train"].groups is None  # training episodes are unchanged
    alphabet = {official: name.split("/")[0] for name, official in IDS.items()}
    for batch in tasks.episodes("test", 20, 2, 1, 1, seed=0, batch_size=20):
        for task in batch.support.x:
            ids = {read_barcode((image[0] * 255).round()) // 32 for image in task}
            assert len(ids) == 2 and len({alphabet[i] for i in ids}) == 1
    with pytest.raises(ConfigError, match=r"no alphabet of the test split has 3 classes"):
        tasks.check("test", 3, 1, 1)  # Delta and Epsilon keep 2 test characters each


def test_episode_scope_alphabet_is_refused_on_other_image_data_sets():
    with pytest.raises(ConfigError, match="only data=omniglot groups its classes"):
        MiniImageNetConfig(episode_scope="alphabet")
    with pytest.raises(ConfigError, match="valid: all, alphabet"):
        OmniglotConfig(episode_scope="drawer")
    raw = compose_config(["data=cifarfs", "data.episode_scope=alphabet"])
    with pytest.raises(
        ConfigError, match="episode_scope='alphabet' is not a scope of data=cifarfs"
    ):
        parse_config(raw)


# -- learning --------------------------------------------------------------------------------


def test_siamese_learns_omniglot_above_chance(tmp_path, omniglot_root):
    results = run_train(
        [
            "experiment=siamese_omniglot_5w1s",
            f"data.root={omniglot_root}",
            "trainer.iterations=30",
            "trainer.eval_every=30",
            "algo.train_ways=10",
            "algo.train_query=2",
            "data.query=5",
            "eval.episodes=50",
            "eval.batch_size=50",
        ],
        tmp_path,
    )
    assert results["protocol"]["episode_scope"] == "all"
    # chance is 0.2; untrained (seed 0) 0.31; after these 30 steps about 0.48
    assert results["test"]["accuracy"]["mean"] > 0.4
    assert math.isfinite(results["test"]["loss"]["mean"])
