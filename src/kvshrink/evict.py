"""Former home of `EvictingLayer`, now in `kvshrink.layers.evicting`; this name keeps old imports working."""
from .layers.evicting import _QUERY_BLOCK, EvictingLayer  # noqa: F401

__all__ = ["EvictingLayer"]
