"""`snapkv`: SnapKV (Li et al. 2024) - the prompt compressed once, by the attention of its last queries."""
from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .eviction import EvictionMethod


@register
@dataclass
class SnapKV(EvictionMethod):
    name = "snapkv"
    summary = "compress the prompt by the pooled attention of its last `observe` queries; decoding keeps all (SnapKV)"
    policy_name = "snapkv"
