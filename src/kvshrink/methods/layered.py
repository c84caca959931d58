"""`layered`: what a version-3 profile describes, layer by layer: the codecs of the keys and values (one per KV head
where the profile lists them per head) and the token policy that chooses which tokens stay (or none), as a joint
calibration chooses them. `make_cache(model, profile=PATH)` and `kvshrink run --profile PATH` build it.

Sinks, window and the exact dtype are the profile's options (overridable only to the same value); a layer without a
policy keeps every token, one with a policy keeps its budget.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .. import attention
from ..codecs.base import codec_from_spec
from ..codecs.perhead import PerHead
from ..layers.composed import GENERATED, ComposedLayer
from ..layers.full import FullSlidingLayer
from ..models import head_dim_of, text_config
from ..profile import LayerRecipe, Profile, ProfileError, load_profile
from .base import StoringMethod, option, register
from .build import build_method
from .eviction import DTYPES, EvictionMethod


@register
@dataclass
class Layered(StoringMethod):
    name = "layered"
    summary = "per layer (and KV head) codecs and token policies from a profile (tokens and bits chosen together)"

    profile: str = option("", "a version-3 profile naming each layer's codecs and policy; required")
    window: int = option(32, "recent tokens kept exact")
    sinks: int = option(4, "first tokens kept exact")
    exact_dtype: str = option("float16", "dtype of the exact window and sinks: model, float16 or bfloat16")
    generated: str = option("keep", "tokens generated after the prompt in layers whose policy compresses the prompt "
                                    "only: 'keep' every one or 'budget' (held to the layer's share too)")

    def validate(self) -> None:
        if not self.profile:
            raise ValueError("layered: needs profile=... (a version-3 profile with per-layer codecs and policies)")
        if self.exact_dtype not in DTYPES:
            raise ValueError(f"layered: exact_dtype must be one of {', '.join(DTYPES)}, got {self.exact_dtype!r}")
        if self.generated not in GENERATED:
            raise ValueError(f"layered: generated must be one of {', '.join(GENERATED)}, got {self.generated!r}")
        self._use(load_profile(self.profile))

    @classmethod
    def of(cls, profile: Profile, label: str = "(in memory)") -> "Layered":
        """The recipe of an in-memory profile (joint calibration tries allocations without writing files)."""
        method = object.__new__(cls)
        for f in dataclasses.fields(cls):
            setattr(method, f.name, f.default)
        method.profile = label
        method._use(profile)
        return method

    def _use(self, prof: Profile) -> None:
        if prof.method != "layered":
            raise ProfileError(f"profile {self.profile} builds {prof.method!r}, not layered codecs and policies")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, value in prof.options.items():
            if key not in ("window", "sinks", "exact_dtype"):
                raise ProfileError(f"profile {self.profile}: option {key!r} cannot be set by a layered profile")
            mine = getattr(self, key)
            if mine != value and mine != defaults[key]:
                raise ValueError(f"profile {self.profile} was calibrated with {key}={value!r}; {key}={mine!r} was "
                                 "asked for: leave it out")
            setattr(self, key, value)
        self._profile = prof
        self._policies = [self._policy(r.policy) for r in prof.layers]
        if self.generated == "budget":  # every prompt-only policy holds its generated tokens to its share
            for policy in self._policies:
                if policy is not None and not policy.make_policy().evicts_while_decoding:
                    policy.generated = "budget"
        for i in range(len(prof.layers)):
            self.layer_codecs(i)  # unknown codecs and options fail here, naming the layer

    def _policy(self, text: str | None) -> EvictionMethod | None:
        if text is None:
            return None
        method = build_method(text)
        if not isinstance(method, EvictionMethod):
            raise ValueError(f"profile {self.profile}: policy {text!r} is not a token-policy method")
        if method.make_policy().name == "kvzip":
            raise ValueError(f"profile {self.profile}: policy {text!r}: kvzip cannot be one layer's policy in a "
                             "layered profile (its reconstruction pass runs through the whole model, and coded "
                             "layers beside it would keep the pass's tokens); use the kvzip method itself, "
                             "'kvzip:budget=B + CODEC'")
        return method

    def _codec(self, entry: str | tuple[str, ...], layer_idx: int, what: str):
        def one(text: str):
            try:
                codec = codec_from_spec(text)
            except ValueError as e:
                raise ValueError(f"profile {self.profile}: layer {layer_idx} {what}: {e}") from None
            codec = codec.for_values() if what == "values" else codec
            return dataclasses.replace(codec, layer=layer_idx) if hasattr(codec, "layer") else codec

        return one(entry) if isinstance(entry, str) else PerHead(tuple(one(x) for x in entry))

    def layer_codecs(self, layer_idx: int):
        recipe: LayerRecipe = self._profile.layers[layer_idx]
        return self._codec(recipe.key, layer_idx, "keys"), self._codec(recipe.value, layer_idx, "values")

    def exact_torch_dtype(self):
        return DTYPES[self.exact_dtype]

    def prepare(self, model_or_config: Any) -> None:
        self._profile.check_model(model_or_config, f"profile {self.profile}")
        if hasattr(model_or_config, "set_attn_implementation"):
            attention.enable(model_or_config)
        self._head_dim = head_dim_of(text_config(model_or_config))
        kv_heads = text_config(model_or_config).num_key_value_heads
        for policy in self._policies:
            if policy is not None:
                policy._head_dim, policy._shard = self._head_dim, getattr(self, "_shard", None)
                policy._kv_heads = kv_heads  # heads=adaptive splits a layer into its KV heads

    def layer(self, layer_idx: int, sliding_window: int | None):
        if sliding_window is not None:
            return FullSlidingLayer(sliding_window, layer_idx)
        key, value = self.layer_codecs(layer_idx)
        policy = self._policies[layer_idx]
        if policy is not None:
            return policy.scored_layer(layer_idx, key, value, self.exact_torch_dtype(), self.window, self.sinks)
        return ComposedLayer(key, value, window=self.window, sinks=self.sinks, exact_dtype=self.exact_torch_dtype(),
                             layer_idx=layer_idx, shard=getattr(self, "_shard", None))

