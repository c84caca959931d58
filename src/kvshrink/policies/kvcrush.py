"""KVCrush (Jha et al. 2025): a base policy keeps most of the budget; the rest goes to representatives of the
tokens it drops, so that no kind of token is lost whole.

Of the tokens the base keeps in no head, each gets a binary signature over the layer's KV heads (bit h: its rank in
head h is above head h's mean over the candidates), and is ordered by the Hamming distance of its signature to an
anchor (then by position). That order is cut into as many equal buckets as there are representatives, and each
bucket's best token (highest rank averaged over heads) is kept, in every head. With few KV heads (2 on Qwen2.5-1.5B)
the distances take few values and the buckets mostly split tokens of one distance by position. Signatures live only
while a layer evicts: nothing more is stored.
"""
from __future__ import annotations

import torch

from .scoring import Policy, ScoreContext

ANCHORS = ("ones", "alternate")


class Crush(Policy):
    """`base`'s scores and ranking; `share` of each eviction's room goes to one representative per bucket."""

    name = "kvcrush"
    summary = "a base policy plus one representative per bucket of similar dropped tokens (KVCrush)"

    def __init__(self, base: Policy, share: float = 0.25, anchor: str = "ones"):
        if not 0 <= share < 1:
            raise ValueError(f"kvcrush: share must be in [0, 1), got {share}")
        if anchor not in ANCHORS:
            raise ValueError(f"kvcrush: anchor must be one of {', '.join(ANCHORS)}, got {anchor!r}")
        self.base, self.share, self.anchor = base, share, anchor
        self.evicts_while_decoding = base.evicts_while_decoding
        self.per_layer = base.per_layer
        self.needs_attention = base.needs_attention
        self.needs = base.needs

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return self.base.score(ctx)

    def rank(self, scores: torch.Tensor, positions: torch.Tensor, seen: int) -> torch.Tensor:
        return self.base.rank(scores, positions, seen)

    def anchor_signature(self, heads: int, device: torch.device) -> torch.Tensor:
        """The anchor [H] (bool): every bit set ("ones") or every other one ("alternate")."""
        idx = torch.arange(heads, device=device)
        return torch.ones_like(idx, dtype=torch.bool) if self.anchor == "ones" else idx % 2 == 0

    def choose(self, rank: torch.Tensor, room: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, n = rank.shape
        reps = int(self.share * room + 0.5)
        if reps == 0 or room >= n:
            return super().choose(rank, room)
        order = torch.sort(rank, dim=-1, descending=True, stable=True).indices
        kept = torch.zeros(b, h, n, dtype=torch.bool, device=rank.device)
        kept.scatter_(-1, order[..., :room - reps], True)
        signature = rank > rank.mean(-1, keepdim=True)  # [B, H, N]
        distance = (signature != self.anchor_signature(h, rank.device)[None, :, None]).sum(1)  # [B, N]
        strength = rank.float().mean(1)  # [B, N]
        for row in range(b):
            pool = (~kept[row].any(0)).nonzero().squeeze(-1)  # dropped in every head, in position order
            pool = pool[torch.sort(distance[row, pool], stable=True).indices]
            found = min(reps, pool.numel())
            for bucket in torch.tensor_split(pool, found) if found else ():
                kept[row, :, bucket[strength[row, bucket].argmax()]] = True
            if found < reps:  # fewer dropped tokens than representatives: the base's next best fill each head
                rest = rank[row].masked_fill(kept[row], float("-inf"))
                extra = torch.sort(rest, dim=-1, descending=True, stable=True).indices[:, :reps - found]
                kept[row].scatter_(-1, extra, True)
        index = torch.arange(n, device=rank.device).expand(b, h, n)
        return index[kept].reshape(b, h, room), index[~kept].reshape(b, h, n - room)
