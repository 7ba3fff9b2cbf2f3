"""PPO's advantages and loss as openai/baselines' ppo2 computes them (runner.py: the GAE loop;
model.py: the loss and Model.train), transcribed in plain PyTorch for RL²'s trials.

The runner walks the steps backwards with lastgaelam = delta + gamma * lam * nextnonterminal *
lastgaelam and returns advantages + values; here a trial's last step is terminal (the agent's
memory is reset between trials), every other one is not (RL² carries its memory across the
bandit's episodes). Model.train takes advs = returns - values, normalises them with numpy's
(population) standard deviation over the mini-batch, and the loss is the mean of
max(-adv * ratio, -adv * clip(ratio)), plus vf_coef * 0.5 * mean(max((v - R)^2, (v_clipped -
R)^2)) with v_clipped = old_v + clip(v - old_v, -eps, eps), minus ent_coef * mean entropy.
"""

import torch


def ppo2_returns(rewards, values, gamma, lam):
    """rewards, values: (T, P) for T trials of P steps; returns (T, P)."""
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        if t == steps - 1:
            nextnonterminal, nextvalues = 0.0, torch.zeros_like(values[:, 0])
        else:
            nextnonterminal, nextvalues = 1.0, values[:, t + 1]
        delta = rewards[:, t] + gamma * nextvalues * nextnonterminal - values[:, t]
        lastgaelam = delta + gamma * lam * nextnonterminal * lastgaelam
        advantages[:, t] = lastgaelam
    return advantages + values


def ppo2_loss(
    neglogpac, vpred, entropy, old_neglogpac, old_vpred, returns, *, cliprange, vf_coef, ent_coef
):
    advs = returns - old_vpred
    advs = (advs - advs.mean()) / (advs.std(unbiased=False) + 1e-8)
    vpredclipped = old_vpred + torch.clamp(vpred - old_vpred, -cliprange, cliprange)
    vf_loss = 0.5 * torch.mean(torch.maximum((vpred - returns) ** 2, (vpredclipped - returns) ** 2))
    ratio = torch.exp(old_neglogpac - neglogpac)
    pg_losses = -advs * ratio
    pg_losses2 = -advs * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = torch.mean(torch.maximum(pg_losses, pg_losses2))
    return pg_loss - torch.mean(entropy) * ent_coef + vf_loss * vf_coef
