"""What the eviction methods share: a budget of tokens picked by a token policy (`policies/scoring.py`), held by a
`ComposedLayer` whose codec is `exact` (the kept tokens as they are) unless a composition gives another. Each named
method (streamingllm, window, h2o, snapkv, tova) is this with one policy; `mixed` adds a low-bit tier for the
tokens the policy would drop. Any of them is the POLICY side of `POLICY + CODEC`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import attention
from .. import spec as specs
from ..codecs.base import Codec
from ..codecs.exact import ExactCodec
from ..layers.composed import ComposedLayer
from ..layers.full import FullSlidingLayer
from ..models import head_dim_of, text_config
from ..policies.scoring import Policy, get_policy
from .base import Method, option

DTYPES = {"model": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EvictionMethod(Method):
    """Options and cache building of the eviction methods (not a method by itself)."""

    policy_name: ClassVar[str] = ""

    budget: float = option(0.5, "share of the tokens seen that stay in the cache (0 < budget <= 1)")
    tokens: int = option(0, "a fixed number of tokens to keep instead of a share (0 = use `budget`)")
    sinks: int = option(4, "first tokens never evicted (attention sinks)")
    window: int = option(32, "most recent tokens never evicted")
    observe: int = option(32, "last prompt queries whose attention scores the prompt (snapkv)")
    exact_dtype: str = option("float16", "dtype of the kept tokens: model, float16 or bfloat16")

    def validate(self) -> None:
        if not 0 < self.budget <= 1:
            raise ValueError(f"{self.name}: budget must be in (0, 1], got {self.budget}")
        for arg in ("tokens", "sinks", "window", "observe"):
            if getattr(self, arg) < 0:
                raise ValueError(f"{self.name}: {arg} must be >= 0, got {getattr(self, arg)}")
        if self.exact_dtype not in DTYPES:
            raise ValueError(f"{self.name}: exact_dtype must be one of {', '.join(DTYPES)}, got {self.exact_dtype!r}")
        get_policy(self.scoring_policy())

    def scoring_policy(self) -> str:
        return self.policy_name

    def make_policy(self) -> Policy:
        """The token policy of one layer (a fresh instance: a policy may hold per-layer settings)."""
        return get_policy(self.scoring_policy())

    def low_tier(self, head_dim: int, layer_idx: int = 0, kept: Codec | None = None
                 ) -> tuple[tuple[Codec, Codec] | None, float]:
        """(key and value codecs of the tier evicted tokens go to, or None to drop them; the share of tokens kept
        by the policy). `kept`: the codec the kept tokens are stored with (None: exact)."""
        return None, self.budget

    def prepare(self, model_or_config: Any) -> None:
        if hasattr(model_or_config, "set_attn_implementation"):
            attention.enable(model_or_config)
        self._head_dim = head_dim_of(text_config(model_or_config))

    def layer(self, layer_idx: int, sliding_window: int | None):
        if sliding_window is not None:
            return FullSlidingLayer(sliding_window, layer_idx)
        exact = ExactCodec(self.exact_dtype)
        return self.scored_layer(layer_idx, exact, exact, DTYPES[self.exact_dtype], self.window, self.sinks)

    def scored_layer(self, layer_idx: int, key_codec: Codec, value_codec: Codec, exact_dtype, window: int,
                     sinks: int) -> ComposedLayer:
        """This method's policy and budget over the given codecs (the kept tokens' storage)."""
        low, keep = self.low_tier(self._head_dim, layer_idx, None if key_codec.lossless else key_codec)
        return ComposedLayer(key_codec, value_codec, window=window, sinks=sinks,
                             policy=self.make_policy(), budget=keep, tokens=self.tokens,
                             observe=self.observe, low_codecs=low, exact_dtype=exact_dtype, layer_idx=layer_idx,
                             shard=getattr(self, "_shard", None))


@dataclass
class PolicyRecipe(EvictionMethod):
    """A registered token policy named directly on the POLICY side of a composition (`mypolicy:budget=0.5 + kivi`):
    the eviction options with that policy, so a new policy needs no method of its own."""

    name = "policy"

    policy: str = option("", "the registered token policy")

    def scoring_policy(self) -> str:
        return self.policy

    def label(self) -> str:
        return self.policy

    def spec(self) -> str:
        opts = [(k, v) for k, v in self.options().items() if k != "policy"]
        return specs.format_part(self.policy, opts)
