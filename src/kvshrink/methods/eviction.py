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
from ..codecs.perhead import PerHead
from ..layers.composed import ComposedLayer, retention_problem
from ..layers.full import FullSlidingLayer
from ..layers.heads import HeadSplit
from ..models import head_dim_of, text_config
from ..policies.scoring import POLICIES, Policy, get_policy
from .base import PolicyMethod, option

HEAD_BUDGETS = ("uniform", "adaptive")

DTYPES = {"model": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EvictionMethod(PolicyMethod):
    """Options and cache building of the eviction methods (not a method by itself)."""

    policy_name: ClassVar[str] = ""

    budget: float = option(0.5, "share of the tokens seen that stay in the cache (0 < budget <= 1)")
    tokens: int = option(0, "a fixed number of tokens to keep instead of a share (0 = use `budget`)")
    sinks: int = option(4, "first tokens never evicted (attention sinks)")
    window: int = option(32, "most recent tokens never evicted")
    observe: int = option(32, "last prompt queries whose attention scores the prompt (snapkv)")
    exact_dtype: str = option("float16", "dtype of the kept tokens: model, float16 or bfloat16")
    heads: str = option("uniform", "how a layer's budget is shared by its KV heads: 'uniform' (the same count in "
                                   "each) or 'adaptive' (AdaKV: one ranking over all heads' tokens, each head "
                                   "holding its own count; prompt-only policies such as snapkv)")
    floor: float = option(0.2, "under heads=adaptive, the share of the uniform per-head budget every head keeps at "
                               "least (AdaKV's alpha)")
    generated: str = option("keep", "tokens generated after the prompt, under a prompt-only policy (snapkv): 'keep' "
                                    "every one (SnapKV) or 'budget' (held to the same budget, ranked by the "
                                    "attention the later queries give them)")
    scores: str = option("keep", "a prompt-only policy's per-token scores once the prompt is evicted, under "
                                 "generated=keep: 'keep' (held: 4 bytes per token and KV head, as before) or 'free' "
                                 "(dropped: nothing reads them again)")
    positions: str = option("int32", "under scores=free, how the kept prompt positions are held once the prompt is "
                                     "evicted: 'int32' (4 bytes per held token and KV head) or 'bits' (a bitmask: "
                                     "one bit per prompt token and KV head)")

    def validate(self) -> None:
        if not 0 < self.budget <= 1:
            raise ValueError(f"{self.name}: budget must be in (0, 1], got {self.budget}")
        for arg in ("tokens", "sinks", "window", "observe"):
            if getattr(self, arg) < 0:
                raise ValueError(f"{self.name}: {arg} must be >= 0, got {getattr(self, arg)}")
        if self.exact_dtype not in DTYPES:
            raise ValueError(f"{self.name}: exact_dtype must be one of {', '.join(DTYPES)}, got {self.exact_dtype!r}")
        policy = self.make_policy()
        if self.heads not in HEAD_BUDGETS:
            raise ValueError(f"{self.name}: heads must be one of {', '.join(HEAD_BUDGETS)}, got {self.heads!r}")
        if not 0 <= self.floor <= 1:
            raise ValueError(f"{self.name}: floor must be a share in [0, 1], got {self.floor}")
        problem = retention_problem(policy, self.generated, self.scores, self.positions)
        if problem:
            raise ValueError(f"{self.name}: {problem}")
        if self.heads == "adaptive" and policy.evicts_while_decoding:
            prompt_only = sorted(n for n, p in POLICIES.items() if not p.evicts_while_decoding)
            raise ValueError(f"{self.name}: heads=adaptive allocates the prompt's budget once, at the prefill; "
                             f"{policy.name} evicts while decoding. Policies that work: {', '.join(prompt_only)}")

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
        text = text_config(model_or_config)
        self._head_dim = head_dim_of(text)
        self._kv_heads = text.num_key_value_heads

    def layer(self, layer_idx: int, sliding_window: int | None):
        if sliding_window is not None:
            return FullSlidingLayer(sliding_window, layer_idx)
        exact = ExactCodec(self.exact_dtype)
        return self.scored_layer(layer_idx, exact, exact, DTYPES[self.exact_dtype], self.window, self.sinks)

    def scored_layer(self, layer_idx: int, key_codec: Codec, value_codec: Codec, exact_dtype, window: int,
                     sinks: int) -> ComposedLayer:
        """This method's policy and budget over the given codecs (the kept tokens' storage); under
        heads=adaptive one single-head layer per KV head, their budgets allocated together (`layers/heads.py`)."""
        low, keep = self.low_tier(self._head_dim, layer_idx, None if key_codec.lossless else key_codec)
        shard = getattr(self, "_shard", None)

        def one() -> ComposedLayer:
            return ComposedLayer(key_codec, value_codec, window=window, sinks=sinks,
                                 policy=self.make_policy(), budget=keep, tokens=self.tokens,
                                 observe=self.observe, low_codecs=low, exact_dtype=exact_dtype, layer_idx=layer_idx,
                                 shard=shard, generated=self.generated, scores=self.scores,
                                 positions=self.positions)

        if self.heads == "uniform":
            return one()
        where = f"{self.name}: heads=adaptive"
        if shard is not None:
            raise ValueError(f"{where} is not supported under tensor parallelism (each rank would allocate its own "
                             "heads' budget): use heads=uniform")
        for codec in (key_codec, value_codec, *(low or ())):
            if isinstance(codec, PerHead) or getattr(codec, "center", "none") == "head":
                raise ValueError(f"{where} keeps each KV head in a layer of its own: a codec shared across heads "
                                 f"({codec.name}: per-head codecs or mean=head) cannot store it; use one codec for "
                                 "every head and mean=none or channel")
        return HeadSplit([one() for _ in range(self._kv_heads)], floor=self.head_floor(), layer_idx=layer_idx,
                         label=f"{one().describe()['bits']}, {self.head_label()}")

    def head_floor(self) -> float | None:
        """Under heads=adaptive, the floor of the layer's own allocation over its heads (AdaKV); None where the
        method allocates the heads' counts itself (kvzip: one ranking over every layer's heads)."""
        return self.floor

    def head_label(self) -> str:
        return f"heads adaptive (floor {self.floor:g})"


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
