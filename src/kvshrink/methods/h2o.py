"""`h2o`: H2O (Zhang et al. 2023) - heavy hitters by accumulated attention, plus a recent window."""
from __future__ import annotations

from dataclasses import dataclass

from .base import option, register
from .eviction import EvictionMethod

_SCORES = {"sum": "h2o", "normalized": "h2o_norm"}


@register
@dataclass
class H2O(EvictionMethod):
    name = "h2o"
    summary = "keep the tokens with the most accumulated attention plus a recent window (H2O)"
    policy_name = "h2o"

    score: str = option("sum", "'sum': attention summed over every query (the paper); 'normalized': divided by the "
                               "number of queries that saw each token (kvpress's observed attention)")

    def scoring_policy(self) -> str:
        if self.score not in _SCORES:
            raise ValueError(f"h2o: score must be one of {', '.join(_SCORES)}, got {self.score!r}")
        return _SCORES[self.score]
