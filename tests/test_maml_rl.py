"""Gradient-based meta-RL (MAML-TRPO, E-MAML, ProMP) against hand-written references in float64:
the inner policy-gradient step, the meta-gradient through it, E-MAML's exploration term and
ProMP's low-variance curvature; then short runs on 2-D navigation: learning, resume, bad input."""

import math

import pytest
import torch
from conftest import compose_config

from metalearn.algos.rl.maml_trpo import MAMLTRPO, MAMLTRPOConfig
from metalearn.algos.rl.promp import ProMP, ProMPConfig, adapt_kl_coef
from metalearn.algos.rl.trajectories import adapt, inner_loss, per_task, sample
from metalearn.algos.rl.trpo import fisher_vector_product, flatten, unflatten
from metalearn.build import build_run
from metalearn.cli import train
from metalearn.envs.navigation import NavigationConfig, NavigationTasks
from metalearn.errors import ConfigError
from metalearn.evaluate import run_episodes
from metalearn.models.policy import GaussianMLPPolicy, GaussianPolicyConfig

CPU = torch.device("cpu")
TASKS, TRAJECTORIES, HORIZON = 2, 3, 6


def tiny_policy(seed: int = 0, hidden: int = 3) -> GaussianMLPPolicy:
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(GaussianPolicyConfig(hidden_sizes=[hidden]), (2,), 2)
    with torch.no_grad():  # a mean that moves: rllab's zero biases would start every step at 0
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return policy


def tiny_batch(tasks: int = TASKS, seed: int = 0):
    # done_threshold=0: every episode runs the whole horizon (the padding is tested in
    # test_policy_gradient.py and test_navigation.py; here it would only hide steps)
    family = NavigationTasks(NavigationConfig(horizon=HORIZON, done_threshold=0.0), CPU)
    return family.sample("train", torch.Generator().manual_seed(seed), tasks)


def settings(**overrides) -> dict:
    return {"inner_lr": 0.3, "trajectories": TRAJECTORIES, **overrides}


def by_hand_log_prob(theta: dict, observations, actions):
    """log N(a; W2 tanh(W1 s + b1) + b2, exp(log_std)^2), the policy written out."""
    hidden = torch.tanh(observations @ theta["body.0.weight"].T + theta["body.0.bias"])
    mean = hidden @ theta["mean.weight"].T + theta["mean.bias"]
    normal = torch.distributions.Normal(mean, theta["log_std"].exp())
    return normal.log_prob(actions).sum(-1)


def by_hand_inner_step(theta: dict, played, t: int, lr: float, second_order: bool = True):
    """Task t's REINFORCE step: theta - lr grad of -(1/|steps|) sum_steps log pi(a|s) A (the
    gradient a constant of theta unless `second_order`)."""
    logp = by_hand_log_prob(theta, played.observations[t], played.actions[t])
    loss = -(logp * played.advantages[t]).sum() / played.valid[t].sum()
    grads = torch.autograd.grad(loss, list(theta.values()), create_graph=second_order)
    return {k: v - lr * g for (k, v), g in zip(theta.items(), grads, strict=True)}


def by_hand_meta_gradient(theta: dict, stages, second_order: bool = True) -> torch.Tensor:
    """MAML-TRPO's outer objective task by task (maml_npo.py `init_opt`), differentiated by
    autograd: the gradient with respect to every parameter, flat."""
    pre, post = stages
    losses = []
    for t in range(TASKS):
        fast = by_hand_inner_step(theta, pre, t, 0.3, second_order)
        logp = by_hand_log_prob(fast, post.observations[t], post.actions[t])
        losses.append(-(torch.exp(logp - post.log_probs[t]) * post.advantages[t]).mean())
    return torch.cat(
        [g.flatten() for g in torch.autograd.grad(torch.stack(losses).mean(), list(theta.values()))]
    )


def test_the_inner_step_is_a_hand_written_policy_gradient_step(float64):
    policy, batch = tiny_policy(), tiny_batch()
    params = per_task(policy.params(), TASKS)
    played = sample(policy, params, batch, 0, TRAJECTORIES, gamma=0.99, gae_lambda=1.0)
    assert played.valid.all() and played.observations.shape == (TASKS, TRAJECTORIES, HORIZON, 2)
    advantages = played.advantages.flatten(1)  # centred per task, as rllab's center_adv
    torch.testing.assert_close(advantages.mean(1), torch.zeros(TASKS), atol=1e-10, rtol=0)
    torch.testing.assert_close(advantages.std(1, unbiased=False), torch.ones(TASKS))
    fast = adapt(policy, params, played, 0.3, "log_likelihood")
    for t in range(TASKS):
        expected = by_hand_inner_step(policy.params(), played, t, 0.3)
        for key, value in expected.items():
            torch.testing.assert_close(fast[key][t], value, rtol=1e-10, atol=1e-12)
    # the pre-update policy sampled the trajectories: its log-probabilities are stored
    torch.testing.assert_close(
        played.log_probs[1],
        by_hand_log_prob(policy.params(), played.observations[1], played.actions[1]),
    )


def test_the_maml_trpo_meta_gradient_is_autograd_through_a_per_task_transcription(float64):
    policy = tiny_policy()
    algo = MAMLTRPO(MAMLTRPOConfig(**settings()), policy, "rl", "vmap")
    stages = algo.sample_meta_batch(tiny_batch())
    theta = policy.params()
    ours = torch.autograd.grad(algo.surrogate(theta, stages), list(theta.values()))
    ours = torch.cat([g.flatten() for g in ours])
    torch.testing.assert_close(ours, by_hand_meta_gradient(theta, stages), rtol=1e-9, atol=1e-12)
    # the inner step's second-order term is in it: the first-order meta-gradient differs
    first_order = by_hand_meta_gradient(theta, stages, second_order=False)
    assert (ours - first_order).abs().max() > 1e-3 * ours.abs().max()
    loss, metrics = algo.meta_loss(tiny_batch())  # the trainer-facing view: the same surrogate
    torch.testing.assert_close(loss, algo.surrogate(theta, stages))
    assert metrics["score"] == stages[-1].returns().mean()


def test_a_trpo_outer_step_moves_the_policy_within_the_trust_region(float64):
    policy, batch = tiny_policy(), tiny_batch()
    algo = MAMLTRPO(MAMLTRPOConfig(**settings(max_kl=0.02)), policy, "rl", "vmap")
    stages = algo.sample_meta_batch(batch)  # what outer_step samples: the batch fixes the noise
    before = flatten(policy.params()).detach().clone()
    loss, metrics = algo.outer_step(batch)
    assert metrics["accepted"] == 1.0 and 0 < metrics["kl"] <= 0.02
    assert (flatten(policy.params()).detach() - before).norm() > 0
    with torch.no_grad():  # the record is the new weights' KL and surrogate on those samples
        assert algo.kl(policy.params(), stages).item() == pytest.approx(metrics["kl"].item())
        after = algo.surrogate(policy.params(), stages).item()
    assert after == pytest.approx(metrics["loss_after"].item()) and after < loss


def test_the_pretrained_baseline_is_plain_trpo_on_the_pre_update_trajectories(float64):
    """algo=pretrained_trpo (inner_steps 0): one stage of sampling, the surrogate is the likelihood
    ratio of theta itself on it, and its Fisher product is the plain KL Hessian's."""
    policy = tiny_policy()
    cfg = MAMLTRPOConfig(**settings(name="pretrained_trpo", inner_steps=0, test_inner_steps=1))
    algo = MAMLTRPO(cfg, policy, "rl", "vmap")
    (played,) = algo.sample_meta_batch(tiny_batch())
    theta = policy.params()
    by_hand = torch.stack(
        [
            -(
                torch.exp(
                    by_hand_log_prob(theta, played.observations[t], played.actions[t])
                    - played.log_probs[t]
                )
                * played.advantages[t]
            ).mean()
            for t in range(TASKS)
        ]
    ).mean()
    torch.testing.assert_close(algo.surrogate(theta, [played]), by_hand, rtol=1e-10, atol=1e-12)
    x = flatten(theta).detach()
    reference = fisher_vector_product(lambda y: algo.kl(unflatten(y, theta), [played]), x, 1e-5)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(algo.fisher_product(theta, [played])(v), reference(v))
    # at test it adapts by MAML's step: the returns after 0 and 1 steps differ
    returns = algo.evaluate(tiny_batch(seed=1), [0, 1])["score"]
    assert returns.shape == (TASKS, 2) and (returns[:, 1] != returns[:, 0]).all()


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_the_fisher_product_through_the_inner_steps_is_the_kl_hessians(float64, inner_steps):
    """J^T F J v (maml_trpo.py) equals double backprop through the adaptation (pytorch-maml-rl's
    hessian_vector_product), which takes third derivatives."""
    policy = tiny_policy()
    cfg = MAMLTRPOConfig(**settings(inner_steps=inner_steps, cg_damping=1e-3))
    algo = MAMLTRPO(cfg, policy, "rl", "vmap")
    stages = algo.sample_meta_batch(tiny_batch())
    params = policy.params()
    x = flatten(params).detach()
    reference = fisher_vector_product(lambda y: algo.kl(unflatten(y, params), stages), x, 1e-3)
    ours = algo.fisher_product(params, stages)
    for seed in range(3):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(ours(v), reference(v), rtol=1e-8, atol=1e-11)


def test_emaml_adds_exactly_the_exploration_terms_gradient(float64):
    policy = tiny_policy()
    maml = MAMLTRPO(MAMLTRPOConfig(**settings()), policy, "rl", "vmap")
    emaml = MAMLTRPO(
        MAMLTRPOConfig(**settings(name="emaml_trpo", exploration=True)), policy, "rl", "vmap"
    )
    stages = maml.sample_meta_batch(tiny_batch(tasks=3))
    theta = policy.params()
    names = list(theta)

    def gradient(algo):
        return torch.autograd.grad(algo.surrogate(theta, stages), list(theta.values()))

    difference = [e - m for e, m in zip(gradient(emaml), gradient(maml), strict=True)]
    pre, post = stages
    rewards = post.rewards.flatten()  # every step is valid here (done_threshold=0)
    mean, std = rewards.mean(), rewards.std(unbiased=False)
    term = 0.0
    for t in range(3):  # ProMP's trpo_maml.py: -mean(adj_avg_rewards) * mean(log-likelihood)
        weight = ((post.rewards[t] - mean) / (std + 1e-8)).mean()
        log_likelihood = by_hand_log_prob(theta, pre.observations[t], pre.actions[t]).mean()
        term = term - weight * log_likelihood / 3
    expected = torch.autograd.grad(term, list(theta.values()))
    for name, got, want in zip(names, difference, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10, msg=name)
    assert max(d.abs().max() for d in difference) > 1e-3  # the term is there


def flat_inner_loss(policy, played, objective: str):
    """One task's inner loss as a function of a flat parameter vector."""
    like = policy.params()
    task = {k: v[0] for k, v in vars(played).items()}

    def loss(x):
        fields = type(played)(**task)
        return inner_loss(policy, objective, unflatten(x, like), fields)

    return loss, flatten(like).detach()


def test_promps_lvc_objective_has_reinforces_gradient_and_the_missing_curvature(float64):
    """At the sampling policy, grad of pi/pi_old A equals grad of log pi A (Rothfuss et al. 2019,
    eq. 12), and the Hessians differ by E[grad log pi grad log pi^T A]: the term through which
    the pre-update sampling distribution enters the meta-gradient."""
    policy, batch = tiny_policy(), tiny_batch(tasks=1)
    played = sample(policy, per_task(policy.params(), 1), batch, 0, 4, gamma=0.99, gae_lambda=1.0)
    lvc, x = flat_inner_loss(policy, played, "likelihood_ratio")
    reinforce, _ = flat_inner_loss(policy, played, "log_likelihood")
    grad = torch.func.grad
    torch.testing.assert_close(grad(lvc)(x), grad(reinforce)(x), rtol=1e-10, atol=1e-12)
    hessians = [torch.autograd.functional.hessian(f, x) for f in (lvc, reinforce)]
    like = policy.params()

    def log_pi(x, s, a):
        return policy.log_prob(unflatten(x, like), s[None], a[None])[0]

    s, a = played.observations[0].flatten(0, 1), played.actions[0].flatten(0, 1)  # (N H, .)
    scores = torch.vmap(grad(log_pi), in_dims=(None, 0, 0))(x, s, a)  # (N H, P)
    advantages = played.advantages[0].flatten()
    outer = -(scores.T * advantages) @ scores / advantages.numel()
    torch.testing.assert_close(hessians[0] - hessians[1], outer, rtol=1e-8, atol=1e-10)
    assert outer.abs().max() > 1e-2


def test_promps_kl_coefficient_halves_or_doubles_around_its_target():
    assert adapt_kl_coef(1.0, 0.001, 0.01) == 0.5
    assert adapt_kl_coef(1.0, 0.02, 0.01) == 2.0
    assert adapt_kl_coef(1.0, 0.01, 0.01) == 1.0


def test_promp_takes_its_steps_on_one_meta_batch_and_penalises_the_pre_update_kl(float64):
    policy = tiny_policy()
    cfg = ProMPConfig(**settings(promp_steps=3, inner_kl_coef=10.0, adaptive_inner_kl=True))
    algo = ProMP(cfg, policy, "rl", "vmap")
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.05)
    kls = []
    for loss, metrics in algo.meta_losses(tiny_batch()):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        kls.append(metrics["inner_kl"].item())
    assert len(kls) == 3 and kls[0] == pytest.approx(0.0, abs=1e-12)  # theta is the sampler
    assert kls[-1] > 0  # the pre-update policy moves away from the one that sampled
    assert algo.inner_kl_coefs[0] in (5.0, 20.0, 10.0)
    assert algo.state_dict()["inner_kl_coefs"] == algo.inner_kl_coefs


SMOKE = ["debug=smoke", "hardware.threads=1", "data=navigation", "data.horizon=20"]
TINY = [*SMOKE, "model.hidden_sizes=[8]", "algo.trajectories=5", "eval.episodes=10"]


def run_train(overrides: list[str], run_dir) -> dict:
    return train(build_run(compose_config([*TINY, *overrides])), run_dir)


def paired_z(gain: torch.Tensor) -> float:
    """How many standard errors a mean gain over the same tasks is from zero."""
    return (gain.mean() / (gain.std() / math.sqrt(gain.numel()))).item()


def test_maml_trpo_on_navigation_learns_an_initialisation_that_one_step_adapts(tmp_path):
    overrides = ["algo=maml_trpo", "algo.trajectories=10", "trainer.meta_batch_size=10"]
    run = build_run(
        compose_config([*TINY, *overrides, "trainer.iterations=10", "eval.episodes=40"])
    )
    shape = {"episodes": 40, "ways": 0, "shots": 0, "query": 0, "steps": [0, 1]}
    untrained = run_episodes(run, "test", **shape)["score"]  # (40 tasks, before / after a step)
    results = train(run, tmp_path)
    before, after = (entry["return"] for entry in results["test"]["breakdown"])
    assert results["metric"] == "return" and results["test"]["return"] == after
    assert after["mean"] > before["mean"], (before, after)
    # on the same 40 test tasks (the best weights, which the test used): one inner step now
    # adapts the policy far beyond chance, and the adapted policy beats the untrained one's
    # (at initialisation one step barely moves the return: -9.70 before, -9.72 after)
    trained = run_episodes(run, "test", **shape)["score"]
    assert paired_z(trained[:, 1] - trained[:, 0]) > 4
    assert paired_z(trained[:, 1] - untrained[:, 1]) > 4
    assert (tmp_path / "plots" / "return_vs_steps.png").is_file()
    rows = (tmp_path / "metrics.jsonl").read_text()
    assert '"val/return_step0"' in rows and '"val/return_step1"' in rows


@pytest.mark.parametrize("algo", ["maml_trpo", "promp"])
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(algo, tmp_path):
    common = [f"algo={algo}", "trainer.eval_every=2", "eval.episodes=2", "eval.val_episodes=2"]
    common += ["data.horizon=10", "algo.trajectories=3"]
    if algo == "promp":
        common += ["algo.promp_steps=2", "algo.adaptive_inner_kl=true"]
    run_train([*common, "trainer.iterations=4"], tmp_path / "whole")
    run_train([*common, "trainer.iterations=2"], tmp_path / "split")
    run_train([*common, "trainer.iterations=4", "trainer.resume=true"], tmp_path / "split")
    whole, split = (
        torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=False)
        for d in ("whole", "split")
    )
    assert whole["progress"]["iteration"] == split["progress"]["iteration"] == 4
    for key, value in whole["algo_state"]["model"].items():
        assert torch.equal(value, split["algo_state"]["model"][key]), key
    if algo == "promp":
        assert whole["algo_state"]["inner_kl_coefs"] == split["algo_state"]["inner_kl_coefs"]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["algo=maml_trpo", "data=sinusoid"], ["algo=maml_trpo", "supervised", "data=navigation"]),
        (["algo=promp", "data=omniglot"], ["algo=promp", "supervised", "data=navigation"]),
        (["algo=maml_trpo", "data=bandit"], ["model=gaussian_mlp"]),
        (
            ["algo=maml_trpo", "data=bandit", "model=gaussian_mlp"],
            ["continuous", "discrete", "data=navigation"],
        ),
        (
            ["algo=rl2", "data=navigation", "model=recurrent"],
            ["discrete", "continuous", "algo=rl2"],
        ),
        (["algo=rl2", "data=navigation"], ["model=recurrent"]),
        (["algo=maml", "data=navigation"], ["meta-RL", "algo=maml_trpo"]),
        (["algo=maml", "data=sinusoid", "model=gaussian_mlp"], ["Gaussian policy", "leave model="]),
        (["algo=protonet", "model=gaussian_mlp_maml"], ["Gaussian policy", "model=conv4"]),
        (["algo=maml_trpo", "data=navigation", "algo.trajectories=0"], ["algo.trajectories", "20"]),
        (["algo=promp", "data=navigation", "algo.inner_steps=0"], ["algo.inner_steps"]),
        (["algo=emaml_trpo", "data=navigation", "algo.inner_steps=0"], ["algo.inner_steps >= 1"]),
        (
            ["algo=maml_trpo", "data=navigation", "trainer.optimizer=adam"],
            ["trainer.optimizer=adam", "trust region"],
        ),
    ],
)
def test_bad_input_is_a_config_error_that_says_what_to_do(overrides, words):
    with pytest.raises(ConfigError) as error:
        build_run(compose_config(["debug=smoke", "hardware.threads=1", *overrides]))
    for word in words:
        assert word in str(error.value)


def test_the_noise_of_a_fixed_test_task_gives_the_same_trajectories(float64):
    policy = tiny_policy()
    family = NavigationTasks(NavigationConfig(horizon=HORIZON), CPU)
    (whole,) = family.episodes("test", 4, seed=7, batch_size=4)
    part = list(family.episodes("test", 4, seed=7, batch_size=3))[1]  # task 3 alone
    params = per_task(policy.params(), 1)
    alone = sample(policy, params, part, 1, TRAJECTORIES, gamma=0.99, gae_lambda=1.0)
    within = sample(policy, per_task(policy.params(), 4), whole, 1, TRAJECTORIES, 0.99, 1.0)
    torch.testing.assert_close(alone.actions[0], within.actions[3], rtol=0, atol=0)
    other_stage = sample(policy, params, part, 0, TRAJECTORIES, gamma=0.99, gae_lambda=1.0)
    assert not torch.equal(alone.actions, other_stage.actions)
    assert math.isfinite(alone.returns().item())
