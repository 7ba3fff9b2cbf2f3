"""The causal-reasoning quiz (Dasgupta et al. 2019): graphs against their SEM, interventions,
the held-out split, and the exact reference agents against brute force."""

import itertools

import numpy as np
import pytest
import torch
from conftest import compose_config

from metalearn.build import build_run
from metalearn.envs.causal import CausalConfig, CausalTasks
from metalearn.envs.causal_baselines import (
    Associative,
    BayesObservational,
    Counterfactual,
    Interventional,
)
from metalearn.envs.causal_graphs import (
    all_graphs,
    associative_means,
    counterfactual_means,
    graph_classes,
    graph_index,
    interventional_means,
)
from metalearn.envs.trials import play
from metalearn.errors import ConfigError

CPU = torch.device("cpu")
SIGMA = 0.1
# A confounded graph (5 nodes): the hidden X0 drives X1 and, against it, X2, X3 and X4; X2 -> X3
# and X1 -> X4. Seeing X1 = -5 says X0 is about -2.5, so X3 = X2 - X0 ~ -2 X0 looks best (+5);
# setting X1 = -5 leaves X0 alone: only X4 = -X1 + X0 moves, to +5.
CONFOUNDED = {(0, 1): 1, (0, 2): -1, (2, 3): 1, (0, 3): -1, (1, 4): -1, (0, 4): 1}


def tasks_of(**overrides) -> CausalTasks:
    return CausalTasks(CausalConfig(**overrides), CPU)


def weights_of(edges: dict, nodes: int = 5) -> torch.Tensor:
    weights = torch.zeros(nodes, nodes)
    for (j, i), w in edges.items():
        weights[j, i] = w
    return weights


def trials_on(tasks: CausalTasks, weights: torch.Tensor, quiz_node: int, n: int, seed: int = 0):
    """n test trials whose graph and quiz node are the given ones (their noise stays random)."""
    (batch,) = tasks.episodes("test", n, seed=seed, batch_size=n)
    batch.weights[:] = weights
    batch.graph[:] = int(graph_index(weights[None].numpy().astype(np.int8))[0])
    batch.quiz_node[:] = quiz_node
    return batch


def reference_covariance(weights: np.ndarray, sigma: float) -> np.ndarray:
    """Cov(X) of X_i = sum_j w_ji X_j + e_i, node by node from the definition."""
    n = len(weights)
    cov = np.zeros((n, n))
    for i in range(n):
        for k in range(i):
            cov[i, k] = cov[k, i] = sum(weights[j, i] * cov[j, k] for j in range(i))
        parents = range(i)
        cov[i, i] = sigma**2 + sum(weights[j, i] * weights[m, i] * cov[j, m]
                                   for j in parents for m in parents)  # fmt: skip
    return cov


def reference_samples(weights: np.ndarray, rng, n: int, node: int = -1, value: float = 0.0):
    """n draws (n, N) of the SEM node by node, do(X_node = value) if node >= 0."""
    x = np.zeros((n, len(weights)))
    for i in range(len(weights)):
        x[:, i] = value if i == node else x @ weights[:, i] + SIGMA * rng.standard_normal(n)
    return x


def test_observed_samples_have_the_means_and_covariances_of_their_sem():
    tasks = tasks_of(variant="observational")
    rng = np.random.default_rng(0)
    for g in rng.choice(len(all_graphs(5)), 4, replace=False).tolist() + [59048]:  # 59048: dense
        weights = torch.from_numpy(all_graphs(5)[g]).float()
        batch = trials_on(tasks, weights, 1, 20000)
        env = batch.env()
        env.reset()
        samples = [env.step(torch.zeros(20000, dtype=torch.long))[0][:, :4] for _ in range(4)]
        x = torch.cat(samples).double()  # (80000, 4): the observed nodes X1..X4
        cov = reference_covariance(weights.double().numpy(), SIGMA)[1:, 1:]
        scale = np.sqrt(np.diag(cov))
        assert (np.abs(x.mean(0).numpy()) < 0.02 * scale).all(), g  # 5 standard errors
        assert np.allclose(np.cov(x.T.numpy()), cov, rtol=0.04, atol=4e-4), g


def test_a_do_intervention_cuts_the_edges_into_its_node():
    # X0 -> X1 -> X2 -> X3 and X0 -> X2: setting X2 = 5 leaves X1 as it was, moves X3 to -5
    tasks = tasks_of(nodes=4, test_graphs=3, val_graphs=3)
    weights = weights_of({(0, 1): 1, (1, 2): 1, (0, 2): 1, (2, 3): -1}, nodes=4)
    batch = trials_on(tasks, weights, 1, 40000)
    env = batch.env()
    env.reset()
    observation, reward, *_ = env.step(torch.full((40000,), 1))  # information action 1: do(X2)
    x1, x2, x3 = observation[:, :3].double().unbind(1)
    assert torch.equal(x2, torch.full_like(x2, 5.0))
    assert abs(x1.mean().item()) < 0.003 and x1.var().item() == pytest.approx(
        2 * SIGMA**2, rel=0.03
    )
    assert x3.mean().item() == pytest.approx(-5.0, abs=0.003)
    assert x3.var().item() == pytest.approx(SIGMA**2, rel=0.03)
    assert torch.equal(reward, torch.zeros(40000))  # information steps pay nothing


@pytest.mark.parametrize("nodes", [3, 4])
def test_the_associative_and_interventional_expectations_equal_monte_carlo(nodes: int):
    """Every graph of 3 nodes and 40 of 4, each quiz node: E[X | do(X_q = -5)] from draws of the
    SEM node by node, and E[X | X_q = -5] from the least-squares slope of X_i on X_q in
    observational draws (a Gaussian's conditional mean is linear); the agents' quiz choices
    are the best nodes by these Monte Carlo values."""
    rng = np.random.default_rng(nodes)
    graphs = all_graphs(nodes)
    chosen = range(len(graphs)) if nodes == 3 else rng.choice(len(graphs), 40, replace=False)
    for g, q in itertools.product(chosen, range(1, nodes)):
        weights = graphs[g].astype(np.float64)
        node, w = torch.tensor([q]), torch.from_numpy(weights)[None]
        do = reference_samples(weights, rng, 20000, q, -5.0).mean(0)
        seen = reference_samples(weights, rng, 20000)
        power = (seen[:, q] ** 2).sum()
        slope = (seen * seen[:, q : q + 1]).sum(0) / power
        error = np.sqrt(((seen - slope * seen[:, q : q + 1]) ** 2).mean(0) / power)  # its s.e.
        assert np.allclose(interventional_means(w, node, -5.0)[0], do, atol=0.01), (g, q)
        associative = associative_means(w, node, -5.0)[0].numpy()
        assert (np.abs(associative + 5 * slope) <= 5 * 5 * error + 1e-9).all(), (g, q)
        for policy, expected in ((Interventional(), do), (Associative(), -5 * slope)):
            pick = quiz_choice(policy, nodes, weights, q)
            assert expected[pick] >= expected[1:].max() - 0.1, (g, q, type(policy).__name__)


def quiz_choice(policy, nodes: int, weights: np.ndarray, quiz_node: int) -> int:
    """The node a reference agent picks in the quiz of one trial on this graph."""
    separate = nodes == 3  # both action spaces: quiz actions after the information ones, or not
    tasks = tasks_of(nodes=nodes, test_graphs=3, val_graphs=3, separate_quiz_actions=separate)
    env = trials_on(tasks, torch.from_numpy(weights).float(), quiz_node, 1).env()
    observation, _ = env.reset()
    policy.start(env, observation, seed=0)
    for _ in range(env.batch.steps - 1):
        actions = policy.act()
        observation, reward, done, _, _ = env.step(actions)
        policy.observe(actions, reward, observation, done)
    offset = nodes - 1 if env.batch.cfg.separate_quiz_actions else 0
    return int(policy.act()[0]) - offset + 1


def test_a_hidden_confounder_fools_the_associative_agent_but_not_the_interventional_one():
    tasks = tasks_of()
    batch = trials_on(tasks, weights_of(CONFOUNDED), 1, 2000)
    assert tasks.subsets(batch)["confounded"].all()
    reward = {}
    for name, policy in tasks.baselines().items():
        out = play(batch.env(), policy, seed=0)
        reward[name] = out["reward"].mean().item()
        if name == "associative":
            assert out["regret"].mean().item() == pytest.approx(5.0, abs=1e-4)
    assert reward["associative"] == pytest.approx(0.0, abs=0.02)  # it picks X3, which stays at 0
    assert reward["interventional"] == pytest.approx(5.0, abs=0.02)  # X4
    assert reward["random"] < 0.5


def test_held_out_graphs_and_their_relabelled_twins_never_appear_in_training():
    tasks = tasks_of()
    classes = graph_classes(5)
    held = {split: set(tasks.graphs[split].tolist()) for split in ("test", "val")}
    assert 300 <= len(held["test"]) < 300 + 120 and 300 <= len(held["val"]) < 300 + 120
    held_classes = set(classes[list(held["test"] | held["val"])].tolist())
    assert sum(len(v) for v in tasks.graphs.values()) == 3**10
    (train,) = tasks.episodes("train", 50000, seed=7, batch_size=50000)
    seen = set(train.graph.tolist())
    assert not seen & (held["test"] | held["val"])
    assert not set(classes[sorted(seen)].tolist()) & held_classes  # no relabelled twin either
    (test,) = tasks.episodes("test", 2000, seed=7, batch_size=2000)
    assert set(test.graph.tolist()) <= held["test"]
    assert torch.equal(test.weights, tasks.weights[test.graph])
    confounded = tasks.subsets(test)["confounded"]
    assert 0.3 < confounded.float().mean().item() < 0.9  # the test has both kinds of trial
    weights = all_graphs(5)[sorted(held["test"])]  # every relabelling that stays upper-triangular
    for order in itertools.permutations(range(5)):
        relabelled = weights[:, order][:, :, order]
        upper = (np.tril(relabelled) == 0).all((1, 2))
        assert set(graph_index(relabelled[upper]).tolist()) <= held["test"]


def test_the_same_seed_gives_the_same_trials_whatever_the_batch_size():
    tasks = tasks_of(variant="counterfactual")
    small = list(tasks.episodes("test", 50, seed=3, batch_size=7))
    (whole,) = tasks.episodes("test", 50, seed=3, batch_size=50)
    for key in ("graph", "weights", "quiz_node", "noise", "action_noise"):
        assert torch.equal(torch.cat([getattr(b, key) for b in small]), getattr(whole, key))
    rewards = torch.cat([play(b.env(), Counterfactual(), seed=0)["reward"] for b in small])
    assert torch.equal(rewards, play(whole.env(), Counterfactual(), seed=0)["reward"])
    (other,) = tasks.episodes("test", 50, seed=4, batch_size=50)
    assert not torch.equal(other.noise, whole.noise)


def test_the_trial_shows_the_quiz_node_last_and_charges_wrong_phase_actions():
    tasks = tasks_of(separate_quiz_actions=True)  # the paper's information and quiz actions
    (batch,) = tasks.episodes("test", 64, seed=0, batch_size=64)
    env = batch.env()
    observation, _ = env.reset()
    assert observation.shape == (64, 8) and not observation.any()  # nothing seen yet
    info_action, quiz_action = torch.zeros(64, dtype=torch.long), torch.full((64,), 4)
    for t in range(4):
        observation, reward, done, _, info = env.step(quiz_action if t == 0 else info_action)
        assert torch.equal(reward, torch.full((64,), -10.0 if t == 0 else 0.0))
        assert not done.any() and not info["trial_over"]
        quiz = torch.nn.functional.one_hot(batch.quiz_node - 1, 4).float()
        assert torch.equal(observation[:, 4:], quiz if t == 3 else torch.zeros(64, 4))
    _, reward, done, _, info = env.step(info_action)  # an information action in the quiz
    assert torch.equal(reward, torch.full((64,), -10.0)) and done.all() and info["trial_over"]
    (shared,) = tasks_of().episodes("test", 64, seed=0, batch_size=64)  # N - 1 actions
    env = shared.env()
    assert env.single_action_space.n == 4
    env.reset()
    for t in range(4):
        observation, reward, *_ = env.step(torch.full((64,), t))  # do(X_{t+1} = 5)
        assert (observation[:, t] == 5.0).all() and not reward.any()
    _, reward, *_ = env.step(torch.full((64,), 2))  # the quiz: choose X3
    assert torch.equal(reward, env.values[:, 3])


def test_observational_trials_ignore_the_actions():
    tasks = tasks_of(variant="observational")
    (batch,) = tasks.episodes("test", 32, seed=0, batch_size=32)
    shown = []
    for action in (0, 3):
        env = batch.env()
        env.reset()
        shown.append(env.step(torch.full((32,), action))[0])
    assert torch.equal(shown[0], shown[1]) and not (shown[0][:, :4] == 5.0).any()


def test_counterfactual_quizzes_reuse_the_last_information_steps_noise():
    """With every noise of the last information step seen (the hidden root has no children, no
    intervention then), the counterfactual expectation is exactly the quiz's outcome; and the
    abduction equals Gaussian conditioning of the noise on what the step showed."""
    tasks = tasks_of(variant="counterfactual", separate_quiz_actions=True)
    weights = weights_of({(1, 2): 1, (2, 3): -1, (1, 4): 1, (3, 4): 1})
    batch = trials_on(tasks, weights, 2, 100)
    env = batch.env()
    env.reset()
    for action in (0, 1, 2, 4):  # the last information step takes a quiz action: no intervention
        env.step(torch.full((100,), action))
    expected = counterfactual_means(
        batch.weights, env.values, env.intervened, batch.quiz_node, -5.0
    )
    env.step(torch.full((100,), 4 + 3))  # choose X4 in the quiz
    assert torch.allclose(expected[:, 1:], env.values[:, 1:], atol=1e-5)  # X0 is not seen
    rng = np.random.default_rng(0)
    for g in rng.choice(3**10, 30, replace=False):
        w = all_graphs(5)[g].astype(np.float64)
        k, q = rng.integers(1, 5, size=2)
        x = reference_samples(w, rng, 1, k, 5.0)[0]
        got = counterfactual_means(torch.from_numpy(w)[None], torch.from_numpy(x)[None],
                                   torch.tensor([k]), torch.tensor([q]), -5.0)[0]  # fmt: skip
        assert np.allclose(got.numpy(), conditioned(w, x, k, q), atol=1e-9), g


def conditioned(weights: np.ndarray, x: np.ndarray, k: int, q: int) -> np.ndarray:
    """E[X] had do(X_k = 5) been do(X_q = -5), from E[e | observed nodes] by the generic Gaussian
    formula Sigma_e A^T (A Sigma_e A^T)^-1 (x - b) for observed = A e + b."""
    n = len(weights)
    cut = weights.copy()
    cut[:, k] = 0
    mix = np.linalg.inv(np.eye(n) - cut.T)  # X = mix @ e' with e'_k = 5
    shown = [i for i in range(1, n) if i != k]
    a = mix[shown] * (np.arange(n) != k)  # the observed nodes' dependence on the free noise
    b = mix[shown, k] * 5.0
    noise = a.T @ np.linalg.solve(a @ a.T, x[shown] - b)  # sigma^2 cancels
    noise[k] = 0.0  # never seen: its prior mean
    cut = weights.copy()
    cut[:, q] = 0
    noise[q] = -5.0
    return np.linalg.inv(np.eye(n) - cut.T) @ noise


def test_the_reference_agents_rank_as_their_knowledge_on_the_test_graphs():
    for variant in ("interventional", "counterfactual"):
        tasks = tasks_of(variant=variant)
        (batch,) = tasks.episodes("test", 3000, seed=1234, batch_size=3000)
        confounded = tasks.subsets(batch)["confounded"]
        out = {name: play(batch.env(), p, seed=0) for name, p in tasks.baselines().items()}
        reward = {name: o["reward"].mean().item() for name, o in out.items()}
        assert reward["random"] + 2 < reward["associative"] < reward["interventional"], reward
        gap = out["interventional"]["reward"] - out["associative"]["reward"]
        assert gap[confounded].mean() > gap[~confounded].mean() + 0.05
        if variant == "counterfactual":
            assert reward["counterfactual"] > reward["interventional"] + 0.03, reward
            assert out["counterfactual"]["regret"].abs().max() < 1e-4


def test_the_bayes_observational_agent_is_brute_force_bayes_on_every_3_node_graph(float64):
    """Its quiz choice against a transcription of Bayes' rule: each graph's likelihood of the
    information phase's samples from the definition (node by node covariance, a multivariate
    normal per sample), a uniform prior, the posterior mean of E[X | do(X_q = -5)]."""
    tasks = tasks_of(nodes=3, test_graphs=3, val_graphs=3, variant="observational", info_steps=3)
    graphs = all_graphs(3).astype(np.float64)
    (batch,) = tasks.episodes("test", 40, seed=5, batch_size=40)
    policy = BayesObservational(torch.from_numpy(graphs))
    env = batch.env()
    observation, _ = env.reset()
    policy.start(env, observation, seed=0)
    samples = []
    for _ in range(batch.steps - 1):
        actions = policy.act()
        observation, reward, done, _, _ = env.step(actions)
        policy.observe(actions, reward, observation, done)
        samples.append(observation[:, :2].double().numpy())
    samples = np.stack(samples, 1)  # (T, S, 2)
    likelihoods = np.array(
        [
            [
                np.prod(
                    [
                        multivariate_normal_density(x, reference_covariance(w, SIGMA)[1:, 1:])
                        for x in trial
                    ]
                )
                for w in graphs
            ]
            for trial in samples
        ]
    )
    posterior = likelihoods / likelihoods.sum(1, keepdims=True)
    quiz = policy.quiz_node()
    do_means = np.stack(
        [
            interventional_means(torch.from_numpy(graphs), torch.full((27,), q), -5.0).numpy()
            for q in (1, 2)
        ]
    )  # (2, G, N)
    expected = np.einsum("tg,tgn->tn", posterior, do_means[quiz.numpy() - 1])
    torch.testing.assert_close(
        policy.quiz_means().double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(posterior, 1 / 27)  # the samples told it something


def multivariate_normal_density(x: np.ndarray, covariance: np.ndarray) -> float:
    k = len(x)
    quadratic = x @ np.linalg.solve(covariance, x)
    return float(np.exp(-0.5 * quadratic) / np.sqrt((2 * np.pi) ** k * np.linalg.det(covariance)))


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"variant": "conditional"}, "data.variant"),
        ({"nodes": 6}, "data.nodes"),
        ({"info_steps": 0}, "data.info_steps"),
        ({"noise_std": 0.0}, "data.noise_std"),
        ({"penalty": -1.0}, "data.penalty"),
        ({"nodes": 3, "test_graphs": 10}, "data.test_graphs"),
    ],
)
def test_bad_config_values_fail_with_the_key_and_the_fix(overrides: dict, key: str):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        CausalConfig(**overrides)


def test_rl2_trains_on_causal_quizzes_and_reports_every_baseline(tmp_path):
    from metalearn.cli import train

    overrides = ["algo=rl2", "data=causal", "data.variant=counterfactual", "debug=smoke"]
    config = compose_config([*overrides, "hardware.threads=1", "model.hidden=8"])
    results = train(build_run(config), tmp_path)
    assert results["metric"] == "reward" and results["task"]["variant"] == "counterfactual"
    assert set(results["baselines"]) == {
        "random",
        "associative",
        "interventional",
        "counterfactual",
    }
    subsets = [e["subset"] for e in results["baselines"]["interventional"]["breakdown"]]
    assert set(subsets) <= {"confounded", "unconfounded"} and subsets
    # the agent minus each baseline, paired trial by trial on the same trials: the mean of the
    # differences is the difference of the means
    versus = results["test"]["versus"]
    assert set(versus) == set(results["baselines"])
    for name, baseline in results["baselines"].items():
        for key in ("reward", "regret"):
            difference = results["test"][key]["mean"] - baseline[key]["mean"]
            assert versus[name][key]["mean"] == pytest.approx(difference, abs=1e-9)
    assert versus["counterfactual"]["regret"]["ci95"] == pytest.approx(
        results["test"]["regret"]["ci95"]  # the optimal baseline's regret is 0 on every trial
    )
    assert [e["subset"] for e in versus["random"]["breakdown"]] == subsets
    with pytest.raises(ConfigError, match="data.variant must be one of"):
        build_run(
            compose_config(["algo=rl2", "data=causal", "data.variant=passive", "debug=smoke"])
        )
