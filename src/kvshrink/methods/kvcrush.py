"""`kvcrush`: KVCrush (Jha et al. 2025) over a base eviction policy: the base keeps (1 - share) of the budget,
one representative per bucket of similar dropped tokens the rest (`policies/kvcrush.py`)."""
from __future__ import annotations

from dataclasses import dataclass

from ..policies.kvcrush import ANCHORS, Crush
from ..policies.scoring import get_policy
from .base import option, register
from .eviction import EvictionMethod

#: base policies that rank by attention (a signature bit compares a head's attention with its mean)
BASES = ("snapkv", "h2o", "h2o_norm", "tova")


@register
@dataclass
class KVCrush(EvictionMethod):
    name = "kvcrush"
    summary = ("a base policy keeps (1 - share) of the budget; of the tokens it drops, one per bucket of similar "
               "head-attention signatures is kept in every head (KVCrush)")

    base: str = option("snapkv", f"the policy keeping most of the budget: {', '.join(BASES)}")
    share: float = option(0.25, "share of the budget given to representatives of the dropped tokens (0 <= share < 1)")
    anchor: str = option("ones", "signature the dropped tokens are ordered by distance to: 'ones' (above the mean in "
                                 "every head) or 'alternate' (every other head)")

    def scoring_policy(self) -> str:
        return self.base

    def validate(self) -> None:
        if self.base not in BASES:
            raise ValueError(f"kvcrush: base must be one of {', '.join(BASES)}, got {self.base!r}")
        if not 0 <= self.share < 1:
            raise ValueError(f"kvcrush: share must be in [0, 1), got {self.share}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"kvcrush: anchor must be one of {', '.join(ANCHORS)}, got {self.anchor!r}")
        super().validate()

    def make_policy(self) -> Crush:
        return Crush(get_policy(self.base), self.share, self.anchor)
