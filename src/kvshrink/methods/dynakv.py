"""`dynakv`: DynaKV-style (arXiv 2603.04411) token-wise adaptive rank over a joint basis of all KV heads of a layer.

Our training-free proxy, since the paper's rate selection is not public: one latent per token shared by the heads
(Palu-style joint decomposition fitted on calibration activations), and one level per token chosen from the
attention it received, averaged over every head of the layer. Everything else is `tale`'s.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .tale import Tale


@register
@dataclass
class DynaKV(Tale):
    name = "dynakv"
    summary = "token-adaptive rank over a joint basis of all KV heads (DynaKV, training-free proxy)"
    joint = True
