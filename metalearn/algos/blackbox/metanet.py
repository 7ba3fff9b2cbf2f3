"""Meta Networks (Munkhdalai & Yu, ICML 2017): fast weights generated from the support set's
loss gradients, for a base learner and a representation learner (their Algorithm 1).

Per task, with the support set read in label order (see below):
1. Representation level (Algorithm 1, lines 2-6): the meta learner u (slow weights Q) takes
   the gradient of an embedding loss for each of T items of the support set, grad_i =
   d loss_emb / dQ; the LSTM d reads them in turn and gives the task's fast weights Q*
   (`task_fast_weights`).
   `embedding_loss=cross_entropy` (Algorithm 1 and the authors' Omniglot code: u's classifier
   on each support example, T = N*K) or `contrastive` (the paper's pairwise alternative: every pair
   of support examples, auxiliary label 1 for the same class, Hadsell et al.'s loss on u's
   representations with margin 1; T = S(S-1)/2).
2. Example level (Algorithm 1, lines 7-14): the base learner b (slow weights W) takes
   each support example's cross-entropy gradient grad_i = dL_i/dW; m maps it to W*_i, stored
   in memory M at the key r'_i = u(Q, Q*, x'_i) (`example_fast_weights`).
3. A query x reads W* = softmax(cos(R, r))^T M with its key r = u(Q, Q*, x) (Algorithm 1's
   loop over the training examples) and is classified by b(W, W*, x), layer-augmented
   (fastnets.py).
The outer loss is the queries' cross-entropy; it trains W, Q and the meta-networks m and d
(Z and G). As in the authors' code the support gradients are inputs, not differentiated
through (first order): all per-item gradients come from one `torch.func.jacrev` per network,
with no loop over examples.

The support set is read in label order (labels are random per task, so the order carries no
information): with one example per class a task's predictions then do not depend on the order
its support set arrives in; only d, an LSTM, reads an order, and within a class (K > 1) that is
the order given.

What differs from the authors' code: the networks are model=conv4 (4 blocks of conv,
BatchNorm with per-call batch statistics, ReLU and max-pooling; theirs: 5 conv-ReLU-pool
blocks without BatchNorm), with fc1 (`hidden`) and fc2 on top as theirs. With BatchNorm, an
example's gradient is that of its loss in one forward pass over the whole support set (theirs:
each example alone), and the queries are normalised together (transductive, as ProtoNet here),
each path of a layer with its own statistics. d reads T = N*K single examples where theirs
reads 5 mini-batches of the support set (the same for 5-way 1-shot). The loss is the mean, not
the sum, of the queries' losses (Adam makes the two alike).
Shape letters: T tasks, S = N*K support examples, M queries, H = `hidden`.
"""

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from metalearn.algos.blackbox.fastnets import (
    GROUPS,
    Fast,
    FastNet,
    GradientNets,
    conv_blocks,
    flatten_group,
    group_of,
    log_and_sign,
    split_group,
)
from metalearn.algos.learner import AlgoConfig
from metalearn.algos.metric.episodic import EpisodicLearner, check_outer_lr
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError

EMBEDDING_LOSSES = ("cross_entropy", "contrastive")
MARGIN = 1.0  # the contrastive loss's margin (Hadsell et al. 2006)
COSINE_EPS = 1e-6  # the authors' cosine_similarity2d: x.y / sqrt(|x|^2 |y|^2 + eps)


@dataclass
class MetaNetConfig(AlgoConfig):
    """The widths of the fc layers and of the meta-networks, and the embedding loss."""

    name: str = "metanet"
    outer_lr: float = 1e-3  # Adam step size (the authors': 1e-3, gradients clipped at norm 10)
    train_ways: int | None = None  # ways in meta-training (None: data.ways)
    train_query: int | None = None  # query examples per class in meta-training (None: data.query)
    hidden: int = 64  # fc1's width: b's hidden layer and u's representation (the key)
    meta_hidden: int = 20  # units of m's two hidden layers and of d's LSTM (the authors': 20)
    gradient_scale: float = 7.0  # k of the log/sign gradient preprocessing (the authors': 7)
    embedding_loss: str = "cross_entropy"  # u's loss_emb: 'cross_entropy' or 'contrastive'
    # conv blocks, from the last, whose weights get fast weights (None: all, the authors'
    # Omniglot MetaNetFull; their miniImageNet MetaNetPartial augments the last 2)
    fast_blocks: int | None = None

    REFERENCE: ClassVar[dict[str, Any]] = {
        "source": "tsendeemts/meta-networks (MetaNetFull.py, train_omniglot.py)",
        "hidden": 64,
        "meta_hidden": 20,
        "gradient_scale": 7.0,
        "embedding_loss": "cross_entropy",
        "fast_blocks": None,
    }

    def train_shape(self) -> tuple[int | None, int | None, int | None]:
        return self.train_ways, None, self.train_query

    def __post_init__(self) -> None:
        check_outer_lr(self)
        for key in ("hidden", "meta_hidden"):
            if getattr(self, key) < 1:
                raise ConfigError(f"algo.{key} must be positive, got {getattr(self, key)}")
        if not self.gradient_scale > 0:
            raise ConfigError(f"algo.gradient_scale must be positive, got {self.gradient_scale}")
        if self.fast_blocks is not None and self.fast_blocks < 0:
            raise ConfigError(f"algo.fast_blocks must be >= 0 (null: all), got {self.fast_blocks}")
        if self.embedding_loss not in EMBEDDING_LOSSES:
            raise ConfigError(
                f"algo.embedding_loss must be one of {', '.join(EMBEDDING_LOSSES)}, got "
                f"{self.embedding_loss!r}"
            )


def contrastive_losses(r: Tensor, y: Tensor) -> Tensor:
    """Hadsell et al.'s loss on every pair i < j of representations r (S, H) with labels y
    (S,): d^2 / 2 for the same class, max(0, margin - d)^2 / 2 otherwise -> (S(S-1)/2,)."""
    i, j = torch.triu_indices(len(y), len(y), 1, device=y.device)
    squared = (r[i] - r[j]).square().sum(-1)
    distance = (squared + torch.finfo(r.dtype).tiny).sqrt()  # finite gradient at d = 0
    apart = (MARGIN - distance).clamp(min=0).square()
    return torch.where(y[i] == y[j], squared, apart) / 2


def cosine(queries: Tensor, keys: Tensor) -> Tensor:
    """(M, H) against (S, H) -> (M, S) cosine similarities, as the authors compute them."""
    norms = queries.square().sum(-1, keepdim=True) * keys.square().sum(-1)
    return queries @ keys.T / (norms + COSINE_EPS).sqrt()


class MetaNet(EpisodicLearner):
    """Base learner b, representation learner u and their meta-networks (see the docstring)."""

    family = "blackbox"
    needs_ways = True  # build.py passes the training ways: b's and u's output width

    def __init__(
        self, cfg: MetaNetConfig, model: nn.Module, kind: str, task_batching: str, *, ways: int
    ) -> None:
        super().__init__(cfg, model, kind, task_batching)
        self.ways = ways
        parameter = next(model.parameters())
        self.base = FastNet(model, cfg.hidden, ways, fast_blocks=cfg.fast_blocks)  # b: slow W
        trunk = copy.deepcopy(model)  # u's own trunk, started afresh: slow weights Q
        for block in conv_blocks(trunk):
            block.conv.reset_parameters()
        self.representation = FastNet(
            trunk, cfg.hidden, ways, readout=False, fast_blocks=cfg.fast_blocks
        )
        self.meta = nn.ModuleDict({group: GradientNets(cfg.meta_hidden) for group in GROUPS})
        for net in (self.base, self.representation, self.meta):
            net.to(parameter.device, parameter.dtype)

    def networks(self) -> dict[str, nn.Module]:
        return {"base": self.base, "representation": self.representation, "meta": self.meta}

    def parameters(self) -> list[nn.Parameter]:
        return [p for net in self.networks().values() for p in net.parameters()]

    def state_dict(self) -> dict:
        return {name: net.state_dict() for name, net in self.networks().items()}

    def load_state_dict(self, state: dict) -> None:
        for name, net in self.networks().items():
            net.load_state_dict(state[name])

    def memory_advice(self) -> tuple[str, list[str], list[str]]:
        what = "metanet (every query carries its own fast weights for every layer of b)"
        return what, ["fewer queries (data.query or algo.train_query)", "model.hidden"], []

    # -- meta information: per-item gradients -------------------------------------------------
    def item_gradients(self, net: FastNet, losses: Any, x: Tensor, key: bool = False) -> Fast:
        """The gradient of each item's loss, `losses(net(x, key=key)) -> (T,)`, with respect to
        each of the net's fast-weighted slow weights: {name: (T, *shape)}, from one reverse-mode
        Jacobian (vmap over the items). Constants for the outer loss, as in the authors' code,
        where they enter m and d as data; all of the net's weights are detached for it."""
        frozen = {name: p.detach() for name, p in net.named_parameters()}

        def item_losses(weights: Fast) -> Tensor:
            return losses(functional_call(net, frozen | weights, (x,), {"key": key}))

        weights = {name: frozen[name] for name in net.fast_names}
        with torch.enable_grad():  # also under evaluation's no_grad
            return jacrev(item_losses)(weights)

    def _generate(self, net: FastNet, grads: Fast, level: str) -> Fast:
        """Preprocessed gradients through m ('example': {name: (S, *shape)}) or d ('task':
        {name: shape}), per group of weights."""
        shapes = {name: net.get_parameter(name).shape for name in net.fast_names}
        fast: Fast = {}
        for group in GROUPS:
            names = [name for name in net.fast_names if group_of(grads[name]) == group]
            if not names:  # algo.fast_blocks=0: no conv weight is fast
                continue
            features = log_and_sign(flatten_group(grads, names), self.cfg.gradient_scale)
            nets: GradientNets = self.meta[group]
            if level == "example":
                flat = nets.example_weights(features)  # (S, P)
            else:
                flat = nets.task_weights(features)  # (P,)
            fast |= split_group(flat, names, shapes)
        return fast

    def task_fast_weights(self, support_x: Tensor, support_y: Tensor) -> Fast:
        """Q* = d(G, {grad_Q loss_emb}) (Algorithm 1, lines 2-6), the support set in label order."""
        contrastive = self.cfg.embedding_loss == "contrastive"
        if contrastive and len(support_y) < 2:
            raise ConfigError(
                "algo.embedding_loss=contrastive needs at least two support examples per task "
                "(it compares pairs); use algo.embedding_loss=cross_entropy"
            )

        def losses(outputs: Tensor) -> Tensor:  # u's representations, or its logits
            if contrastive:
                return contrastive_losses(outputs, support_y)
            return F.cross_entropy(outputs, support_y, reduction="none")

        grads = self.item_gradients(self.representation, losses, support_x, key=contrastive)
        return self._generate(self.representation, grads, "task")

    def example_fast_weights(self, support_x: Tensor, support_y: Tensor) -> Fast:
        """The memory M: W*_i = m(Z, grad_W L_i) per support example (Algorithm 1, lines 7-11),
        {name: (S, *shape)}."""

        def losses(logits: Tensor) -> Tensor:
            return F.cross_entropy(logits, support_y, reduction="none")

        grads = self.item_gradients(self.base, losses, support_x)
        return self._generate(self.base, grads, "example")

    # -- one task -----------------------------------------------------------------------------
    def task_logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """One task: support (S, ...) with labels (S,) and queries (M, ...) -> logits (M, ways)."""
        order = support_y.argsort(stable=True)  # label order (see the module docstring)
        support_x, support_y = support_x[order], support_y[order]
        task_fast = self.task_fast_weights(support_x, support_y)  # Q*
        memory = self.example_fast_weights(support_x, support_y)  # M: {name: (S, *shape)}
        keys = self.representation(support_x, task_fast, key=True)  # R: (S, H)
        query_keys = self.representation(query_x, task_fast, key=True)  # (M, H)
        attention = torch.softmax(cosine(query_keys, keys), -1)  # (M, S): attention over the keys R
        read = {  # W* = softmax(a)^T M per query, (M, *shape)
            name: (attention @ w.flatten(1)).view(len(query_x), *w.shape[1:])
            for name, w in memory.items()
        }
        return self.base(query_x, read)

    def _check_ways(self, ways: int) -> None:
        if ways > self.ways:
            raise ConfigError(
                f"algo=metanet was built for {self.ways}-way tasks and got {ways}-way ones; "
                f"its base learner's output layer has one unit per training way (raise "
                f"algo.train_ways or data.ways)"
            )

    def logits(self, batch: TaskBatch) -> Tensor:
        self._check_ways(batch.ways)
        # A loop over tasks (the authors' meta-batch is one task); none over examples.
        logits = torch.stack(
            [
                self.task_logits(sx, sy, qx)
                for sx, sy, qx in zip(batch.support.x, batch.support.y, batch.query.x, strict=True)
            ]
        )
        return logits[..., : batch.ways]  # (T, M, N)

    def predict(self, support: Split, query_x: Tensor, steps: int | None = None) -> Tensor:
        """Logits (M, N) for one task's queries; `steps` does not apply (no inner loop)."""
        ways = int(support.y.max()) + 1
        self._check_ways(ways)
        with torch.no_grad():
            return self.task_logits(support.x, support.y, query_x)[:, :ways]
