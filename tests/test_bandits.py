"""Meta-RL on bandits: the environment, the baselines and the Gittins index, RL² learning."""

import functools
import json
import shutil
import subprocess
import sys

import gymnasium
import pytest
import torch
from conftest import compose_config

from metalearn.algos.blackbox.rl2 import RL2, RL2Config
from metalearn.build import build_run
from metalearn.cli import train
from metalearn.envs.bandits import BanditConfig, BanditTasks, DependentBanditConfig
from metalearn.envs.baselines import bandit_baselines, finite_horizon_gittins
from metalearn.envs.trials import play, sample_actions
from metalearn.errors import ConfigError
from metalearn.models.recurrent import RecurrentActorCritic, RecurrentConfig

CPU = torch.device("cpu")
SMOKE = ["debug=smoke", "hardware.threads=1"]


def test_the_env_is_a_gymnasium_vector_env_whose_rewards_follow_the_noise():
    tasks = BanditTasks(BanditConfig(arms=3, pulls=4), CPU)
    batch = tasks.sample("train", torch.Generator().manual_seed(0), 6)
    env = batch.env()
    assert isinstance(env, gymnasium.vector.VectorEnv)
    assert env.num_envs == 6 and env.single_action_space.n == 3
    observation, _ = env.reset()
    assert observation.shape == (6, 0)
    for t in range(4):
        actions = torch.tensor([0, 1, 2, 0, 1, 2])
        _, reward, terminated, truncated, info = env.step(actions)
        chosen = batch.probs[torch.arange(6), actions]
        assert torch.equal(reward, (batch.reward_noise[:, t] < chosen).float())
        assert torch.allclose(info["regret"], batch.probs.max(1).values - chosen)
        assert terminated.all() and not truncated.any()  # every pull is an episode
        assert info["trial_over"] == (t == 3)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(actions)


def test_fixed_trials_do_not_depend_on_the_batch_size_and_dependent_arms_sum_to_one():
    tasks = BanditTasks(DependentBanditConfig(pulls=5), CPU)
    whole = torch.cat([b.probs for b in tasks.episodes("test", 10, seed=3, batch_size=10)])
    parts = torch.cat([b.probs for b in tasks.episodes("test", 10, seed=3, batch_size=4)])
    assert torch.equal(whole, parts)
    assert torch.allclose(whole.sum(1), torch.ones(10))
    with pytest.raises(ConfigError, match="two arms"):
        DependentBanditConfig(arms=3)


def test_sample_actions_follows_the_probabilities():
    probs = torch.tensor([[0.2, 0.5, 0.3]]).expand(30000, -1)
    actions = sample_actions(probs, torch.rand(30000, generator=torch.Generator().manual_seed(0)))
    frequencies = torch.bincount(actions, minlength=3).float() / 30000
    assert torch.allclose(frequencies, probs[0], atol=0.01)


@functools.lru_cache
def one_armed_value(s: int, f: int, m: int, lam: float) -> float:
    """Optimal value of m pulls choosing between a Beta(s+1, f+1) arm and a known lam-arm (once
    retired, always retired): the calibration problem, by plain recursion."""
    if m == 0:
        return 0.0
    p = (s + 1) / (s + f + 2)
    pull = p * (1 + one_armed_value(s + 1, f, m - 1, lam)) + (1 - p) * one_armed_value(
        s, f + 1, m - 1, lam
    )
    return max(m * lam, pull)


def test_gittins_index_matches_known_values_and_its_definition():
    table = finite_horizon_gittins(6)
    for s in range(6):  # one pull left: the index is the posterior mean
        for f in range(6 - s):
            assert table[1, s, f].item() == pytest.approx((s + 1) / (s + f + 2), abs=1e-6)
    # two pulls left from the prior: 2 lam = 5/6 + lam/2 (pull once, keep the arm if it paid)
    assert table[2, 0, 0].item() == pytest.approx(5 / 9, abs=1e-6)
    for m in range(2, 7):
        for s in range(7 - m):
            for f in range(7 - m - s):
                index = table[m, s, f].item()
                for lam, pull_is_better in ((index - 2e-3, True), (index + 2e-3, False)):
                    p = (s + 1) / (s + f + 2)
                    pull = p * (1 + one_armed_value(s + 1, f, m - 1, lam)) + (
                        1 - p
                    ) * one_armed_value(s, f + 1, m - 1, lam)
                    assert (pull > m * lam) == pull_is_better, (m, s, f)
                assert index > table[m - 1, s, f].item()  # more pulls left: worth more


def test_baselines_on_the_fixed_trials_match_duan_et_al():
    """Duan et al. (2016), Table 1, k = 5, n = 10: random 5.0, Gittins 6.6."""
    tasks = BanditTasks(BanditConfig(arms=5, pulls=10), CPU)
    (batch,) = tasks.episodes("test", 2000, seed=1234, batch_size=2000)
    policies = bandit_baselines(10)
    reward = {
        name: play(batch.env(), policy, seed=0)["reward"] for name, policy in policies.items()
    }
    mean = {name: r.mean().item() for name, r in reward.items()}
    assert mean["random"] == pytest.approx(5.0, abs=0.15)
    assert mean["gittins"] == pytest.approx(6.6, abs=0.15)
    for name in ("greedy", "epsilon_greedy", "ucb1", "thompson", "gittins"):
        assert mean[name] > mean["random"] + 0.4, name


def test_gae_with_lambda_one_is_the_discounted_return_minus_the_value():
    model = RecurrentActorCritic(RecurrentConfig(hidden=4), (0,), 2)
    algo = RL2(RL2Config(gamma=0.9, gae_lambda=1.0), model, "rl", "loop")
    rewards, values = torch.rand(3, 5), torch.rand(3, 5)
    returns = torch.zeros(3, 5)
    for t in range(5):
        returns[:, t] = sum(0.9**k * rewards[:, t + k] for k in range(5 - t))
    assert torch.allclose(algo.advantages(rewards, values), returns - values, atol=1e-6)
    algo.cfg.gae_lambda = 0.0  # one-step TD errors
    td = rewards + 0.9 * torch.nn.functional.pad(values[:, 1:], (0, 1)) - values
    assert torch.allclose(algo.advantages(rewards, values), td, atol=1e-6)


def test_rl2_learns_a_two_armed_bandit_far_beyond_random(tmp_path):
    run = build_run(
        compose_config(
            [
                "algo=rl2",
                "data=bandit",
                "data.arms=2",
                "data.pulls=20",
                "model.hidden=64",
                "algo.outer_lr=0.01",
                *SMOKE,
                "trainer.iterations=300",
                "trainer.eval_every=300",
                "trainer.log_every=50",
                "trainer.meta_batch_size=128",
                "eval.episodes=1000",
                "eval.batch_size=1000",
                "eval.val_episodes=200",
            ]
        )
    )
    results = train(run, tmp_path)
    agent, random = results["test"]["reward"], results["baselines"]["random"]["reward"]
    # random gets 10 +- 0.2 (95% CI over 1000 trials), Gittins 12.4; a learner exploits
    assert agent["mean"] > random["mean"] + 1.0, (agent, random)
    assert results["test"]["regret"]["mean"] < results["baselines"]["random"]["regret"]["mean"]


def test_a_meta_rl_run_writes_reward_regret_baselines_and_the_regret_plot(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "metalearn.cli", "train", "algo=rl2", "data=dependent_bandit",
         "data.pulls=20", *SMOKE, f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metric"] == "reward" and results["task"] == {"arms": 2, "pulls": 20}
    for key in ("reward", "regret"):
        assert set(results["test"][key]) == {"mean", "ci95"}
    assert results["test"]["episodes"] == 10
    assert set(results["baselines"]) == set(bandit_baselines(20))
    assert 0 <= results["test"]["reward"]["mean"] <= 20
    assert (tmp_path / "plots" / "regret.png").stat().st_size > 0
    assert "gittins" in done.stdout and "thompson" in done.stdout


def test_rl2_ppo_learns_a_two_armed_bandit_with_epochs_of_clipped_steps(tmp_path):
    """PPO through the trainer's multi-step hook: ppo_epochs x ppo_minibatches outer steps per
    meta-batch (counted by Adam), each gradient clipped, and learning beyond random."""
    run = build_run(
        compose_config(
            [
                "algo=rl2",
                "algo.optimizer=ppo",
                "algo.ppo_epochs=2",
                "algo.ppo_minibatches=4",
                "data=bandit",
                "data.arms=2",
                "data.pulls=20",
                "model.hidden=64",
                "algo.outer_lr=0.003",
                *SMOKE,
                "trainer.iterations=150",
                "trainer.eval_every=150",
                "trainer.log_every=50",
                "trainer.meta_batch_size=128",
                "trainer.clip_grad_norm=0.5",
                "eval.episodes=1000",
                "eval.batch_size=1000",
                "eval.val_episodes=200",
            ]
        )
    )
    results = train(run, tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {150 * 2 * 4}
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    norms = [r["train/grad_norm"] for r in logged if "train/grad_norm" in r]
    assert norms and all(n > 0 for n in norms)
    assert any("train/clipped" in r for r in logged)
    agent, random = results["test"]["reward"], results["baselines"]["random"]["reward"]
    assert agent["mean"] > random["mean"] + 1.0, (agent, random)


def test_a_resumed_meta_rl_run_ends_where_an_uninterrupted_one_does(tmp_path):
    common = ["algo=rl2", "data=bandit", "model.hidden=8", *SMOKE, "trainer.eval_every=2"]
    whole = train(build_run(compose_config([*common, "trainer.iterations=4"])), tmp_path / "a")
    train(build_run(compose_config([*common, "trainer.iterations=2"])), tmp_path / "b")
    resumed = train(
        build_run(compose_config([*common, "trainer.iterations=4", "trainer.resume=true"])),
        tmp_path / "b",
    )
    assert resumed["test"] == whole["test"] and resumed["val"] == whole["val"]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["algo=maml", "data=bandit"], ["algo=maml", "meta-RL", "rl2"]),
        (["algo=rl2", "data=omniglot"], ["algo=rl2", "supervised", "bandit"]),
        (["algo=rl2", "data=bandit", "model=mlp"], ["model=recurrent"]),
        (["algo=rl2", "data=bandit", "data.arms=1"], ["data.arms", "at least 2"]),
        (["algo=rl2", "data=bandit", "algo.gamma=1.5"], ["algo.gamma", "[0, 1]"]),
        (["algo=rl2", "data=bandit", "algo.optimizer=trpo"], ["algo.optimizer", "ppo"]),
        (["algo=rl2", "data=bandit", "trainer.clip_grad_norm=0"], ["trainer.clip_grad_norm"]),
    ],
)
def test_meta_rl_misconfigurations_fail_early_with_the_fix(overrides, words, tmp_path):
    with pytest.raises(ConfigError) as error:
        build_run(compose_config([*overrides, *SMOKE, f"data.root={tmp_path}"]))
    for word in words:
        assert word in str(error.value)


def test_eval_retests_a_meta_rl_checkpoint_beside_the_baselines(tmp_path, monkeypatch):
    """The checkpoint alone, moved out of its run and with no data root, is enough."""
    from metalearn.reevaluate import evaluate_checkpoint

    common = ["algo=rl2", "data=bandit", "model.hidden=8", *SMOKE]
    train(build_run(compose_config(common)), tmp_path / "run")
    checkpoint = (tmp_path / "run" / "checkpoints" / "best.pt").rename(tmp_path / "agent.pt")
    shutil.rmtree(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("METALEARN_DATA", str(tmp_path / "empty"))
    overrides = [f"checkpoint={checkpoint}", "eval.episodes=30", "logger=none"]
    results = evaluate_checkpoint(
        compose_config(overrides, config_name="eval"), overrides, tmp_path / "eval"
    )
    assert results["test"]["episodes"] == 30 and results["checkpoint"] == str(checkpoint)
    assert set(results["baselines"]) == set(bandit_baselines(10))
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["metric"] == "reward"
