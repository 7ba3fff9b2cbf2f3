"""metalearn's meta-updates under the reference preset equal transcriptions of the authors' code
(float64, a tiny conv4 with BatchNorm, to 1e-10); see README.md in this folder."""

import copy

import pytest
import torch
from baselines_ppo2 import ppo2_loss, ppo2_returns
from how_to_train_your_maml import mamlpp_meta_update
from imaml_dev import imaml_meta_update
from supervised_reptile import TensorFlowAdam, reptile_evaluate, reptile_train_step
from test_bilevel import TASKS, image_tasks, tiny_conv

from metalearn.algos import ALGOS
from metalearn.algos.blackbox.rl2 import RL2, RL2Config
from metalearn.data.tasks import Split
from metalearn.envs.bandits import BanditConfig, BanditTasks
from metalearn.models.recurrent import RecurrentActorCritic, RecurrentConfig
from metalearn.train.schedule import outer_optimizer

flat = torch.nn.utils.parameters_to_vector  # every parameter, flattened into one vector

pytestmark = pytest.mark.usefixtures("float64")


def per_task(batch) -> list[tuple[torch.Tensor, ...]]:
    s, q = batch.support, batch.query
    return [(s.x[t], s.y[t], q.x[t], q.y[t]) for t in range(batch.tasks)]


def one_update(algo, cfg, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """metalearn's training step: (the gradient the outer optimiser receives, new weights)."""
    optimizer = outer_optimizer(cfg, algo)
    objective, _ = algo.meta_loss(batch)
    optimizer.zero_grad()
    objective.backward()
    grad = torch.cat([p.grad.flatten() for p in algo.model.parameters()])
    optimizer.step()
    return grad, flat(algo.model.parameters()).detach()


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_imaml_meta_update_is_imaml_devs(batching):
    config_cls, algo_cls = ALGOS["imaml"]
    cfg = config_cls(inner_lr=0.3, inner_steps=3, lam=2.0, cg_steps=4, outer_lr=0.01)
    model, batch = tiny_conv(), image_tasks()
    reference_model = copy.deepcopy(model)
    grad, weights = one_update(algo_cls(cfg, model, "classification", batching), cfg, batch)

    ref_grad, ref_weights = imaml_meta_update(
        reference_model,
        per_task(batch),
        inner_lr=0.3,
        n_steps=3,
        lam=2.0,
        cg_steps=4,
        outer_lr=0.01,
    )
    assert ref_grad.abs().max() > 1e-3
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-10)
    # the update moved the weights: equality is not that of two no-ops
    assert (weights - flat(tiny_conv().parameters())).abs().max() > 1e-3


def test_reptile_meta_updates_and_test_adaptation_are_supervised_reptiles():
    """Two meta-updates (the inner Adam's moments carry over from task to task and from one
    meta-update to the next), then test-time adaptation from the trained moments: weights,
    optimiser state and transductive query logits as openai/supervised-reptile's."""
    # eps 1e-4, not 1e-8: the conv biases before BatchNorm have a zero gradient up to rounding
    # (1e-17), which Adam's g / (|g| + eps) would amplify into 1e-10 differences of noise
    config_cls, algo_cls = ALGOS["reptile"]
    cfg = config_cls(
        inner_lr=0.01,
        inner_steps=5,
        inner_batch=5,
        test_inner_steps=4,
        test_inner_batch=4,
        outer_lr=0.5,
        adam_eps=1e-4,
    )
    model, batches = tiny_conv(), [image_tasks(seed=1), image_tasks(seed=2)]
    reference = copy.deepcopy(model)
    adam = TensorFlowAdam(reference, lr=0.01, beta1=0.0, beta2=0.999, eps=1e-4)
    algo = algo_cls(cfg, model, "classification", "loop")
    optimizer = outer_optimizer(cfg, algo)
    before = flat(model.parameters()).detach()
    for batch in batches:  # 12 examples a task, batches of 5: passes straddle and reshuffle
        torch.manual_seed(7)
        objective, _ = algo.meta_loss(batch)
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
        torch.manual_seed(7)
        tasks = [(torch.cat([sx, qx]), torch.cat([sy, qy])) for sx, sy, qx, qy in per_task(batch)]
        reptile_train_step(
            reference, adam, tasks, inner_batch_size=5, inner_iters=5, meta_step_size=0.5
        )
        weights = flat(model.parameters()).detach()
        ref_weights = flat(reference.parameters()).detach()
        torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-10)
        for mine, theirs in zip(algo.inner_adam.second.values(), adam.v, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)
    assert algo.inner_adam.steps.item() == 2 * TASKS * 5
    assert (weights - before).abs().max() > 1e-3
    # test: 2-shot support of 6 examples in batches of 4, support and query in one forward pass
    batch = image_tasks(seed=3)
    sx, sy, qx, qy = per_task(batch)[0]
    torch.manual_seed(11)
    logits = algo.predict(Split(sx, sy), qx, steps=4)
    torch.manual_seed(11)
    ref_logits = reptile_evaluate(reference, adam, sx, sy, qx, inner_batch_size=4, inner_iters=4)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-10)
    assert algo.inner_adam.steps.item() == 2 * TASKS * 5  # testing left the state as it was


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize(
    ("iteration", "second_order", "msl"),
    [(0, True, True), (1, True, True), (3, False, False)],  # epochs 0 and 1: MSL; 3: last only
)
def test_mamlpp_meta_update_is_how_to_train_your_mamls(batching, iteration, second_order, msl):
    config_cls, algo_cls = ALGOS["mamlpp"]
    cfg = config_cls(
        inner_lr=0.2,
        inner_steps=3,
        msl_epochs=2,
        epoch_iterations=1,
        first_order_epochs=0 if second_order else 5,
        outer_lr=0.01,
    )
    model, batch = tiny_conv(), image_tasks()
    algo = algo_cls(cfg, model, "classification", batching)
    norm_names = [k for k in algo.norm]
    weights = {
        k: p.detach().clone().requires_grad_()
        for k, p in model.named_parameters()
        if k not in norm_names
    }
    norm = {k: v.detach().clone().requires_grad_() for k, v in algo.norm.items()}
    lrs = {k: v.detach().clone().requires_grad_() for k, v in algo.lrs.items()}

    optimizer = outer_optimizer(cfg, algo)
    objective, _ = algo.meta_loss(batch, iteration)
    optimizer.zero_grad()
    objective.backward()
    own = dict(model.named_parameters())
    grads = {k: own[k].grad.clone() for k in weights}
    grads |= {k: p.grad.clone() for k, p in algo.meta_parameters().items()}
    optimizer.step()

    ref_grads = mamlpp_meta_update(
        weights,
        norm,
        lrs,
        per_task(batch),
        steps=3,
        epoch=iteration,
        msl_epochs=2,
        second_order=second_order,
        outer_lr=0.01,
        use_msl=msl,
    )
    assert grads.keys() == ref_grads.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], rtol=0, atol=1e-10)
    assert max(g.abs().max() for g in ref_grads.values()) > 1e-3
    after = {**{k: own[k] for k in weights}, **algo.meta_parameters()}
    before = {
        **weights,
        **{f"bn.{k}": v for k, v in norm.items()},
        **{f"lr.{k}": v for k, v in lrs.items()},
    }
    for key, value in after.items():
        # the conv biases before BatchNorm have a zero gradient up to rounding (1e-17), which
        # Adam's first step g / (|g| + eps) turns into lr-sized noise: their gradients are
        # compared above, their steps not
        if ref_grads[key].abs().max() > 1e-12:
            torch.testing.assert_close(value.detach(), before[key].detach(), rtol=0, atol=1e-10)


def test_rl2_ppo_losses_are_baselines_ppo2s():
    """Two PPO updates on one meta-batch of bandit trials (an SGD step between them, so that
    the probability ratios and the values move and the clips bind): each loss and gradient as
    ppo2's, on the same mini-batches of whole trials."""
    tasks = BanditTasks(BanditConfig(arms=3, pulls=6), torch.device("cpu"))
    batch = tasks.sample("train", torch.Generator().manual_seed(0), 8)
    cfg = RL2Config(
        optimizer="ppo",
        ppo_epochs=2,
        ppo_minibatches=2,
        gamma=0.9,
        gae_lambda=0.8,
        entropy_coef=0.01,
        entropy_decay_iterations=0,
        ppo_clip=0.1,
    )
    torch.manual_seed(0)
    model = RecurrentActorCritic(RecurrentConfig(hidden=6), (0,), 3)
    reference = copy.deepcopy(model)
    algo = RL2(cfg, model, "rl", "loop")
    with torch.no_grad():
        trial = algo.rollout(batch)  # the trials both sides train on (the same noise)
    torch.manual_seed(5)  # the mini-batches' permutations
    updates = algo.meta_losses(batch)
    mine = []
    for _ in range(3):
        loss, metrics = next(updates)
        model.zero_grad()
        loss.backward()
        mine.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        with torch.no_grad():
            for p in model.parameters():
                p -= 3.0 * p.grad
    assert metrics["clipped"].item() > 0  # the third update's ratios hit the clip

    torch.manual_seed(5)
    rows = torch.randperm(8).chunk(2)
    with torch.no_grad():
        old_logp, _, old_values = algo_replay(reference, trial)
    returns = ppo2_returns(trial["reward"], old_values, 0.9, 0.8)
    for (loss, grads), r in zip(mine, [rows[0], rows[1], None], strict=True):
        if r is None:  # the second epoch's first mini-batch
            r = torch.randperm(8).chunk(2)[0]
        logp, entropy, values = algo_replay(reference, trial, r)
        ref_loss = ppo2_loss(
            -logp,
            values,
            entropy,
            -old_logp[r],
            old_values[r],
            returns[r],
            cliprange=0.1,
            vf_coef=0.5,
            ent_coef=0.01,
        )
        reference.zero_grad()
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=0, atol=1e-10)
        for g, p in zip(grads, reference.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-10)
        with torch.no_grad():
            for p in reference.parameters():
                p -= 3.0 * p.grad


def algo_replay(model, trial, rows=None):
    """The recurrent policy module run over the recorded inputs, step by step."""
    rows = slice(None) if rows is None else rows
    inputs, actions = trial["input"][rows], trial["action"][rows]
    state = model.initial_state(inputs.shape[0], inputs.device)
    logp, entropy, values = [], [], []
    for t in range(inputs.shape[1]):
        logits, value, state = model(inputs[:, t], state)
        dist = torch.distributions.Categorical(logits=logits)
        logp.append(dist.log_prob(actions[:, t]))
        entropy.append(dist.entropy())
        values.append(value)
    return torch.stack(logp, 1), torch.stack(entropy, 1), torch.stack(values, 1)
