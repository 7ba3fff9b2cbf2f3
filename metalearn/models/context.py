"""A network fed a task's context vector: CAVIA's conditioning (Zintgraf et al. 2019, section 4).

The context is the buffer `context` of C values, one more entry of the parameter dict that
`functional_call` takes, so an inner loop can adapt it like any parameter, under vmap too. How it
enters the network follows the authors' code (lmzintgraf/cavia):

- MLP (regression/cavia_model.py): concatenated to the input, x (B, in) -> [x, c] (B, in + C);
  the first layer is rebuilt with in + C inputs (PyTorch's default initialisation, as theirs).
- conv4 (classification/models.py, `CondConvNet`): FiLM (Perez et al. 2018) of one block,
  [gamma; beta] = W c + b (2F,), h -> gamma * h + beta per channel after that block's BatchNorm
  and max-pooling and before its ReLU; W is Kaiming-uniform with a linear gain and b PyTorch's
  default, as their `init_params(kaiming)`; their miniImageNet network FiLMs the third block.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.errors import ConfigError
from metalearn.models.conv4 import Conv4
from metalearn.models.layers import TaskBatchNorm2d
from metalearn.models.mlp import MLP

CONTEXT = "context"  # the buffer's name: the key of the context in the parameter dict
SUPPORTED = {MLP: "mlp", Conv4: "conv4"}


class ContextNet(nn.Module):
    """`net` conditioned on the buffer `context` (C,): x -> net(x; context)."""

    def __init__(self, net: nn.Module, size: int, film_block: int = 3) -> None:
        super().__init__()
        if size < 1:
            raise ConfigError(
                f"the context must hold at least one value, got {size}: with none, CAVIA's "
                "inner loop has nothing to adapt (set algo.context_params >= 1)"
            )
        if type(net) not in SUPPORTED:
            raise ConfigError(
                f"CAVIA cannot feed a context into {type(net).__name__}: it supports "
                f"model={' and model='.join(SUPPORTED.values())}"
            )
        self.net = net
        weight = next(net.parameters())
        kind = {"device": weight.device, "dtype": weight.dtype}
        self.register_buffer(CONTEXT, torch.zeros(size, **kind), persistent=False)
        self.film: nn.Linear | None = None
        if isinstance(net, MLP):
            first = net.body[0]  # nn.Linear(in, H) -> nn.Linear(in + C, H)
            net.body[0] = nn.Linear(first.in_features + size, first.out_features, **kind)
            return
        norms = [i for i, m in enumerate(net.features) if isinstance(m, TaskBatchNorm2d)]
        if not 1 <= film_block <= len(norms):
            raise ConfigError(
                f"algo.film_block must name one of the {len(norms)} blocks (1-{len(norms)}) of "
                f"conv4, got {film_block}"
            )
        self.norm_at = norms[film_block - 1]  # index of the FiLM'd block's BatchNorm in features
        channels = net.features[self.norm_at].weight.shape[0]  # F
        self.film = nn.Linear(size, 2 * channels, **kind)
        nn.init.kaiming_uniform_(self.film.weight, nonlinearity="linear")

    def forward(self, x: Tensor, embed_only: bool = False) -> Tensor:
        if self.film is None:  # MLP: (B, in) -> (B, in + C)
            x = x.flatten(1)
            context = getattr(self, CONTEXT).expand(x.shape[0], -1)
            return self.net(torch.cat([x, context], dim=1), embed_only)
        return self._conv_forward(x, embed_only)

    def _conv_forward(self, x: Tensor, embed_only: bool) -> Tensor:
        """conv4's forward with FiLM in one block: conv, BN, [max-pool,] FiLM, ReLU."""
        net, layers, at = self.net, list(self.net.features), self.norm_at
        if net.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for layer in layers[: at + 1]:  # up to the FiLM'd block's BatchNorm: (B, F, H, W)
            x = layer(x)
        rest = at + 2  # past the block's ReLU
        if rest < len(layers) and isinstance(layers[rest], nn.MaxPool2d):
            x, rest = layers[rest](x), rest + 1  # theirs pools before FiLM
        gamma, beta = self.film(getattr(self, CONTEXT)).chunk(2)  # (F,) each
        x = F.relu(gamma.view(1, -1, 1, 1) * x + beta.view(1, -1, 1, 1))
        for layer in layers[rest:]:
            x = layer(x)
        z = x.mean(dim=(2, 3)) if net.pool_space else x.flatten(1)  # (B, D), as Conv4.embed
        return z if net.head is None or embed_only else net.head(z)
