"""Pre-training baselines: the test-time heads against reference solvers, distillation,
augmentation, labelled batches, and RFS-distill end to end from a real teacher checkpoint."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from scipy.optimize import minimize

from metalearn.algos.metric.baseline import (
    Baseline,
    BaselineConfig,
    fit_logistic,
    fit_sgd_head,
    head_logits,
)
from metalearn.build import build_run
from metalearn.cli import train
from metalearn.data.augment import augment, colour_jitter, random_crop
from metalearn.data.tasks import EpisodeSampler, LabelledBatch
from metalearn.errors import CheckpointError
from metalearn.models.conv4 import Conv4, Conv4Config
from metalearn.reevaluate import evaluate_checkpoint

SMOKE = ["debug=smoke", "hardware.threads=1", "data=omniglot"]


def test_logistic_head_solves_scikit_learns_objective(float64):
    torch.manual_seed(0)
    z = F.normalize(torch.randn(1, 6, 4), dim=-1)
    y = torch.tensor([[0, 0, 1, 1, 2, 2]])
    weight, bias = fit_logistic(z, y, 3, c=1.0, iterations=2000)
    x, labels = z[0].numpy(), y[0].numpy()

    def objective(flat):  # sum of cross-entropies + ||W||^2 / 2 (C = 1), intercept free
        w, b = flat[:12].reshape(4, 3), flat[12:]
        logits = x @ w + b
        logits = logits - logits.max(1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return -log_p[np.arange(6), labels].sum() + 0.5 * (w**2).sum()

    reference = minimize(objective, np.zeros(15), method="BFGS", options={"gtol": 1e-10})
    ours = np.concatenate([weight[0].numpy().flatten(), bias[0].numpy()])
    assert objective(ours) == pytest.approx(reference.fun, abs=1e-9)
    # the intercept is determined up to a constant shared by the classes
    np.testing.assert_allclose(weight[0].numpy().flatten(), reference.x[:12], atol=1e-5)


def test_sgd_head_equals_torch_sgd_on_an_nn_linear_for_one_task():
    torch.manual_seed(0)
    cfg = BaselineConfig(test_epochs=3)
    z, y = torch.randn(1, 10, 6), torch.randint(0, 3, (1, 10))
    weight, bias = fit_sgd_head(z, y, 3, cfg, scale=None)

    generator = torch.Generator().manual_seed(0)  # the same draws, in the same order
    bound = 6**-0.5
    w = (bound * (2 * torch.rand(1, 6, 3, generator=generator) - 1))[0].requires_grad_()
    b = (bound * (2 * torch.rand(1, 3, generator=generator) - 1))[0].requires_grad_()
    sgd = torch.optim.SGD([w, b], lr=0.01, momentum=0.9, dampening=0.9, weight_decay=1e-3)
    for _ in range(3):
        order = torch.randperm(10, generator=generator)
        for start in range(0, 10, 4):
            rows = order[start : start + 4]
            sgd.zero_grad()
            F.cross_entropy(z[0, rows] @ w + b, y[0, rows]).backward()
            sgd.step()
    torch.testing.assert_close(weight[0], w.detach())
    torch.testing.assert_close(bias[0], b.detach())


def test_cosine_head_logits_are_scaled_cosines():
    z, w = torch.randn(1, 4, 5), torch.randn(1, 5, 3)
    logits = head_logits(z, w, torch.zeros(1, 3), scale=10.0)
    expected = 10 * F.cosine_similarity(z[0, :, :, None], w[0][None], dim=1)
    torch.testing.assert_close(logits[0], expected)


def tiny_baseline(**options) -> Baseline:
    torch.manual_seed(0)
    model = Conv4(Conv4Config(hidden=8), (1, 16, 16), 0, fused_batchnorm=True)
    return Baseline(BaselineConfig(**options), model, "classification", "loop", train_classes=7)


def test_pretraining_is_cross_entropy_over_train_classes_and_self_distillation_adds_nothing():
    algo = tiny_baseline()
    batch = LabelledBatch(torch.rand(6, 1, 16, 16), torch.tensor([0, 1, 2, 3, 4, 6]))
    loss, metrics = algo.meta_loss(batch)
    expected = F.cross_entropy(algo.classifier(algo.model(batch.x)), batch.y)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in algo.parameters())
    algo.teacher = torch.nn.Sequential(algo.model, algo.classifier)
    distilled, _ = algo.meta_loss(batch)  # KL(p || p) = 0: half the cross-entropy remains
    torch.testing.assert_close(distilled, 0.5 * expected, rtol=1e-5, atol=1e-6)


def test_labelled_batches_pair_each_image_with_its_class():
    images = torch.arange(5 * 3).view(5, 3, 1, 1, 1).to(torch.uint8)  # image value = 3 c + e
    sampler = EpisodeSampler(images, torch.device("cpu"))
    batch = sampler.sample_labelled(torch.Generator().manual_seed(0), 50)
    values = (batch.x.flatten() * 255).round().long()
    assert torch.equal(values // 3, batch.y) and batch.x.shape == (50, 1, 1, 1)
    assert set(batch.y.tolist()) == set(range(5))


def test_augmentation_keeps_shape_and_range_and_moves_content():
    torch.manual_seed(0)
    x = torch.zeros(8, 3, 12, 12)
    x[:, :, 5, 5] = 1.0  # one bright pixel
    cropped = random_crop(x, padding=3)
    assert cropped.shape == x.shape
    positions = {tuple((img[0] == 1).nonzero()[0].tolist()) for img in cropped if img.max() == 1}
    assert len(positions) > 1  # the pixel lands in different places
    assert torch.equal(random_crop(x, padding=0), x)
    jittered = colour_jitter(torch.rand(8, 3, 12, 12), 0.4)
    assert jittered.min() >= 0 and jittered.max() <= 1
    out = augment(torch.rand(8, 1, 12, 12), padding=2, flip=True, jitter=0.4)
    assert out.shape == (8, 1, 12, 12)


def test_rfs_distill_trains_from_a_real_teacher_checkpoint(omniglot_root: Path, tmp_path: Path):
    root = f"data.root={omniglot_root}"
    teacher_dir = tmp_path / "teacher"
    train(build_run(compose_config(["algo=rfs", *SMOKE, root])), teacher_dir)
    teacher = teacher_dir / "checkpoints" / "best.pt"
    student = build_run(compose_config(["algo=rfs", *SMOKE, root, f"algo.distill_from={teacher}"]))
    assert student.algo.teacher is not None
    results = train(student, tmp_path / "student")
    assert results["train"]["examples_per_second"] > 0
    assert 0 <= results["test"]["accuracy"]["mean"] <= 1
    # re-testing the student needs no teacher: a moved or deleted teacher changes nothing
    teacher.unlink()
    retest = evaluate_checkpoint(
        compose_config([f"checkpoint={tmp_path / 'student' / 'checkpoints' / 'best.pt'}"], "eval"),
        [f"checkpoint={tmp_path / 'student' / 'checkpoints' / 'best.pt'}"],
        tmp_path / "retest",
    )
    assert retest["test"]["accuracy"] == results["test"]["accuracy"]


def test_distilling_from_a_meta_learner_checkpoint_is_refused(
    protonet_run_dir: Path, omniglot_root: Path
):
    best = protonet_run_dir / "checkpoints" / "best.pt"
    overrides = ["algo=rfs", *SMOKE, f"data.root={omniglot_root}", f"algo.distill_from={best}"]
    with pytest.raises(CheckpointError, match="pre-training run"):
        build_run(compose_config(overrides))
