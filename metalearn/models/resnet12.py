"""ResNet-12 as used by MetaOptNet (Lee et al. 2019) and RFS (Tian et al. 2020), DropBlock optional.

Four residual blocks of widths (64, 160, 320, 640); each block is three 3x3 conv, BatchNorm,
LeakyReLU(0.1) layers with a 1x1 conv + BatchNorm shortcut, then 2x2 max-pooling. The last map
is averaged over space (RFS) into a 640-d embedding. DropBlock (Ghiasi et al. 2018) regularises
the last two blocks when `drop_rate > 0`, in training only.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.errors import ConfigError
from metalearn.models.layers import TaskBatchNorm2d, check_image_input


@dataclass
class ResNet12Config:
    """Widths, DropBlock and the slope of the activations."""

    name: str = "resnet12"
    widths: list[int] = field(default_factory=lambda: [64, 160, 320, 640])  # the four blocks
    drop_rate: float = 0.0  # DropBlock rate in blocks 3 and 4 (MetaOptNet, RFS: 0.1); 0 = off
    drop_block_size: int = 5  # DropBlock's square size (MetaOptNet, RFS: 5)
    leaky_slope: float = 0.1  # LeakyReLU negative slope

    def __post_init__(self) -> None:
        if len(self.widths) != 4 or any(w < 1 for w in self.widths):
            raise ConfigError(f"model.widths must be four positive widths, got {self.widths}")
        if not 0 <= self.drop_rate < 1:
            raise ConfigError(f"model.drop_rate must be in [0, 1), got {self.drop_rate}")
        if self.drop_block_size < 1:
            raise ConfigError(f"model.drop_block_size must be positive, got {self.drop_block_size}")


def drop_block(x: Tensor, rate: float, size: int) -> Tensor:
    """Zero random size x size squares of each feature map, rescaling to keep the mean.

    gamma is chosen so that about `rate` of the units are dropped (Ghiasi et al. 2018, eq. 1).
    """
    _, _, height, width = x.shape
    size = min(size, height, width)
    valid = (height - size + 1) * (width - size + 1)
    gamma = rate * height * width / (size * size * valid)
    seeds = (torch.rand_like(x[:, :, : height - size + 1, : width - size + 1]) < gamma).to(x.dtype)
    pad = size // 2, size - 1 - size // 2  # the seeds are block centres; pad to the full map
    seeds = F.pad(seeds, (pad[0], pad[1], pad[0], pad[1]))
    keep = 1 - F.max_pool2d(seeds, size, stride=1, padding=size // 2)[..., :height, :width]
    return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: ResNet12Config, drop: bool, **norm) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False) for i in range(3)
        )
        self.norms = nn.ModuleList(TaskBatchNorm2d(cout, **norm) for _ in range(3))
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False)
        self.shortcut_norm = TaskBatchNorm2d(cout, **norm)
        self.slope = cfg.leaky_slope
        self.drop_rate = cfg.drop_rate if drop else 0.0
        self.drop_block_size = cfg.drop_block_size

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            h = norm(conv(h))
            if i < 2:
                h = F.leaky_relu(h, self.slope)
        h = F.leaky_relu(h + self.shortcut_norm(self.shortcut(x)), self.slope)
        h = F.max_pool2d(h, 2)
        if self.training and self.drop_rate > 0:
            h = drop_block(h, self.drop_rate, self.drop_block_size)
        return h


class ResNet12(nn.Module):
    """Embedding network; with `out_features > 0` a linear head maps the embedding to logits."""

    convolutional = True
    recurrent = False
    learned_optimizer = False

    def __init__(
        self,
        cfg: ResNet12Config,
        in_shape: tuple[int, ...],
        out_features: int,
        *,
        fused_batchnorm: bool = False,
        channels_last: bool = False,
        running_stats: bool = False,
    ) -> None:
        super().__init__()
        check_image_input("resnet12", in_shape)
        self.in_shape = tuple(in_shape)
        self.channels_last = channels_last
        norm = {"fused": fused_batchnorm, "running": running_stats}
        widths = [in_shape[0], *cfg.widths]
        self.blocks = nn.Sequential(
            *(ResidualBlock(widths[i], widths[i + 1], cfg, drop=i >= 2, **norm) for i in range(4))
        )
        self.embedding_dim = cfg.widths[-1]
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features > 0 else None
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def feature_maps(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 640, H/16, W/16)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.blocks(x)

    def embed(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 640)
        return self.feature_maps(x).mean(dim=(2, 3))

    def forward(self, x: Tensor, embed_only: bool = False) -> Tensor:
        z = self.embed(x)
        return z if self.head is None or embed_only else self.head(z)
