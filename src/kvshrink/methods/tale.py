"""`tale`: TALE (TACL 2025) token-adaptive low rank. Tokens leaving the recent window are approximated lazily, at a
level (rank, bits) earned by the attention they received while exact: the most significant `top` share at the
finest level, the rest split between the two cheaper levels that meet `target_ratio`. Attention runs on the
coefficients without rebuilding keys or values (see `layers/latent.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..codecs.lowrank import DROP, parse_levels
from ..layers.latent import SIGNIFICANCE
from ..policies.significance import level_fractions
from .base import option, register
from .lowrank import LatentMethod


@register
@dataclass
class Tale(LatentMethod):
    name = "tale"
    summary = "token-adaptive rank and bits by attention received, attention in the latent space (TALE)"

    target_ratio: float = option(0.11, "bytes of each approximated token over its fp16 bytes (0.11 = TALE's 9.1x)")
    levels: str = option("", "levels as r<rank>b<bits> joined by '/', e.g. 'r64b4/r32b4/r16b4/r8b4' "
                             "('' = ranks D, D/2, D/4, D/8 at 4 bits for a basis of size D)")
    top: float = option(0.1, "share of each block's tokens at the finest level (less if the budget cannot pay)")
    significance: str = option("attention", "what ranks tokens: 'attention' received while in the window, or "
                                            "key 'norm' (no observation needed)")
    observe: int = option(32, "last prompt queries whose attention scores the prompt's tokens at prefill")
    keep: float = option(1.0, "share of the approximated tokens kept; the least significant rest are evicted "
                              "(SnapKV's selection, then low rank for the kept: DynaKV's 6% setting)")
    pool: int = option(1, "max-pool width over neighbouring tokens' significance before ranking (SnapKV uses 7)")

    def validate(self) -> None:
        super().validate()
        if self.significance not in SIGNIFICANCE:
            raise ValueError(f"{self.name}: significance must be one of {SIGNIFICANCE}, got {self.significance!r}")
        if not 0 < self.target_ratio:
            raise ValueError(f"{self.name}: target_ratio must be > 0, got {self.target_ratio}")
        if not 0 <= self.top <= 1:
            raise ValueError(f"{self.name}: top must be in [0, 1], got {self.top}")
        if self.observe < 1:
            raise ValueError(f"{self.name}: observe must be >= 1, got {self.observe}")
        if not 0 < self.keep <= 1:
            raise ValueError(f"{self.name}: keep must be in (0, 1], got {self.keep}")
        if not isinstance(self.pool, int) or self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"{self.name}: pool must be an odd integer >= 1, got {self.pool!r}")
        if self.levels:
            parse_levels(self.levels)

    def level_plan(self, row):
        spec = self.levels or "/".join(f"r{row // k}b4" for k in (1, 2, 4, 8) if row // k >= 1)
        levels = parse_levels(spec, row)
        costs = self.level_costs(levels, row)
        # with eviction, each evicted token still costs its level byte; the kept share pays the rest of the target
        per_kept = (self.target_ratio - (1 - self.keep) * self.level_costs((DROP,), row)[0]) / self.keep
        try:
            fractions = level_fractions(costs, per_kept, min(1.0, self.top / self.keep))
        except ValueError:
            kept = f" with keep={self.keep} ({per_kept:.4f} per kept token)" if self.keep < 1 else ""
            raise ValueError(f"{self.name}: target_ratio {self.target_ratio}{kept} is below the cheapest level "
                             f"(r{levels[-1].rank}b{levels[-1].bits} costs {costs[-1]:.4f} of fp16): raise it, "
                             "lower keep or add a cheaper level") from None
        if self.keep < 1:
            return (*levels, DROP), (*(f * self.keep for f in fractions), 1 - self.keep)
        return levels, tuple(fractions)

    def layer_options(self):
        return {"observe": self.observe, "significance": self.significance, "pool": self.pool}
