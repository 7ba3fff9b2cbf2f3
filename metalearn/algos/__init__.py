"""Meta-learning algorithms, each one file with the same small protocol.

An algorithm has `parameters()`, `meta_loss(batch, iteration) -> (objective, metrics)` for
training (the trainer calls backward on the objective and steps its optimiser; a learner that
`steps_itself`, MAML-TRPO, updates its weights in `outer_step(batch, iteration)` instead),
`evaluate(batch, steps) -> {"loss", "score"}` per task for validation and test,
`predict(support, query_x)` for one user episode, and `state_dict()/load_state_dict()`.
"""

from metalearn.algos.bilevel.anil import ANIL, ANILConfig
from metalearn.algos.bilevel.bmaml import BMAML
from metalearn.algos.bilevel.cavia import CAVIA, CAVIAConfig
from metalearn.algos.bilevel.imaml import IMAML, IMAMLConfig
from metalearn.algos.bilevel.maml import MAML, MAMLConfig
from metalearn.algos.bilevel.mamlpp import MAMLPlusPlus, MAMLPlusPlusConfig
from metalearn.algos.bilevel.metasgd import MetaSGD, MetaSGDConfig
from metalearn.algos.bilevel.particles import EnsembleMAML, ParticlesConfig
from metalearn.algos.bilevel.reptile import Reptile, ReptileConfig
from metalearn.algos.bilevel.transforms import GradientTransform, TransformConfig
from metalearn.algos.bilevel.vmaml import VariationalConfig, VariationalMAML
from metalearn.algos.bilevel.warpgrad import WarpGrad, WarpGradConfig
from metalearn.algos.blackbox.metanet import MetaNet, MetaNetConfig
from metalearn.algos.blackbox.rl2 import RL2, RL2Config
from metalearn.algos.blackbox.sequence import SequenceConfig, SequenceLearner
from metalearn.algos.metric.baseline import Baseline, BaselineConfig
from metalearn.algos.metric.gnn import GNN, GNNConfig
from metalearn.algos.metric.matchingnet import MatchingNet, MatchingNetConfig
from metalearn.algos.metric.metaoptnet import MetaOptNet, MetaOptNetConfig
from metalearn.algos.metric.protonet import ProtoNet, ProtoNetConfig
from metalearn.algos.metric.relationnet import RelationNet, RelationNetConfig
from metalearn.algos.metric.siamese import Siamese, SiameseConfig
from metalearn.algos.optimizers.l2o import L2O, L2OConfig
from metalearn.algos.optimizers.metalstm import MetaLSTM, MetaLSTMConfig
from metalearn.algos.processes.neural_process import NeuralProcess, NeuralProcessConfig
from metalearn.algos.rl.maml_trpo import MAMLTRPO, MAMLTRPOConfig
from metalearn.algos.rl.promp import ProMP, ProMPConfig

# name -> (config class, algorithm class); build.py is the only reader.
ALGOS: dict[str, tuple[type, type]] = {
    "maml": (MAMLConfig, MAML),
    "fomaml": (MAMLConfig, MAML),  # configs/algo/fomaml.yaml sets first_order: true
    "reptile": (ReptileConfig, Reptile),
    "anil": (ANILConfig, ANIL),
    "metasgd": (MetaSGDConfig, MetaSGD),
    "imaml": (IMAMLConfig, IMAML),
    "mamlpp": (MAMLPlusPlusConfig, MAMLPlusPlus),
    "emaml": (ParticlesConfig, EnsembleMAML),  # M particles, adapted independently
    "bmaml": (ParticlesConfig, BMAML),  # M particles moved by SVGD, the chaser loss
    "vmaml": (VariationalConfig, VariationalMAML),  # a Gaussian over weights (VAMPIRE)
    "tnet": (TransformConfig, GradientTransform),  # a learned map per layer: T-Net's T (W x + b)
    "mtnet": (TransformConfig, GradientTransform),  # T-Net and a learned mask of adapting units
    "metacurvature": (TransformConfig, GradientTransform),  # Kronecker-factored gradient transform
    "cavia": (CAVIAConfig, CAVIA),  # the inner loop adapts a context vector only
    "warpgrad": (WarpGradConfig, WarpGrad),  # warp layers meta-learned from replayed points
    "protonet": (ProtoNetConfig, ProtoNet),
    "matchingnet": (MatchingNetConfig, MatchingNet),
    "relationnet": (RelationNetConfig, RelationNet),
    "siamese": (SiameseConfig, Siamese),  # Koch et al.: pair verification, nearest support image
    "metaoptnet_ridge": (MetaOptNetConfig, MetaOptNet),  # its YAML sets head: ridge
    "metaoptnet_svm": (MetaOptNetConfig, MetaOptNet),
    "gnn": (GNNConfig, GNN),  # Garcia & Bruna: one graph per query, learned adjacency
    "baseline": (BaselineConfig, Baseline),
    "baselinepp": (BaselineConfig, Baseline),  # its YAML sets classifier: cosine
    "rfs": (BaselineConfig, Baseline),  # its YAML sets the RFS recipe (logistic test head)
    "rl2": (RL2Config, RL2),
    "maml_trpo": (MAMLTRPOConfig, MAMLTRPO),  # gradient-based meta-RL: a Gaussian policy
    "emaml_trpo": (MAMLTRPOConfig, MAMLTRPO),  # its YAML sets exploration: true (E-MAML)
    "pretrained_trpo": (MAMLTRPOConfig, MAMLTRPO),  # inner_steps: 0, MAML's pretrained baseline
    "promp": (ProMPConfig, ProMP),
    "mann": (SequenceConfig, SequenceLearner),  # each YAML names its sequence core
    "lstm": (SequenceConfig, SequenceLearner),
    "snail": (SequenceConfig, SequenceLearner),
    "icl_transformer": (SequenceConfig, SequenceLearner),
    "metanet": (MetaNetConfig, MetaNet),  # Meta Networks: fast weights from support gradients
    "l2o": (L2OConfig, L2O),  # learned optimisers: model=lstm_optimizer or mlp_optimizer
    "metalstm": (MetaLSTMConfig, MetaLSTM),  # Ravi & Larochelle's meta-learner LSTM
    "cnp": (NeuralProcessConfig, NeuralProcess),  # neural processes: each YAML names its paths
    "acnp": (NeuralProcessConfig, NeuralProcess),
    "np": (NeuralProcessConfig, NeuralProcess),
    "anp": (NeuralProcessConfig, NeuralProcess),
    "convcnp": (NeuralProcessConfig, NeuralProcess),
}
