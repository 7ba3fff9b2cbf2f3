"""Plain nn.Modules, vmap-safe: no running statistics, no in-place state."""

from torch import nn

from metalearn.models.conv4 import Conv4, Conv4Config
from metalearn.models.learned_optimizers import (
    LSTMOptimizer,
    LSTMOptimizerConfig,
    MLPOptimizer,
    MLPOptimizerConfig,
)
from metalearn.models.mlp import MLP, Identity, IdentityConfig, MLPConfig
from metalearn.models.policy import GaussianMLPPolicy, GaussianPolicyConfig
from metalearn.models.recurrent import RecurrentActorCritic, RecurrentConfig
from metalearn.models.resnet12 import ResNet12, ResNet12Config

# name -> (config class, module class); build.py is the only reader.
MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "conv4": (Conv4Config, Conv4),
    "mlp": (MLPConfig, MLP),
    "identity": (IdentityConfig, Identity),  # x itself: neural processes' default on data=gp
    "resnet12": (ResNet12Config, ResNet12),
    "recurrent": (RecurrentConfig, RecurrentActorCritic),
    "gaussian_mlp": (GaussianPolicyConfig, GaussianMLPPolicy),  # MAML-TRPO, E-MAML, ProMP
    "lstm_optimizer": (LSTMOptimizerConfig, LSTMOptimizer),  # learned optimisers (algo=l2o)
    "mlp_optimizer": (MLPOptimizerConfig, MLPOptimizer),
}
