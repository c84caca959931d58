"""`h2o`: H2O (Zhang et al. 2023) - heavy hitters by accumulated attention, plus a recent window."""
from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .eviction import EvictionMethod


@register
@dataclass
class H2O(EvictionMethod):
    name = "h2o"
    summary = "keep the tokens with the most accumulated attention plus a recent window (H2O)"
    policy_name = "h2o"
