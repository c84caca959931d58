"""kvshrink's cache layers; `cache.CompressedCache` holds one per decoder layer.

- `base`: what they share (byte reporting, batch operations, the layer API, the exact sinks and window)
- `full`: transformers' own dynamic layers with byte accounting (the `full` reference)
- `composed`: the generic layer: exact sinks, a codec's stored tokens (chosen by a token policy when it has one),
  an exact window (`ComposedLayer`: kivi, tada, turboquant, every eviction method and their compositions)
- `latent`: low-rank coefficients at per-token levels, attended in the latent space (`LatentLayer`)
- `residual`: KV-Direct's residual checkpoints (`ResidualLayer`, `TokenLayer` with its `PrefixRunner`)
"""
from .base import CompressedLayer, ExactWindow
from .composed import ComposedLayer
from .full import FullLayer, FullSlidingLayer
from .latent import LatentLayer
from .residual import PrefixRunner, ResidualLayer, TokenLayer

__all__ = ["CompressedLayer", "ExactWindow", "ComposedLayer", "FullLayer", "FullSlidingLayer", "LatentLayer",
           "ResidualLayer", "TokenLayer", "PrefixRunner"]
