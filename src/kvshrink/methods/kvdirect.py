"""`kvdirect`: KV-Direct (arXiv 2603.19664) residual checkpointing, per-layer scheme: each layer keeps every token's
residual-stream input and recomputes old keys and values from it with its own norm, projections and rotary
embedding; only the last `window` tokens keep materialised keys and values.

This trades compute for memory, and on most GQA models it does not save memory: a residual (hidden size) is larger
than the layer's keys plus values (SmolLM2: 576 vs 2 x 3 x 64 = 384 values, 1.5x; Gemma 3-4B: 1.25x). The paper's
5 KB/token figure counts one vector per token for all layers, which exact recomputation can only use as the layer-0
input, re-running the evicted prefix through every layer at every step: `scheme=token` does that (layers/residual.py).
Gemma 3's sliding-window layers keep their exact window (they never need older tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..layers.full import FullLayer, FullSlidingLayer
from ..layers.residual import RESIDUAL_DTYPES, PrefixRunner, ResidualLayer, TokenLayer
from ..cache import CompressedCache
from ..rope import decoder_layers, rotary_of
from .base import Method, option, register


@register
@dataclass
class KVDirect(Method):
    name = "kvdirect"
    summary = "keep each layer's residual input per token, recompute keys/values exactly (KV-Direct, per-layer)"

    scheme: str = option("layer", "'layer': every layer keeps each token's residual input and recomputes its own "
                                  "keys/values (cheap, but a residual outweighs a GQA layer's K+V); 'token': one "
                                  "residual per token for all layers, older keys/values recomputed by running those "
                                  "tokens through the decoder layers again each step (the paper's memory figure)")
    window: int = option(0, "most recent tokens whose keys and values stay materialised (the budget B)")
    materialize: int = option(0, "scheme=token: the first N decoder layers keep every token's keys and values (a "
                                 "plain cache) and the one residual per token is the input of layer N, so each step "
                                 "recomputes only layers N.. (cost x (L-N)/L, memory + N/L of a full cache); exact")
    recompute_chunk: int = option(256, "scheme=token: prefix queries per attention call when the evicted prefix is "
                                       "recomputed (a chunked prefill), so the step's attention scores are heads x "
                                       "chunk x prefix, not heads x prefix^2")
    residual_dtype: str = option("model", "how residuals are held: model (exact), float16, bfloat16, int8 "
                                          "(the last three give up exactness)")

    def validate(self) -> None:
        if self.scheme not in ("layer", "token"):
            raise ValueError(f"kvdirect: scheme must be 'layer' or 'token', got {self.scheme!r}")
        if self.window < 0:
            raise ValueError(f"kvdirect: window must be >= 0, got {self.window}")
        if self.materialize < 0 or (self.materialize and self.scheme != "token"):
            raise ValueError(f"kvdirect: materialize is a number of layers >= 0 and applies to scheme=token only, "
                             f"got materialize={self.materialize} with scheme={self.scheme!r}")
        if self.recompute_chunk < 1:
            raise ValueError(f"kvdirect: recompute_chunk must be >= 1, got {self.recompute_chunk}")
        if self.residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"kvdirect: residual_dtype must be one of {', '.join(RESIDUAL_DTYPES)}, "
                             f"got {self.residual_dtype!r}")

    def prepare(self, model_or_config: Any) -> None:
        if not hasattr(model_or_config, "config") or not hasattr(model_or_config, "parameters"):
            raise TypeError("kvdirect recomputes keys and values with the model's own modules: "
                            "make_cache(model, 'kvdirect'), not a config")
        install_hooks(model_or_config)
        self._model = model_or_config
        self._runner = PrefixRunner(model_or_config, self.window, self.residual_dtype, start=self.materialize,
                                    chunk=self.recompute_chunk) \
            if self.scheme == "token" else None

    def layer(self, layer_idx: int, sliding_window: int | None):
        if self._runner is not None and layer_idx < self._runner.start:  # materialised: a plain cache layer
            layer = FullLayer(layer_idx)
            # a sliding layer answers with every token and the sliding mask, as the token scheme's layers do (masks
            # are built from the model's first sliding layer, so all sliding layers must agree on their sizes)
            layer.is_sliding = sliding_window is not None
            return layer
        if self._runner is not None:
            return TokenLayer(self._runner, layer_idx, sliding_window)
        if sliding_window is not None:
            return FullSlidingLayer(sliding_window, layer_idx)
        text = self._model.config.get_text_config(decoder=True)
        kind = text.layer_types[layer_idx] if getattr(text, "layer_types", None) else "full_attention"
        return ResidualLayer(decoder_layers(self._model)[layer_idx], rotary_of(self._model), kind,
                             window=self.window, residual_dtype=self.residual_dtype, layer_idx=layer_idx)


def install_hooks(model: Any) -> None:
    """Give each decoder layer a pre-hook that hands its input (the residual stream) and position ids to the
    `ResidualLayer` of the cache it is called with (once per model)."""
    if getattr(model, "_kvshrink_residual_hooks", False):
        return
    layers = decoder_layers(model)

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
