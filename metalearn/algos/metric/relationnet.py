"""Relation Networks (Sung et al. 2018): a learned relation module scores (query, class) pairs.

Each class's support feature maps are summed (K-shot, paper section 3.3), concatenated along
channels with each query's feature map, and a relation module (two conv blocks, then two
fully connected layers ending in a sigmoid) maps the pair to a relation score in [0, 1],
trained by mean squared error against the one-hot match (paper, eq. 3).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algos.learner import AlgoConfig
from metalearn.algos.metric.episodic import EpisodicLearner, check_outer_lr
from metalearn.errors import ConfigError
from metalearn.models.layers import TaskBatchNorm2d


@dataclass
class RelationNetConfig(AlgoConfig):
    """The relation module's width; the embedding is the model (conv4 pooling in two blocks)."""

    name: str = "relationnet"
    outer_lr: float = 1e-3  # Adam step size
    relation_channels: int = 64  # filters of the relation module's two conv blocks
    relation_hidden: int = 8  # width of its hidden fully connected layer
    train_ways: int | None = None  # ways in meta-training (None: data.ways)
    train_query: int | None = None  # query examples per class in meta-training (None: data.query)

    def train_shape(self) -> tuple[int | None, int | None, int | None]:
        return self.train_ways, None, self.train_query

    def __post_init__(self) -> None:
        check_outer_lr(self)
        for key in ("relation_channels", "relation_hidden"):
            if getattr(self, key) < 1:
                raise ConfigError(f"algo.{key} must be positive, got {getattr(self, key)}")


class RelationModule(nn.Module):
    """(P, 2C, H, W) pairs of feature maps -> (P,) relation scores in [0, 1]."""

    def __init__(self, in_shape: tuple[int, int, int], channels: int, hidden: int) -> None:
        super().__init__()
        pairs_channels, height, width = in_shape
        if min(height, width) < 4:
            raise ConfigError(
                f"algo=relationnet needs feature maps of at least 4x4 for its two pooling conv "
                f"blocks, but the model gives {height}x{width}; downsample in fewer blocks "
                f"(model.pooled_blocks=2, as in the paper)"
            )
        blocks: list[nn.Module] = []
        for i in range(2):
            blocks += [
                nn.Conv2d(pairs_channels if i == 0 else channels, channels, 3, padding=1),
                TaskBatchNorm2d(channels, fused=True),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*blocks)
        flat = channels * (height // 2 // 2) * (width // 2 // 2)
        self.head = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, pairs: Tensor) -> Tensor:
        return torch.sigmoid(self.head(self.features(pairs).flatten(1))).squeeze(-1)


class RelationNet(EpisodicLearner):
    """Scores are relation scores; the loss is MSE against one-hot targets, as in the paper."""

    def __init__(self, cfg: RelationNetConfig, model: nn.Module, kind: str, task_batching: str):
        super().__init__(cfg, model, kind, task_batching)
        if not hasattr(model, "feature_maps"):
            raise ConfigError(
                f"algo=relationnet compares feature maps, which model={type(model).__name__} "
                f"does not give; use model=conv4 or model=resnet12"
            )
        parameter = next(model.parameters())
        with torch.no_grad():
            shape = model.feature_maps(torch.zeros(2, *model.in_shape, device=parameter.device))
        channels, height, width = shape.shape[1:]
        self.relation = RelationModule(
            (2 * channels, height, width), cfg.relation_channels, cfg.relation_hidden
        ).to(parameter.device)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"relation": self.relation}

    def embed(self, x: Tensor) -> Tensor:
        return self.model.feature_maps(x)  # (B, C, H, W)

    def scores(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, ways: int) -> Tensor:
        # support_z (T, N*K, C, H, W) -> per-class sums (T, N, C, H, W)
        onehot = F.one_hot(support_y, ways).to(support_z.dtype)  # (T, N*K, N)
        classes = torch.einsum("tsn,tschw->tnchw", onehot, support_z)
        out = []
        for class_maps, queries in zip(classes, query_z, strict=True):  # one task at a time:
            queries_, ways_ = queries.shape[0], class_maps.shape[0]  # BatchNorm sees one task
            pairs = torch.cat(
                [
                    class_maps[None].expand(queries_, -1, -1, -1, -1),
                    queries[:, None].expand(-1, ways_, -1, -1, -1),
                ],
                dim=2,
            )  # (M, N, 2C, H, W)
            out.append(self.relation(pairs.flatten(0, 1)).view(queries_, ways_))
        return torch.stack(out)  # (T, M, N)

    def task_loss(self, scores: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(scores.float(), F.one_hot(y, scores.shape[-1]).float())
