"""KV-Direct's hook into the model: a forward pre-hook on each decoder layer hands the layer's input (the residual
stream) to the cache layer about to be updated. The layers themselves (`ResidualLayer`, `TokenLayer` and the
token scheme's `PrefixRunner`) live in `kvshrink.layers.residual` and are re-exported here for old imports.
"""
from __future__ import annotations

from typing import Any

from .cache import CompressedCache
from .layers.residual import (RESIDUAL_DTYPES, PrefixRunner, ResidualLayer, TokenLayer,  # noqa: F401
                              store_residual)
from .rope import decoder_layers as _decoder_layers

__all__ = ["RESIDUAL_DTYPES", "PrefixRunner", "ResidualLayer", "TokenLayer", "install_hooks", "store_residual"]


def install_hooks(model: Any) -> None:
    """Give each decoder layer a pre-hook that hands its input (the residual stream) and position ids to the
    `ResidualLayer` of the cache it is called with (once per model)."""
    if getattr(model, "_kvshrink_residual_hooks", False):
        return
    layers = _decoder_layers(model)

    def hook(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if not isinstance(cache, CompressedCache):
            return None
        layer = cache.layers[module._kvshrink_index]
        if isinstance(layer, ResidualLayer):
            h = args[0] if args else kwargs["hidden_states"]
            layer.pending = (h, kwargs.get("position_ids"))
        elif isinstance(layer, TokenLayer) and module._kvshrink_index == layer.runner.start:
            layer.runner.begin(args[0] if args else kwargs["hidden_states"], kwargs.get("position_ids"))
        return None

    for i, layer in enumerate(layers):
        layer._kvshrink_index = i
        layer.register_forward_pre_hook(hook, with_kwargs=True)
    model._kvshrink_residual_hooks = True
