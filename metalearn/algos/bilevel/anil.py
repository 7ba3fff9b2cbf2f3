"""ANIL, Almost No Inner Loop (Raghu et al. 2020): the inner loop adapts only the head.

The body is meta-learned by the outer loop alone, so each task's support features are computed
once and the inner steps run on the linear head over those features: the inner loop costs a
few small matrix products instead of full forward and backward passes through the network.
"""

from collections.abc import Iterator
from dataclasses import dataclass

from torch.func import functional_call

from metalearn.algos.bilevel.base import Bilevel, BilevelConfig
from metalearn.algos.bilevel.inner import Params, adapt_steps
from metalearn.data.tasks import Split

HEAD = "head."  # the models' output layer (conv4, mlp); everything else is the body


@dataclass
class ANILConfig(BilevelConfig):
    """The family's settings; the inner loop touches `head.*` only."""

    name: str = "anil"
    test_inner_steps: int | None = 3  # as MAML's (None: inner_steps)


class ANIL(Bilevel):
    """MAML with the inner loop restricted to the head, run on fixed support features."""

    def trajectory(
        self, params: Params, buffers: Params, support: Split, training: bool, steps=None
    ) -> Iterator[Params]:
        body = {**params, **self.stage_overrides(0, query=False)}  # running BN stats at test
        features = functional_call(self.model, (body, buffers), (support.x,), {"embed_only": True})
        head = {k.removeprefix(HEAD): v for k, v in params.items() if k.startswith(HEAD)}
        options = self.inner_options(training)
        if steps is not None:
            options["steps"] = steps
        for fast_head in adapt_steps(
            self.model.head, head, {}, Split(features, support.y), **options
        ):
            yield {**params, **{HEAD + k: v for k, v in fast_head.items()}}
