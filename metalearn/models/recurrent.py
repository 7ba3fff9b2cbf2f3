"""A recurrent actor-critic for RL² (Duan et al. 2016): a GRU or LSTM cell, a policy and a value."""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metalearn.errors import ConfigError

State = tuple[Tensor, ...]  # (h,) for a GRU, (h, c) for an LSTM; each (T, hidden)


@dataclass
class RecurrentConfig:
    """The recurrent core whose hidden state is the agent's memory across a trial."""

    name: str = "recurrent"
    cell: str = "gru"  # 'gru' or 'lstm'
    hidden: int = 128  # units in the recurrent cell

    def __post_init__(self) -> None:
        if self.cell not in ("gru", "lstm"):
            raise ConfigError(f"model.cell must be 'gru' or 'lstm', got {self.cell!r}")
        if self.hidden < 1:
            raise ConfigError(f"model.hidden must be positive, got {self.hidden}")


class RecurrentActorCritic(nn.Module):
    """One step: (observation, one-hot previous action, previous reward, done flag) -> policy
    logits (T, A), value (T,) and the next hidden state."""

    recurrent = True  # build.py: what meta-RL algorithms need
    learned_optimizer = False
    convolutional = False

    def __init__(
        self, cfg: RecurrentConfig, in_shape: tuple[int, ...], out_features: int, **_layout: bool
    ) -> None:  # layout flags (fused_batchnorm, channels_last) do not apply here
        super().__init__()
        if out_features < 1:
            raise ConfigError("model=recurrent needs an action count (a meta-RL data set)")
        self.actions = out_features
        self.in_features = math.prod(in_shape) + out_features + 2
        cell = nn.GRUCell if cfg.cell == "gru" else nn.LSTMCell
        self.cell = cell(self.in_features, cfg.hidden)
        self.lstm = cfg.cell == "lstm"
        self.hidden = cfg.hidden
        self.policy = nn.Linear(cfg.hidden, out_features)
        self.value = nn.Linear(cfg.hidden, 1)

    def initial_state(self, tasks: int, device: torch.device) -> State:
        """The memory at the start of a trial: zeros (reset between trials, never within)."""
        h = torch.zeros(tasks, self.hidden, device=device)
        return (h, h.clone()) if self.lstm else (h,)

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        state = self.cell(x, state) if self.lstm else (self.cell(x, state[0]),)
        h = state[0]
        return self.policy(h), self.value(h).squeeze(-1), state
