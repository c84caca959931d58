"""What the eviction methods share: a budget of exact tokens picked by a scoring policy (`policies/scoring.py`),
held by an `EvictingLayer`. Each named method (streamingllm, h2o, snapkv, tova) is this with one policy; `mixed`
adds a low-bit tier for the tokens the policy would drop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..codecs.quant import QuantSpec
from ..layers.evicting import EvictingLayer
from ..layers.full import FullSlidingLayer
from ..models import head_dim_of, text_config
from ..policies.scoring import get_policy
from .base import Method, option

_DTYPES = {"model": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
        if self.exact_dtype not in _DTYPES:
            raise ValueError(f"{self.name}: exact_dtype must be one of {', '.join(_DTYPES)}, got {self.exact_dtype!r}")
        get_policy(self.scoring_policy())

    def scoring_policy(self) -> str:
        return self.policy_name

    def low_tier(self, head_dim: int, layer_idx: int = 0) -> tuple[QuantSpec | None, float]:
        """(spec of the tier evicted tokens go to, or None to drop them; the share of tokens kept exact)."""
        return None, self.budget

    def make_cache(self, model_or_config: Any):
        from .. import attention

        if hasattr(model_or_config, "set_attn_implementation"):
            attention.enable(model_or_config)
        text = text_config(model_or_config)
        self._head_dim = head_dim_of(text)
        return super().make_cache(model_or_config)

    def layer(self, layer_idx: int, sliding_window: int | None):
        if sliding_window is not None:
            return FullSlidingLayer(sliding_window, layer_idx)
        low, keep = self.low_tier(self._head_dim, layer_idx)
        return EvictingLayer(get_policy(self.scoring_policy()), budget=keep, tokens=self.tokens, sinks=self.sinks,
                             window=self.window, observe=self.observe, low_spec=low,
                             exact_dtype=_DTYPES[self.exact_dtype], layer_idx=layer_idx,
                             shard=getattr(self, "_shard", None))
