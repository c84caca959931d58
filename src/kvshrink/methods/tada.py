"""`tada`: TaDA (AMD, ACL 2025 industry) mean-centred quantization, uniform bits (per-layer bits come with profiles).

`center="head"` is the paper's scheme: each token's mean over the KV heads is kept in fp16 and only the deviations
are quantized; it costs 16/kv_heads bits per element (5.3 on SmolLM2's 3 KV heads). `center="channel"` subtracts
each head's per-channel mean over the prefill instead, for almost no bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import option, register
from .kivi import Kivi


@register
@dataclass
class Tada(Kivi):
    name = "tada"
    summary = "KIVI-style quantization of mean-centred keys and values (TaDA)"

    mean: str = option("head", "what is subtracted before quantizing: 'head' (per-token mean over KV heads), "
                               "'channel' (per-head channel mean of the prefill) or 'none'")

    def center(self) -> str:
        return self.mean
