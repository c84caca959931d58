"""Token significance -> storage level: how many tokens of a block go to each level, and which ones.

Levels are ordered from the most expensive (highest rank / bits) to the cheapest. A target cost per token is met by
putting a fixed fraction `top` of the tokens (the most significant) at level 0 and splitting the rest between the
two adjacent levels whose costs bracket what is left of the budget. Counts are the same in every (batch,
group) row of a block, so each level's storage stays rectangular.
"""
from __future__ import annotations

from typing import Sequence

import torch


def level_fractions(costs: Sequence[float], target: float, top: float) -> list[float]:
    """Fraction of tokens per level so the mean cost is `target` (costs decreasing, level 0 the finest).

    Raises ValueError when `target` is below the cheapest level's cost. A target at or above level 0's cost puts
    every token at level 0.
    """
    if not costs:
        raise ValueError("no levels")
    if any(a < b for a, b in zip(costs, costs[1:])):
        raise ValueError(f"level costs must not increase from level 0 to the last, got {list(costs)}")
    if not 0 <= top <= 1:
        raise ValueError(f"top must be a fraction in [0, 1], got {top}")
    if target < costs[-1] - 1e-9:
        raise ValueError(f"a target of {target:.2f} bytes per token is below the cheapest level ({costs[-1]:.2f})")
    fractions = [0.0] * len(costs)
    if target >= costs[0] or len(costs) == 1:
        fractions[0] = 1.0
        return fractions
    # the top tier, as much of `top` as the budget allows while the rest sits at the cheapest level
    f0 = min(top, (target - costs[-1]) / (costs[0] - costs[-1]))
    fractions[0] = f0
    rest = 1.0 - f0
    if rest <= 0:
        return fractions
    per = (target - f0 * costs[0]) / rest  # mean cost left for each remaining token
    for j in range(len(costs) - 1):  # the adjacent pair of levels whose costs bracket it
        hi, lo = costs[j], costs[j + 1]
        if per >= lo - 1e-12:
            a = (per - lo) / (hi - lo) if hi > lo else 1.0
            fractions[j] += rest * min(a, 1.0)
            fractions[j + 1] += rest * (1 - min(a, 1.0))
            return fractions
    fractions[-1] += rest
    return fractions


def level_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Integer token counts per level summing to `n`, never costlier than `fractions` asks: every level but the
    cheapest rounds down, the cheapest takes the rest."""
    counts = [int(f * n + 1e-9) for f in fractions[:-1]]
    return counts + [n - sum(counts)]


def assign_levels(scores: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Levels [.., T] (uint8) for significance `scores` [.., T]: the `counts[0]` highest get level 0, and so on.

    Ties keep token order (earlier tokens first), so equal scores give a deterministic assignment."""
    t = scores.shape[-1]
    if sum(counts) != t:
        raise ValueError(f"level counts {list(counts)} do not add up to the {t} tokens to assign")
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    by_rank = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.uint8),
                                      torch.tensor(list(counts), dtype=torch.long)).to(scores.device)
    levels = torch.empty_like(order, dtype=torch.uint8)
    levels.scatter_(-1, order, by_rank.expand_as(order).contiguous())
    return levels
