"""Meta-learning algorithms, each one file with the same small protocol.

An algorithm has `parameters()`, `meta_loss(batch) -> (loss, metrics)` for training,
`evaluate(batch, steps) -> {"loss", "score"}` per task for validation and test,
`predict(support, query_x)` for one user episode, and `state_dict()/load_state_dict()`.
"""

from metalearn.algos.bilevel.maml import MAML, MAMLConfig
from metalearn.algos.metric.protonet import ProtoNet, ProtoNetConfig

# name -> (config class, algorithm class); build.py is the only reader.
ALGOS: dict[str, tuple[type, type]] = {
    "maml": (MAMLConfig, MAML),
    "fomaml": (MAMLConfig, MAML),  # configs/algo/fomaml.yaml sets first_order: true
    "protonet": (ProtoNetConfig, ProtoNet),
}
