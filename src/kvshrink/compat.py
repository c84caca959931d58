"""What differs between the transformers 5.x releases kvshrink runs on, in one place.

kvshrink is developed on the newest 5.x; peers such as NVIDIA's kvpress pin older ones (kvpress 0.5.5:
`transformers<5.3`), and kvshrink's kvpress adapter runs beside them. Each name here is transformers' own where the
installed release has it, and a stand-in computing the same thing for the releases before it otherwise.
"""
from __future__ import annotations

from typing import Any

import torch

try:  # transformers >= 5.3
    from transformers.cache_utils import get_layer_types_and_kwargs as _upstream_layer_types
except ImportError:  # 5.0 - 5.2: `DynamicCache.__init__` reads the config's layer types itself
    _upstream_layer_types = None

__all__ = ["layer_types_and_kwargs", "query_length"]

_WINDOWED = ("sliding_attention", "chunked_attention", "hybrid_sliding")


def layer_types_and_kwargs(config: Any) -> tuple[list[str], list[dict]]:
    """The attention type of each decoder layer ("full_attention", "sliding_attention", ...) and the keyword
    arguments its cache layer is built with (`sliding_window`), as transformers' `DynamicCache` derives them."""
    if _upstream_layer_types is not None:
        types, kwargs = _upstream_layer_types(config)
        if isinstance(kwargs, dict):  # 5.3 - 5.2x: one dict for the whole model, read by its windowed layers
            kwargs = [{"sliding_window": kwargs["sliding_window"]} if t in _WINDOWED and "sliding_window" in kwargs
                      else {} for t in types]
        return list(types), list(kwargs)
    # as transformers 5.2's DynamicCache: the config's `layer_types`, else every layer sliding when the config has a
    # sliding window (or an attention chunk), else every layer full
    window = getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        kind = "full_attention" if window is None else (
            "sliding_attention" if getattr(config, "sliding_window", None) else "chunked_attention")
        types = [kind] * config.num_hidden_layers
    kwargs = [{"sliding_window": window} if t in _WINDOWED else {} for t in types]
    return list(types), kwargs


def query_length(query: "int | torch.Tensor") -> int:
    """The number of queries a layer's `get_mask_sizes` is asked about: transformers >= 5.3 passes that count,
    5.0 - 5.2 the call's cache positions (one per query)."""
    return query.shape[0] if isinstance(query, torch.Tensor) else query
