"""Former home of `LatentLayer`, now in `kvshrink.layers.latent`; this name keeps old imports working."""
from .layers.latent import MODES, SIGNIFICANCE, LatentLayer  # noqa: F401

__all__ = ["LatentLayer", "MODES", "SIGNIFICANCE"]
