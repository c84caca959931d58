"""Per-head budgets from per-head scores (AdaKV, Feng et al. 2024): a layer's heads share one budget, split by one
top-k over every head's ranked tokens, so a head whose attention is concentrated on few tokens gives room to a head
whose attention is spread. Each head first keeps its own best `floor` tokens (AdaKV's safeguard, alpha times the
uniform per-head share), then the rest of the budget goes to the best remaining tokens of any head.

A pure function of the scores: any wrapper holding one layer per head (`layers/heads.py`) or any scorer (SnapKV's,
KVzip's) can call it. Scores of different heads must be comparable (attention weights are: each query's row sums
to 1 in every head).
"""
from __future__ import annotations

from typing import Sequence

import torch


def head_budgets(ranks: Sequence[torch.Tensor], total: int, floor: int = 0) -> list[int]:
    """How many of its candidates each head keeps: `ranks[h]` [N_h] (higher kept first), `total` tokens for all
    heads together (at most sum N_h), each head at least min(`floor`, N_h). The counts sum to `total`."""
    sizes = [int(r.numel()) for r in ranks]
    if total < 0 or total > sum(sizes):
        raise ValueError(f"head_budgets: total must be in [0, {sum(sizes)}] (the candidates), got {total}")
    if floor < 0:
        raise ValueError(f"head_budgets: floor must be >= 0, got {floor}")
    floors = [min(floor, n) for n in sizes]
    if sum(floors) > total:  # the floor alone overspends: an even share instead, the rest by rank
        floors = [min(n, total // len(sizes)) for n in sizes]
    rest = total - sum(floors)
    if rest == 0:
        return floors
    pooled, owner = [], []
    for h, r in enumerate(ranks):
        flat = r.reshape(-1).float()
        left = flat.sort(descending=True, stable=True).values[floors[h]:]  # what the floor has not taken
        pooled.append(left)
        owner.append(torch.full((left.numel(),), h, dtype=torch.long, device=flat.device))
    values, heads = torch.cat(pooled), torch.cat(owner)
    # ties go to the lower head and, within a head, the order above: one stable sort, so the result is reproducible
    chosen = heads[values.sort(descending=True, stable=True).indices[:rest]]
    extra = torch.bincount(chosen, minlength=len(ranks)).tolist()
    return [f + e for f, e in zip(floors, extra)]
