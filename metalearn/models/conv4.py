"""The four-block convolutional network of Vinyals et al. (2016), as used by MAML and ProtoNets."""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metalearn.errors import ConfigError
from metalearn.models.layers import TaskBatchNorm2d, check_image_input, max_pool_2x2


@dataclass
class Conv4Config:
    """Four blocks of 3x3 conv, BatchNorm, ReLU and downsampling; then an optional linear head."""

    name: str = "conv4"
    hidden: int = 64  # filters per block (64 for Omniglot and ProtoNets, 32 for MAML miniImageNet)
    downsample: str = "maxpool"  # 'maxpool' (ProtoNets) or 'stride' (MAML's Omniglot network)
    pooled_blocks: int = 4  # how many blocks, from the first, downsample (Relation Networks: 2)
    bn_eps: float = 1e-5  # BatchNorm's epsilon (torch's default; Ravi & Larochelle's learner: 1e-3)

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise ConfigError(f"model.hidden must be positive, got {self.hidden}")
        if not 0 <= self.pooled_blocks <= 4:
            raise ConfigError(f"model.pooled_blocks must be in 0..4, got {self.pooled_blocks}")
        if not self.bn_eps > 0:
            raise ConfigError(f"model.bn_eps must be positive, got {self.bn_eps}")
        if self.downsample not in ("maxpool", "stride"):
            raise ConfigError(
                f"model.downsample must be 'maxpool' or 'stride', got {self.downsample!r}"
            )


class Conv4(nn.Module):
    """Embedding network; with `out_features > 0` a linear head maps the embedding to logits.

    'maxpool' halves the resolution with 2x2 max-pooling and flattens the last map (Snell et al.
    2017); 'stride' uses stride-2 convolutions and averages the last map over space, as Finn et al.
    (2017) did for Omniglot: the same depth at a quarter of the arithmetic.
    """

    convolutional = True  # hardware.task_batching=auto picks the per-task loop on CPU
    recurrent = False  # build.py: a meta-RL agent's memory
    learned_optimizer = False  # build.py: what algo=l2o meta-trains

    def __init__(
        self,
        cfg: Conv4Config,
        in_shape: tuple[int, ...],
        out_features: int,
        *,
        fused_batchnorm: bool = False,
        channels_last: bool = False,
        running_stats: bool = False,
    ) -> None:
        super().__init__()
        check_image_input("conv4", in_shape)
        self.channels_last = channels_last  # NHWC activations: faster convolutions on CPU
        self.in_shape = tuple(in_shape)
        channels, height, width = in_shape
        blocks: list[nn.Module] = []
        for i in range(4):
            pooled = i < cfg.pooled_blocks
            stride = 2 if cfg.downsample == "stride" and pooled else 1
            blocks += [
                nn.Conv2d(channels if i == 0 else cfg.hidden, cfg.hidden, 3, stride, padding=1),
                TaskBatchNorm2d(
                    cfg.hidden, cfg.bn_eps, fused=fused_batchnorm, running=running_stats
                ),
                nn.ReLU(),
            ]
            if cfg.downsample == "maxpool" and pooled:
                blocks.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*blocks)
        self.pool_space = cfg.downsample == "stride"
        with torch.no_grad():
            self.embedding_dim = self.embed(torch.zeros(2, channels, height, width)).shape[-1]
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features > 0 else None
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def feature_maps(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, hidden, H', W')
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if torch.is_grad_enabled():
            return self.features(x)
        return self._maps_without_grad(x)

    def _maps_without_grad(self, x: Tensor) -> Tensor:
        """The same maps, bit for bit, faster where no gradient will be taken (validation and
        test): a 2x2 max-pool commutes with the ReLU before it (both are monotone), so the ReLU
        runs on a quarter of the values, and the pool is elementwise maxima of strided views,
        with no argmax indices kept for a backward pass (3-8x faster than nn.MaxPool2d on CPU)."""
        layers = list(self.features)
        i = 0
        while i < len(layers):
            pooled_next = i + 1 < len(layers) and isinstance(layers[i + 1], nn.MaxPool2d)
            if isinstance(layers[i], nn.ReLU) and pooled_next:
                x, i = torch.relu(max_pool_2x2(x)), i + 2
            else:
                x, i = layers[i](x), i + 1
        return x

    def embed(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, D)
        h = self.feature_maps(x)
        return h.mean(dim=(2, 3)) if self.pool_space else h.flatten(1)

    def forward(self, x: Tensor, embed_only: bool = False) -> Tensor:
        """Logits, or the embedding when there is no head or `embed_only` (ANIL's body)."""
        z = self.embed(x)
        return z if self.head is None or embed_only else self.head(z)
