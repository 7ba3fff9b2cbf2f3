"""The Harlow task and random tabular MDPs: environments against their definitions, and the
reference policies scored on them."""

import itertools

import gymnasium
import pytest
import torch
from conftest import compose_config

from metalearn.build import build_run
from metalearn.envs.harlow import HarlowConfig, HarlowTasks, IdealLearner
from metalearn.envs.tabular_mdp import PSRL, MDPTasks, TabularMDPConfig, optimal_values
from metalearn.envs.trials import RandomPolicy, play
from metalearn.errors import ConfigError

CPU = torch.device("cpu")


def test_harlow_rewards_one_object_wherever_it_appears():
    tasks = HarlowTasks(HarlowConfig(trials=6, features=4, objects=50), CPU)
    (batch,) = tasks.episodes("train", 8, seed=0, batch_size=8)
    env = batch.env()
    assert isinstance(env, gymnasium.vector.VectorEnv)
    observation, _ = env.reset()
    paying = torch.where(
        batch.rewarded_side[:, :1] == 0, batch.shown[:, 0, 0], batch.shown[:, 0, 1]
    )
    for t in range(6):
        left, right = observation.view(8, 2, 4).unbind(1)
        assert torch.equal(observation, batch.shown[:, t].flatten(1))
        right_pays = (right == paying).all(-1)
        assert torch.equal(right_pays | (left == paying).all(-1), torch.ones(8, dtype=torch.bool))
        observation, reward, *_ = env.step(right_pays.long())  # always the paying side
        assert torch.equal(reward, torch.ones(8))


def test_harlow_objects_of_the_test_split_are_never_seen_in_training():
    tasks = HarlowTasks(HarlowConfig(objects=100), CPU)
    seen = {tuple(v.tolist()) for v in tasks.pools["train"]}
    assert not seen & {tuple(v.tolist()) for v in tasks.pools["test"]}
    (batch,) = tasks.episodes("test", 20, seed=0, batch_size=20)
    shown = {tuple(v.tolist()) for v in batch.shown.flatten(0, 2)}
    assert shown <= {tuple(v.tolist()) for v in tasks.pools["test"]}
    with pytest.raises(ConfigError, match="data.trials"):
        HarlowConfig(trials=1)


def test_the_ideal_harlow_learner_guesses_once_then_is_always_right():
    tasks = HarlowTasks(HarlowConfig(), CPU)
    (batch,) = tasks.episodes("test", 1000, seed=0, batch_size=1000)
    ideal = play(batch.env(), IdealLearner(), seed=0)["rewards"].mean(0)
    assert ideal[0].item() == pytest.approx(0.5, abs=0.05)  # 1000 guesses: +-0.03
    assert torch.equal(ideal[1:], torch.ones(5, dtype=ideal.dtype))
    random = play(batch.env(), RandomPolicy(), seed=0)["rewards"].mean()
    assert random.item() == pytest.approx(0.5, abs=0.03)


def tiny_mdp_tasks(**overrides) -> MDPTasks:
    return MDPTasks(TabularMDPConfig(**{"states": 3, "actions": 2, **overrides}), CPU)


def test_value_iteration_equals_brute_force_over_every_policy():
    (batch,) = tiny_mdp_tasks().episodes("test", 4, seed=0, batch_size=4)
    q = optimal_values(batch.transitions.double(), batch.means.double(), horizon=3)

    def value(t: int, s: int, steps: int) -> float:  # the best over all action sequences
        if steps == 0:
            return 0.0
        p, mu = batch.transitions[t].double(), batch.means[t].double()
        return max(
            mu[s, a].item() + sum(p[s, a, n].item() * value(t, n, steps - 1) for n in range(3))
            for a in range(2)
        )

    for t, s in itertools.product(range(4), range(3)):
        assert q[t, -1, s].max().item() == pytest.approx(value(t, s, 3), abs=1e-9)


def test_mdp_steps_follow_the_transition_probabilities_and_episodes_restart():
    tasks = tiny_mdp_tasks(horizon=2, episodes=1)
    (batch,) = tasks.episodes("test", 20000, seed=0, batch_size=20000)
    batch.transitions[:] = batch.transitions[:1]  # one MDP, 20000 draws of its first step
    env = batch.env()
    env.reset()
    observation, reward, done, _, _ = env.step(torch.ones(20000, dtype=torch.long))
    frequencies = observation.mean(0)
    assert torch.allclose(frequencies, batch.transitions[0, 0, 1], atol=0.015)
    assert not done.any()
    observation, _, done, _, info = env.step(torch.zeros(20000, dtype=torch.long))
    assert done.all() and info["trial_over"] and (observation.argmax(-1) == 0).all()


def test_psrl_beats_random_on_the_fixed_trials():
    tasks = MDPTasks(TabularMDPConfig(episodes=10), CPU)
    (batch,) = tasks.episodes("test", 300, seed=1234, batch_size=300)
    reward = {
        name: play(batch.env(), policy, seed=0)["reward"].mean().item()
        for name, policy in tasks.baselines().items()
    }
    assert reward["random"] == pytest.approx(100.0, abs=5.0)  # 100 steps of mean 1
    assert reward["psrl"] > reward["random"] + 20, reward
    assert isinstance(tasks.baselines()["psrl"], PSRL)


@pytest.mark.parametrize("data", ["harlow", "tabular_mdp"])
def test_rl2_runs_on_every_meta_rl_family(data: str, tmp_path):
    from metalearn.cli import train

    overrides = ["algo=rl2", f"data={data}", "debug=smoke", "hardware.threads=1"]
    results = train(build_run(compose_config([*overrides, "model.hidden=8"])), tmp_path)
    assert results["metric"] == "reward" and set(results["test"]) >= {"reward", "regret"}
    if data == "harlow":  # accuracy by choice, for the agent and for each baseline
        assert [e["trial"] for e in results["test"]["breakdown"]] == [1, 2, 3, 4, 5, 6]
        assert results["baselines"]["ideal"]["breakdown"][1]["accuracy"]["mean"] == 1.0
        assert (tmp_path / "plots" / "accuracy.png").is_file()
    else:
        assert set(results["baselines"]) == {"random", "psrl"}
