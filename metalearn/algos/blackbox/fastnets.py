"""Meta Networks' parts (Munkhdalai & Yu 2017): networks with slow and fast weights combined
by their "layer augmentation", and the meta-networks m and d (their meta learner) that turn
loss gradients into fast weights, following the authors' Chainer code (tsendeemts/
meta-networks: MetaNetFull.py and utilsf.py).

- `FastNet`: a convolutional trunk (the layers of model=conv4), then fc1 and fc2. Layer
  augmentation: every conv and linear layer with fast weights computes its slow output and its
  fast output separately, each through its own BatchNorm statistics and its own ReLU, and sums
  them (the authors' Block(x) + Block.call_on_W(x, W*)); the last layer (fc2) sums them without
  a ReLU. Fast weights are either one set shared by a batch (the task-level Q*) or one set per
  example (a query's W* read from memory), the latter as a grouped convolution.
- `GradientNets`: per group of layers (conv weights, fc weights, as in the authors' code) the
  example-level m, a coordinatewise MLP 2 -> H -> H -> 1, and the task-level d, a
  coordinatewise LSTM(2, H) over the T gradients read in turn, then Linear(H, 1) on its last
  output. Both read gradients through Andrychowicz et al. (2016)'s log/sign preprocessing.

Shape letters: S support examples, M queries, T gradients read by d, P weights of a group.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.errors import ConfigError
from metalearn.models.conv4 import Conv4
from metalearn.models.layers import TaskBatchNorm2d

GROUPS = ("conv", "fc")  # m and d come in one copy per group (the authors' m_*/mc_*, meta_*_l1)
Fast = dict[str, Tensor]  # weight name -> fast weight: shared (*shape) or per example (B, *shape)


def log_and_sign(grad: Tensor, k: float) -> Tensor:
    """The authors' gradient preprocessing (utilsf.logAndSign, k = 7 in their Omniglot code):
    each coordinate g -> (max(log(|g| + eps) / k, -1), clamp(e^k g, -1, 1)); (...) -> (..., 2)."""
    eps = torch.finfo(grad.dtype).eps
    magnitude = ((grad.abs() + eps).log() / k).clamp(min=-1.0)
    sign = (grad * math.exp(k)).clamp(-1.0, 1.0)
    return torch.stack([magnitude, sign], -1)


@dataclass(frozen=True)
class Block:
    """One conv layer of the trunk with what follows it up to the next conv: its BatchNorm and
    ReLU (applied to the slow and the fast path separately) and its pooling (after the sum)."""

    conv: nn.Conv2d
    norm: nn.Module | None
    relu: bool
    pool: nn.Module | None


def conv_blocks(trunk: nn.Module) -> list[Block]:
    """Conv4's layers as augmentable blocks; any other network is refused, naming the layer."""
    if not isinstance(trunk, Conv4):
        raise ConfigError(
            f"algo=metanet augments each layer of model=conv4 with fast weights; it cannot "
            f"take {type(trunk).__name__} (use model=conv4)"
        )
    blocks: list[dict] = []
    for layer in trunk.features:
        if isinstance(layer, nn.Conv2d):
            blocks.append({"conv": layer, "norm": None, "relu": False, "pool": None})
        elif isinstance(layer, TaskBatchNorm2d | nn.BatchNorm2d) and blocks:
            blocks[-1]["norm"] = layer
        elif isinstance(layer, nn.ReLU) and blocks:
            blocks[-1]["relu"] = True
        elif isinstance(layer, nn.MaxPool2d) and blocks:
            blocks[-1]["pool"] = layer
        else:
            raise ConfigError(
                f"algo=metanet cannot augment the layer {layer} of model=conv4: it takes "
                f"Conv2d blocks with BatchNorm, ReLU and MaxPool2d only"
            )
    return [Block(**block) for block in blocks]


def conv_fast(x: Tensor, weight: Tensor, conv: nn.Conv2d) -> Tensor:
    """The fast path of a conv layer, without bias: x (B, C, H, W) and a weight shared by the
    batch (O, C, k, k), or one per example (B, O, C, k, k) as one grouped convolution."""
    if weight.dim() == 4:
        return F.conv2d(x, weight, None, conv.stride, conv.padding)
    batch = x.shape[0]
    out = F.conv2d(
        x.reshape(1, -1, *x.shape[2:]),
        weight.flatten(0, 1),
        None,
        conv.stride,
        conv.padding,
        groups=batch,
    )  # (1, B*O, H', W')
    return out.view(batch, -1, *out.shape[2:])


def linear_fast(h: Tensor, weight: Tensor) -> Tensor:
    """h (B, I) times a weight (O, I) shared by the batch, or one per example (B, O, I)."""
    if weight.dim() == 2:
        return h @ weight.T
    return torch.einsum("bi,boi->bo", h, weight)


class FastNet(nn.Module):
    """A MetaNet network: the trunk, fc1 (to `hidden`) and fc2 (to `ways`), all without biases
    in the fc layers (as the authors' L.Linear(nobias=True)). `readout=False` keeps fc2 as a
    fixed buffer: the representation learner u's classifier only ever feeds the embedding
    loss's gradients, which reach no slow weight (the authors' key_fc2 never gets a gradient)."""

    def __init__(
        self,
        trunk: nn.Module,
        hidden: int,
        ways: int,
        readout: bool = True,
        fast_blocks: int | None = None,
    ) -> None:
        super().__init__()
        self.blocks = conv_blocks(trunk)
        fast_blocks = len(self.blocks) if fast_blocks is None else fast_blocks
        if fast_blocks > len(self.blocks):
            raise ConfigError(
                f"algo.fast_blocks={fast_blocks}, but the model has {len(self.blocks)} conv "
                f"blocks; give at most {len(self.blocks)} (null: all)"
            )
        self.trunk = trunk
        self.fc1 = nn.Linear(trunk.embedding_dim, hidden, bias=False)
        fc2 = nn.Linear(hidden, ways, bias=False)
        self.trained_readout = readout
        if readout:
            self.fc2 = fc2
        else:
            self.register_buffer("readout", fc2.weight.detach().clone())
        names = {id(p): name for name, p in self.named_parameters()}
        self.conv_names = [names[id(block.conv.weight)] for block in self.blocks]
        # the weights that get fast weights: the last `fast_blocks` conv weights (all: the
        # authors' MetaNetFull; the last two: their MetaNetPartial), fc1, and fc2 when trained
        fast_convs = self.conv_names[len(self.blocks) - fast_blocks :]
        self.fast_names = [*fast_convs, "fc1.weight", *(["fc2.weight"] if readout else [])]

    def features(self, x: Tensor, fast: Fast) -> Tensor:
        """The trunk, layer-augmented where `fast` has a weight: (B, C, H, W) -> (B, D)."""
        h = x
        for block, name in zip(self.blocks, self.conv_names, strict=True):
            paths = [block.conv(h)]
            if name in fast:
                paths.append(conv_fast(h, fast[name], block.conv))
            if block.norm is not None:  # each path normalised by its own batch statistics
                paths = [block.norm(p) for p in paths]
            if block.relu:
                paths = [p.relu() for p in paths]
            h = paths[0] if len(paths) == 1 else paths[0] + paths[1]
            h = block.pool(h) if block.pool is not None else h
        return h.mean(dim=(2, 3)) if self.trunk.pool_space else h.flatten(1)

    def forward(self, x: Tensor, fast: Fast | None = None, key: bool = False) -> Tensor:
        """Logits (B, ways), fc1 augmented after a ReLU each and fc2 summed without one; or, with
        `key`, the representation r = fc1's slow plus fast output, no ReLU (the authors' keys)."""
        fast = fast or {}
        h = self.features(x, fast)
        slow = h @ self.fc1.weight.T
        if key:
            return slow + linear_fast(h, fast["fc1.weight"]) if "fc1.weight" in fast else slow
        hidden = slow.relu()
        if "fc1.weight" in fast:
            hidden = hidden + linear_fast(h, fast["fc1.weight"]).relu()
        logits = hidden @ (self.fc2.weight if self.trained_readout else self.readout).T
        return logits + linear_fast(hidden, fast["fc2.weight"]) if "fc2.weight" in fast else logits


class GradientNets(nn.Module):
    """m and d for one group of weights (see the module docstring)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        # m (example level: W*_i = m(Z, grad_i)); the authors' m_l1, m_ll1, meta_lstm_l2
        self.m = nn.Sequential(
            nn.Linear(2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        # d (task level: Q* = d(G, {grad_i})); the authors' meta_lstm_l1, meta_lstm_ll1
        self.d_lstm = nn.LSTM(2, hidden, batch_first=True)
        self.d_out = nn.Linear(hidden, 1)

    def example_weights(self, features: Tensor) -> Tensor:
        """(S, P, 2) preprocessed gradients -> (S, P) fast weights, one set per example."""
        return self.m(features)[..., 0]

    def task_weights(self, features: Tensor) -> Tensor:
        """(T, P, 2) preprocessed gradients, read in order -> (P,) fast weights for the task."""
        out, _ = self.d_lstm(features.transpose(0, 1))  # each coordinate a sequence: (P, T, H)
        return self.d_out(out[:, -1])[:, 0]


def group_of(grad: Tensor) -> str:
    """Per-item gradients of conv weights (T, O, C, k, k) and of fc weights (T, O, I) go to
    their own m and d."""
    return "conv" if grad.dim() == 5 else "fc"


def flatten_group(grads: Fast, names: list[str]) -> Tensor:
    """Per-item gradients {name: (T, *shape)} of the named weights -> (T, P)."""
    return torch.cat([grads[name].flatten(1) for name in names], 1)


def split_group(flat: Tensor, names: list[str], shapes: dict[str, torch.Size]) -> Fast:
    """(..., P) -> {name: (..., *shape)}, the inverse of flatten_group."""
    sizes = [math.prod(shapes[name]) for name in names]
    parts = flat.split(sizes, -1)
    return {
        name: part.reshape(*flat.shape[:-1], *shapes[name])
        for name, part in zip(names, parts, strict=True)
    }
