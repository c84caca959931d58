"""`razor`: RazorAttention (Tang et al. 2024). Retrieval heads (the `share` of KV heads with the highest echo +
induction score in a profile from `kvshrink calibrate --method razor`) keep every token; every other head keeps
`sinks` first tokens, the `window` latest and one compensation token (the mean key and value of all it evicted,
weighted in attention by their count). The POLICY side of `razor:profile=P + kivi:bits=4`: the retrieval heads'
tokens are then stored by the codec; the other heads' few tokens stay exact.

A layer with both kinds of head is a `HeadSplit` (one layer per head); a layer with one kind is a single layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import attention
from ..codecs.base import Codec
from ..codecs.exact import ExactCodec
from ..codecs.perhead import PerHead
from ..layers.compensated import CompensatedLayer
from ..layers.composed import ComposedLayer
from ..layers.full import FullSlidingLayer
from ..layers.heads import HeadSplit
from ..models import text_config
from ..profile import load_profile
from ..retrieval import retrieval_heads, scores_of
from .base import PolicyMethod, option, register
from .eviction import DTYPES


@register
@dataclass
class Razor(PolicyMethod):
    name = "razor"
    summary = ("retrieval heads (from a profile of echo/induction scores) keep every token, the others sinks + "
               "window + one compensation token (RazorAttention)")

    profile: str = option("", "retrieval-head profile from `kvshrink calibrate --method razor` (path)")
    share: float = option(0.15, "share of the KV heads (highest echo + induction score) that keep every token")
    sinks: int = option(4, "first tokens the other heads keep")
    window: int = option(128, "most recent tokens the other heads keep")
    exact_dtype: str = option("float16", "dtype of the exact tokens: model, float16 or bfloat16")

    def validate(self) -> None:
        if not self.profile:
            raise ValueError("razor: profile is required (a file from `kvshrink calibrate --method razor`)")
        if not 0 <= self.share <= 1:
            raise ValueError(f"razor: share must be a fraction in [0, 1], got {self.share}")
        for arg in ("sinks", "window"):
            if getattr(self, arg) < 0:
                raise ValueError(f"razor: {arg} must be >= 0, got {getattr(self, arg)}")
        if self.exact_dtype not in DTYPES:
            raise ValueError(f"razor: exact_dtype must be one of {', '.join(DTYPES)}, got {self.exact_dtype!r}")

    def label(self) -> str:
        return f"razor:share={self.share:g}"

    def prepare(self, model_or_config: Any) -> None:
        if getattr(self, "_shard", None) is not None:
            raise ValueError("razor is not supported under tensor parallelism (its layers hold each KV head on its "
                             "own); run it in one process")
        where = f"razor profile {self.profile}"
        profile = load_profile(self.profile)
        echo, induction = scores_of(profile, where)
        profile.check_model(model_or_config, where)
        text = text_config(model_or_config)
        types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        full = [i for i, kind in enumerate(types) if kind != "sliding_attention"]
        self._retrieval = retrieval_heads(echo, induction, self.share, full)
        self._kv_heads = text.num_key_value_heads
        if hasattr(model_or_config, "set_attn_implementation"):
            attention.enable(model_or_config)

    def layer(self, layer_idx: int, sliding_window: int | None):
        if sliding_window is not None:
            return FullSlidingLayer(sliding_window, layer_idx)
        exact = ExactCodec(self.exact_dtype)
        return self.scored_layer(layer_idx, exact, exact, DTYPES[self.exact_dtype], self.window, self.sinks)

    def retrieval_in(self, layer_idx: int) -> list[int]:
        """The KV heads of a layer that keep every token."""
        return sorted(h for layer, h in self._retrieval if layer == layer_idx)

    def scored_layer(self, layer_idx: int, key_codec: Codec, value_codec: Codec, exact_dtype, window: int,
                     sinks: int):
        keep_all = self.retrieval_in(layer_idx)
        if len(keep_all) == self._kv_heads:  # every head keeps every token: the codec's own layer
            return ComposedLayer(key_codec, value_codec, window=window, sinks=sinks, exact_dtype=exact_dtype,
                                 layer_idx=layer_idx)
        if not keep_all:
            return CompensatedLayer(window=window, sinks=sinks, exact_dtype=exact_dtype, layer_idx=layer_idx)
        for codec in (key_codec, value_codec):
            if isinstance(codec, PerHead) or getattr(codec, "center", "none") == "head":
                raise ValueError(f"razor keeps each KV head of layer {layer_idx} in a layer of its own: a codec "
                                 f"shared across heads ({codec.name}: per-head codecs or mean=head) cannot store "
                                 "it; use one codec for every head and mean=none or channel")
        heads = [ComposedLayer(key_codec, value_codec, window=window, sinks=sinks, exact_dtype=exact_dtype,
                               layer_idx=layer_idx) if h in keep_all else
                 CompensatedLayer(window=window, sinks=sinks, exact_dtype=exact_dtype, layer_idx=layer_idx)
                 for h in range(self._kv_heads)]
        return HeadSplit(heads, layer_idx=layer_idx,
                         label=f"razor: heads {keep_all} keep all, the others {sinks} sinks + {window} window + 1")
