"""`tova`: TOVA (Oren et al. 2024) - each step, drop the tokens the current query attends to least."""
from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .eviction import EvictionMethod


@register
@dataclass
class TOVA(EvictionMethod):
    name = "tova"
    summary = "each step, evict the tokens with the least attention from the current query, head-averaged (TOVA)"
    policy_name = "tova"
