"""kvshrink's cache layers, one module per family; `cache.CompressedCache` holds one per decoder layer.

- `base`: what they share (byte reporting, batch operations, the layer API, the exact sinks and window)
- `full`: transformers' own dynamic layers with byte accounting (the `full` reference)
- `windowed`: quantized stores behind an exact window (`WindowedLayer`), rotation codecs (`RotatedLayer`)
- `evicting`: kept tokens chosen by an eviction policy, evicted ones optionally at low bits (`EvictingLayer`)
- `latent`: low-rank coefficients at per-token levels, attended in the latent space (`LatentLayer`)
- `residual`: KV-Direct's residual checkpoints (`ResidualLayer`, `TokenLayer` with its `PrefixRunner`)
"""
from .base import PARTS, CompressedLayer, ExactWindow
from .evicting import EvictingLayer
from .full import FullLayer, FullSlidingLayer
from .latent import LatentLayer
from .residual import PrefixRunner, ResidualLayer, TokenLayer
from .windowed import RotatedLayer, WindowedLayer

__all__ = ["PARTS", "CompressedLayer", "ExactWindow", "FullLayer", "FullSlidingLayer", "WindowedLayer",
           "RotatedLayer", "EvictingLayer", "LatentLayer", "ResidualLayer", "TokenLayer", "PrefixRunner"]
