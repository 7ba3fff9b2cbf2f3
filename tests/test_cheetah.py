"""HalfCheetah velocity and direction (envs/cheetah.py) on Gymnasium's MuJoCo HalfCheetah-v5:
the rewards against their definitions on a plain Gymnasium environment, clipping, the fixed test
tasks' reproducibility, a short MAML-TRPO run, and the clear error without the MuJoCo extra."""

import importlib.util

import pytest
import torch
from conftest import compose_config

from metalearn.build import build_run
from metalearn.errors import ConfigError

mujoco_missing = importlib.util.find_spec("mujoco") is None
needs_mujoco = pytest.mark.skipif(
    mujoco_missing, reason="MuJoCo is an optional extra: pip install -e '.[mujoco]'"
)
CPU = torch.device("cpu")


def family(task: str, horizon: int = 5):
    from metalearn.envs.cheetah import CheetahConfig, CheetahTasks

    return CheetahTasks(CheetahConfig(name=f"cheetah_{task}", task=task, horizon=horizon), CPU)


@needs_mujoco
@pytest.mark.parametrize("task", ["velocity", "direction"])
def test_the_rewards_are_their_definitions_on_a_plain_gymnasium_cheetah(task, float64):
    import gymnasium as gym

    batch = family(task).sample("train", torch.Generator().manual_seed(0), 2)
    env = batch.env(trajectories=1)
    observations, _ = env.reset()
    plain = gym.make("HalfCheetah-v5")
    plain_observation, _ = plain.reset(seed=env.seeds[1])  # task 1's one trajectory
    torch.testing.assert_close(observations[1], torch.as_tensor(plain_observation))
    actions = torch.linspace(-1.5, 1.5, 12).view(2, 6)  # some beyond the bounds
    for _ in range(3):
        observations, rewards, terminated, truncated, info = env.step(actions)
        clipped = actions[1].clamp(-1, 1)
        plain_observation, _, _, _, plain_info = plain.step(clipped.numpy())
        velocity = plain_info["x_velocity"]
        goal = batch.goals[1].item()
        ctrl = 0.05 * clipped.square().sum().item()
        expected = -abs(velocity - goal) - ctrl if task == "velocity" else goal * velocity - ctrl
        assert rewards[1].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
        torch.testing.assert_close(observations[1], torch.as_tensor(plain_observation))
        assert info["valid"].all() and not terminated.any()
    assert not truncated.any()
    env.step(actions), env.step(actions)  # the fifth step ends the episodes
    assert env.t == 5
    with pytest.raises(RuntimeError, match="reset"):
        env.step(actions)


@needs_mujoco
def test_goals_are_drawn_from_their_ranges():
    velocity = family("velocity").sample("train", torch.Generator().manual_seed(0), 500)
    assert 0 <= velocity.goals.min() and velocity.goals.max() <= 2
    assert velocity.goals.std() > 0.5  # spread over the range, not a constant
    direction = family("direction").sample("train", torch.Generator().manual_seed(0), 500)
    assert set(direction.goals.tolist()) == {-1.0, 1.0}
    assert 0.4 < (direction.goals > 0).double().mean() < 0.6


@needs_mujoco
def test_a_fixed_test_task_gives_the_same_trajectories_to_the_same_policy(float64):
    from metalearn.algos.rl.trajectories import per_task, sample
    from metalearn.models.policy import GaussianMLPPolicy, GaussianPolicyConfig

    torch.manual_seed(0)
    policy = GaussianMLPPolicy(GaussianPolicyConfig(hidden_sizes=[4]), (17,), 6)
    tasks = family("velocity")
    (first,) = tasks.episodes("test", 2, seed=3, batch_size=2)
    (again,) = tasks.episodes("test", 2, seed=3, batch_size=2)
    params = per_task(policy.params(), 2)
    a = sample(policy, params, first, 0, 3, gamma=0.99, gae_lambda=1.0)
    b = sample(policy, params, again, 0, 3, gamma=0.99, gae_lambda=1.0)
    torch.testing.assert_close(a.rewards, b.rewards, rtol=0, atol=0)
    torch.testing.assert_close(a.observations, b.observations, rtol=0, atol=0)
    c = sample(policy, params, first, 1, 3, gamma=0.99, gae_lambda=1.0)  # the next stage
    assert not torch.equal(a.actions, c.actions)
    torch.testing.assert_close(a.observations[:, :, 0], c.observations[:, :, 0])  # same starts


@needs_mujoco
def test_maml_trpo_runs_on_the_cheetah_and_reports_the_return_per_inner_step(tmp_path):
    from metalearn.cli import train

    overrides = [
        "debug=smoke",
        "hardware.threads=1",
        "algo=maml_trpo",
        "data=cheetah_direction",
        "data.horizon=10",
        "model.hidden_sizes=[8]",
        "algo.trajectories=2",
        "trainer.iterations=2",
        "eval.episodes=2",
        "eval.steps=[0,1]",
    ]
    result = train(build_run(compose_config(overrides)), tmp_path)
    test = result["test"]
    assert [row["inner_steps"] for row in test["breakdown"]] == [0, 1]
    assert test["return"]["mean"] == test["breakdown"][1]["return"]["mean"]
    assert (tmp_path / "plots" / "return_vs_steps.png").exists()


def test_without_mujoco_choosing_the_cheetah_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mujoco" else real(name, *a)
    )
    with pytest.raises(ConfigError) as error:
        build_run(compose_config(["debug=smoke", "algo=maml_trpo", "data=cheetah_velocity"]))
    assert "pip install -e '.[mujoco]'" in str(error.value) and "MuJoCo" in str(error.value)


@needs_mujoco
@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("data.task=sideways", ["data.task", "velocity, direction"]),
        ("data.velocity_low=3", ["data.velocity_low"]),
        ("data.horizon=0", ["data.horizon"]),
    ],
)
def test_bad_cheetah_settings_are_config_errors(override, words):
    with pytest.raises(ConfigError) as error:
        build_run(
            compose_config(["debug=smoke", "algo=maml_trpo", "data=cheetah_velocity", override])
        )
    for word in words:
        assert word in str(error.value)
