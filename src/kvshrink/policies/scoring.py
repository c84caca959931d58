"""Token scores for eviction: which held tokens matter, from the attention they receive.

The layer that holds the tokens computes attention itself (kvshrink's attention function) and hands every policy
the attention each held token received in this call, per KV head (averaged over the query heads that share it):
- "all": summed over every query of the call (the whole prompt at prefill, one token per decoding step);
- "observed": summed over the last `observe` queries (SnapKV's observation window);
- "last": from the last query only.
A policy turns that, its previous scores and the tokens' positions into new scores; the highest are kept.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..registry import registrar

POLICIES: dict[str, type["Policy"]] = {}
register_policy = registrar(POLICIES, "eviction policy")


class Policy:
    """Scores held tokens; subclasses say how."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: evicts during decoding too (False: only the prompt is compressed, as SnapKV does)
    evicts_while_decoding: ClassVar[bool] = True
    #: one score per token for the whole layer (all heads keep the same tokens) instead of one per head
    per_layer: ClassVar[bool] = False
    #: needs the attention weights (StreamingLLM does not)
    needs_attention: ClassVar[bool] = True
    #: which of the received-attention sums `score` reads ("all", "observed", "last"): a prefill that only scores
    #: computes the queries those need (the observation window, not the whole prompt, for SnapKV and TOVA)
    needs: ClassVar[tuple[str, ...]] = ("all", "observed", "last")

    def score(self, old: torch.Tensor, received: dict[str, torch.Tensor], positions: torch.Tensor,
              prefill: bool) -> torch.Tensor:
        """New scores [B, H, T] from the old ones (0 for tokens new in this call)."""
        raise NotImplementedError

    def rank(self, scores: torch.Tensor, positions: torch.Tensor, seen: int) -> torch.Tensor:
        """What eviction ranks by (highest kept): the scores themselves unless a policy normalises them."""
        return scores


@register_policy
class Recency(Policy):
    name = "streamingllm"
    summary = "attention sinks plus the most recent tokens (StreamingLLM)"
    needs_attention = False
    needs = ()

    def score(self, old, received, positions, prefill):
        return positions.float()


@register_policy
class HeavyHitters(Policy):
    name = "h2o"
    summary = "attention accumulated over every query so far (H2O heavy hitters)"
    needs = ("all",)

    def score(self, old, received, positions, prefill):
        return old + received["all"]


@register_policy
class ObservedAttention(HeavyHitters):
    name = "h2o_norm"
    summary = ("attention accumulated over every query so far, divided by the number of queries that saw the "
               "token (kvpress's observed attention; the raw sum favours early tokens)")

    def rank(self, scores, positions, seen):
        return scores / (seen - positions).clamp_min(1).float()  # a token at position p was seen by seen - p queries


@register_policy
class ObservationWindow(Policy):
    name = "snapkv"
    summary = "attention from the prompt's last queries, max-pooled over neighbours; prompt only (SnapKV)"
    evicts_while_decoding = False
    needs = ("observed",)
    kernel = 7

    def score(self, old, received, positions, prefill):
        if not prefill:
            return old
        s = received["observed"]
        b, h, t = s.shape
        pooled = F.max_pool1d(s.reshape(b * h, 1, t), self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.reshape(b, h, t)


@register_policy
class LastQuery(Policy):
    name = "tova"
    summary = "attention from the current query, averaged over heads; lowest dropped each step (TOVA)"
    per_layer = True
    needs = ("last",)

    def score(self, old, received, positions, prefill):
        return received["last"]


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; available: {', '.join(sorted(POLICIES))}")
    return POLICIES[name]()
