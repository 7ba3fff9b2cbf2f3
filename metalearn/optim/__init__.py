"""Optimisers the trainer and the algorithms share (a leaf: it imports no other metalearn layer).

`hypergradient`: SGD-HD, SGDN-HD and Adam-HD (Baydin et al. 2018), usable as any trainer's outer
optimiser (`trainer.optimizer=adam_hd`).
"""

from metalearn.optim.hypergradient import DEFAULT_HYPERGRAD_LR, SGDHD, AdamHD

__all__ = ["DEFAULT_HYPERGRAD_LR", "AdamHD", "SGDHD"]
