"""Token policies: which held tokens matter. A policy scores the tokens a layer holds; the highest are kept.

At the prefill and at each decoding step the layer hands its policy a `ScoreContext`, which computes what the
policy reads only when the policy reads it (kvpress's scorers see the same things):
- `received`: the attention each held token received in this call, per KV head (averaged over the query heads
  that share it): "all" summed over every query of the call (the whole prompt at prefill, one token per decoding
  step), "observed" over the last `observe` queries (SnapKV's observation window), "last" from the last query;
  "max" (for a policy whose `needs` name it) the largest from any query and any query head sharing the KV head;
- `keys`, `values`: the held tokens [B, H, T, D] (decoded, float32), in held order (sinks, stored, window);
- `queries`: the observation window's queries [B, Hq, observe, D]; `positions` [B, H, T]; `old` the previous scores
  (0 for tokens new in this call); `prefill`, `seen`, `layer`;
- `given`: the keys and values this call added, as the model computed them [B, H, q, D] (at the prefill: the whole
  prompt, in the model's dtype, before any rounding to the layer's storage);
- `inputs`: the attention module, its input hidden states and its keyword arguments (`attention.LayerInputs`), for
  policies that project their own queries (kvpress's scorers); only there when the method captured them
  (`attention.capture_inputs(model)` in its `prepare`), so other policies' models carry no hooks.
- `probe`: during a scoring pass (`ComposedLayer.probing`: tokens that attend over the held ones and are never
  kept, KVzip's reconstruction), that pass's keys and values; None otherwise.
"""
from __future__ import annotations

from functools import cached_property
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .. import attention
from ..options import registrar

POLICIES: dict[str, type["Policy"]] = {}
register_policy = registrar(POLICIES, "token policy")


class ScoreContext:
    """What a policy may read about one attention call of a layer, each computed on first use."""

    def __init__(self, layer: Any, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, prefill: bool,
                 given: tuple[torch.Tensor, torch.Tensor] | None = None,
                 probe: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.layer, self.query, self.mask, self.scaling, self.prefill = layer, query, mask, scaling, prefill
        self.given, self.probe = given, probe
        self.old: torch.Tensor = layer.scores
        self.positions: torch.Tensor = layer.positions
        self.seen: int = layer.seen
        self._result: tuple[torch.Tensor | None, dict[str, torch.Tensor]] | None = None

    def _attend(self, outputs: bool) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        if self._result is None or (outputs and self._result[0] is None):
            self._result = self.layer.attention(self.query, self.mask, self.scaling, outputs=outputs,
                                                needs=self.layer.policy.needs, extra=self.probe)
        return self._result

    @property
    def output(self) -> torch.Tensor:
        """The attention output of the call [B, Hq, Q, D] (computed with the received attention)."""
        return self._attend(True)[0]

    @property
    def received(self) -> dict[str, torch.Tensor]:
        return self._attend(not self.prefill)[1]

    @cached_property
    def _held(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, v, _, n_low = self.layer._held_tokens()
        return k[:, :, n_low:], v[:, :, n_low:]

    @property
    def keys(self) -> torch.Tensor:
        return self._held[0]

    @property
    def values(self) -> torch.Tensor:
        return self._held[1]

    @property
    def queries(self) -> torch.Tensor:
        return self.query[:, :, -self.layer.observe:]

    @property
    def inputs(self) -> attention.LayerInputs:
        got = attention.layer_inputs()
        if got is None or getattr(got.module, "layer_idx", None) != self.layer.layer_idx:
            raise RuntimeError(f"layer {self.layer.layer_idx}: policy {self.layer.policy.name!r} reads the attention "
                               "module's inputs, which were not captured (its method's prepare calls "
                               "kvshrink.attention.capture_inputs(model))")
        return got


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
    #: which of the received-attention sums `score` reads ("all", "observed", "last", "max"): a prefill that only scores
    #: computes the queries those need (the observation window, not the whole prompt, for SnapKV and TOVA)
    needs: ClassVar[tuple[str, ...]] = ("all", "observed", "last")

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """New scores [B, H, T] of the held tokens (see `ScoreContext` for what may be read)."""
        raise NotImplementedError

    def rank(self, scores: torch.Tensor, positions: torch.Tensor, seen: int) -> torch.Tensor:
        """What eviction ranks by (highest kept): the scores themselves unless a policy normalises them."""
        return scores

    def choose(self, rank: torch.Tensor, room: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept, gone): indices [B, H, room] and [B, H, N - room] of the candidates ranked `rank` [B, H, N], each
        in increasing order: the `room` best-ranked (ties to the earlier) unless a policy chooses otherwise."""
        order = torch.sort(rank, dim=-1, descending=True, stable=True).indices
        return order[..., :room].sort(-1).values, order[..., room:].sort(-1).values


@register_policy
class Recency(Policy):
    name = "streamingllm"
    summary = "attention sinks plus the most recent tokens (StreamingLLM)"
    needs_attention = False
    needs = ()

    def score(self, ctx):
        return ctx.positions.float()


@register_policy
class HeavyHitters(Policy):
    name = "h2o"
    summary = "attention accumulated over every query so far (H2O heavy hitters)"
    needs = ("all",)

    def score(self, ctx):
        return ctx.old + ctx.received["all"]


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

    def score(self, ctx):
        if not ctx.prefill:
            return ctx.old
        s = ctx.received["observed"]
        b, h, t = s.shape
        pooled = F.max_pool1d(s.reshape(b * h, 1, t), self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.reshape(b, h, t)


@register_policy
class LastQuery(Policy):
    name = "tova"
    summary = "attention from the current query, averaged over heads; lowest dropped each step (TOVA)"
    per_layer = True
    needs = ("last",)

    def score(self, ctx):
        return ctx.received["last"]


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown token policy {name!r}; available: {', '.join(sorted(POLICIES))}")
    return POLICIES[name]()
