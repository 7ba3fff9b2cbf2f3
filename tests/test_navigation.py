"""MAML's 2-D navigation tasks against their definition (cbfinn/maml_rl point_env_randgoal.py):
clipping, reward after the step, done on both coordinates, episodes that stay over."""

import gymnasium
import pytest
import torch

from metalearn.envs.navigation import NavigationBatch, NavigationConfig, NavigationTasks, rollout
from metalearn.errors import ConfigError

CPU = torch.device("cpu")


def env_with_goals(goals: list[list[float]], **overrides):
    cfg = NavigationConfig(**overrides)
    return NavigationBatch(torch.tensor(goals, dtype=torch.float64), cfg).env()


def test_actions_are_clipped_and_the_reward_is_the_distance_after_the_step():
    env = env_with_goals([[0.3, -0.2], [0.05, 0.05]])
    observation, _ = env.reset()
    assert torch.equal(observation, torch.zeros(2, 2, dtype=torch.float64))
    actions = torch.tensor([[0.3, -0.05], [-7.0, 0.02]], dtype=torch.float64)
    observation, reward, done, truncated, info = env.step(actions)
    moved = torch.tensor([[0.1, -0.05], [-0.1, 0.02]], dtype=torch.float64)  # clipped to 0.1
    assert torch.allclose(observation, moved)
    expected = -torch.tensor([(0.2**2 + 0.15**2) ** 0.5, (0.15**2 + 0.03**2) ** 0.5])
    assert torch.allclose(reward, expected.double())  # not the distance before the step (0.36)
    assert not done.any() and not truncated.any() and info["valid"].all()
    observation, reward, *_ = env.step(actions)
    assert torch.allclose(observation, 2 * moved)  # the state accumulates the velocities
    assert reward[0].item() == pytest.approx(-((0.1**2 + 0.1**2) ** 0.5))


def test_rescaled_actions_follow_rllabs_normalized_env():
    env = env_with_goals([[0.3, -0.2]], rescale_actions=True)
    assert env.single_action_space.high.tolist() == [1.0, 1.0]
    env.reset()
    observation, *_ = env.step(torch.tensor([[0.5, -3.0]], dtype=torch.float64))
    assert torch.allclose(observation, torch.tensor([[0.05, -0.1]], dtype=torch.float64))


def test_done_needs_both_coordinates_within_the_threshold():
    # after one step of (0.1, 0): |dx| = 0 for both; |dy| = 0.005 (done) or 0.02 (not done)
    env = env_with_goals([[0.1, 0.005], [0.1, 0.02], [0.095, -0.0099]])
    env.reset()
    _, _, done, _, _ = env.step(torch.tensor([[0.1, 0.0]] * 3, dtype=torch.float64))
    assert done.tolist() == [True, False, True]


def test_an_episode_that_reaches_the_goal_stays_done():
    env = env_with_goals([[0.1, 0.0], [0.5, 0.5]], horizon=5)
    env.reset()
    to_goal = torch.tensor([[0.1, 0.0], [0.1, 0.1]], dtype=torch.float64)
    observation, reward, done, _, info = env.step(to_goal)
    assert done.tolist() == [True, False] and info["valid"].all()
    assert reward[0].item() == pytest.approx(0.0, abs=1e-12)  # the reward of the step that ends
    away = torch.tensor([[-0.1, 0.1], [0.1, 0.1]], dtype=torch.float64)
    for step in range(2, 6):
        before = observation
        observation, reward, done, truncated, info = env.step(away)
        assert torch.equal(observation[0], before[0]) and reward[0].item() == 0.0
        assert info["valid"].tolist() == [False, True]
        assert done.tolist() == [True, step == 5]  # the second reaches (0.5, 0.5) at step 5
        assert not truncated.any()  # terminated at the last step: not cut off
    with pytest.raises(RuntimeError, match="reset"):
        env.step(away)


def test_episodes_that_run_out_of_time_are_truncated_and_follow_the_vector_api():
    env = env_with_goals([[0.5, 0.5], [-0.5, 0.2]], horizon=3)
    assert isinstance(env, gymnasium.vector.VectorEnv)
    assert env.observation_space.shape == (2, 2) and env.action_space.shape == (2, 2)
    assert env.single_action_space.high.tolist() == pytest.approx([0.1, 0.1])
    env.reset()
    truncations = [env.step(torch.zeros(2, 2, dtype=torch.float64))[3] for _ in range(3)]
    assert [t.tolist() for t in truncations] == [[False, False], [False, False], [True, True]]


def test_the_same_seed_gives_the_same_goals_whatever_the_batch_size():
    tasks = NavigationTasks(NavigationConfig(), CPU)
    whole = torch.cat([b.goals for b in tasks.episodes("test", 10, seed=3, batch_size=10)])
    parts = [b.goals for b in tasks.episodes("test", 10, seed=3, batch_size=3)]
    assert [p.shape[0] for p in parts] == [3, 3, 3, 1] and torch.equal(torch.cat(parts), whole)
    other = torch.cat([b.goals for b in tasks.episodes("test", 10, seed=4, batch_size=10)])
    assert not torch.equal(whole, other)
    many = tasks.sample("train", torch.Generator().manual_seed(0), 20000).goals
    assert many.min() >= -0.5 and many.max() <= 0.5
    assert torch.allclose(many.mean(0), torch.zeros(2), atol=0.01)  # U[-0.5, 0.5]: sd 0.002
    wide = NavigationTasks(NavigationConfig(goal_low=1.0, goal_high=3.0), CPU)
    goals = wide.sample("train", torch.Generator().manual_seed(0), 1000).goals
    assert goals.min() >= 1.0 and goals.max() <= 3.0 and goals.max() > 2.9


def test_environments_are_task_major_and_a_straight_policy_beats_a_random_one():
    tasks = NavigationTasks(NavigationConfig(), CPU)
    (batch,) = tasks.episodes("test", 50, seed=0, batch_size=50)
    env = batch.env(trajectories=20)  # E = 1000 episodes at once
    assert torch.equal(env.goals[20:40], batch.goals[1].expand(20, 2))
    straight = rollout(env, lambda observation: env.goals - observation)
    noise = torch.Generator().manual_seed(1)
    random = rollout(env, lambda o: 0.1 * (2 * torch.rand(o.shape, generator=noise) - 1))
    assert straight["rewards"].shape == (1000, 100)
    assert straight["observations"].shape == straight["actions"].shape == (1000, 100, 2)
    assert (straight["rewards"][~straight["valid"]] == 0).all()
    steps = straight["valid"].sum(1)  # at most ceil(0.5 / 0.1) = 5 steps to any goal
    assert steps.max().item() <= 5 and (steps < 100).all()
    straight_return = straight["rewards"].sum(1).mean().item()
    random_return = random["rewards"].sum(1).mean().item()
    assert straight_return > -2.0 and random_return < -20.0, (straight_return, random_return)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"horizon": 0}, "data.horizon"),
        ({"horizon": 2.5}, "data.horizon"),
        ({"goal_low": 0.5, "goal_high": 0.5}, "data.goal_low"),
        ({"action_bound": 0.0}, "data.action_bound"),
        ({"done_threshold": -0.01}, "data.done_threshold"),
        ({"goal_high": float("inf")}, "data.goal_high"),
        ({"action_bound": "0.1"}, "data.action_bound"),
    ],
)
def test_impossible_settings_are_config_errors(overrides: dict, key: str):
    with pytest.raises(ConfigError, match=key):
        NavigationConfig(**overrides)


def test_the_run_name_spells_the_goal_range_without_brackets():
    from conftest import compose_config

    from metalearn.build import build_run

    run = build_run(compose_config(["debug=smoke", "algo=maml_trpo", "data=navigation"]))
    assert run.name.startswith("maml_trpo-navigation--0.5to0.5goals100horizon")
    assert not set("[], ") & set(run.name)
