"""EvictingLayer: a cache layer that keeps a budget of tokens chosen by an eviction policy, and optionally keeps
the tokens it evicts at low bits instead of dropping them ("no token left behind", MiKV).

Tokens are held with their positions (int32, counted), so each KV head can keep its own set and masks (padding,
causality) still apply by position. The layer attends by itself through kvshrink's attention function: the scores
a policy needs come from the same query-key products as the attention output, so no layer falls back to eager
attention and no attention matrix is materialised beyond a block of queries at a time. After each attention call
the policy rescores the held tokens and the layer evicts down to its budget; the first `sinks` positions and the
last `window` positions are never evicted.

Under tensor parallelism (`shard` set) the layer holds its rank's KV heads. A per-head policy needs nothing more;
a per-layer one (TOVA: every head keeps the same tokens) averages its scores over every rank's heads, gathered, so
all ranks keep the same positions, the ones a single process keeps.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .. import attention
from ..codecs.quant import QuantSpec
from ..codecs.rotation import RotationSpec
from ..distributed import gather_heads
from ..policies.scoring import Policy
from .base import CompressedLayer, add_store_parts, check_counts

_QUERY_BLOCK = 512  # queries per block when a prompt attends (bounds the score matrix at block x tokens)


class EvictingLayer(attention.SelfAttending, CompressedLayer):
    """Exact kept tokens (and, with `low_spec`, a low-bit tier of evicted ones) for one decoder layer.

    budget: a fraction of the tokens seen (0 < budget <= 1) kept exact, or `tokens` > 0 a fixed count (the larger
    of the two rules' results with sinks and window included is never below sinks + window).
    """

    replays_prefill = True  # its prefill attention is plain SDPA (see eval.prefill)
    kind = "an evicting"
    _batch_tensors = ("keys", "values", "positions", "scores", "low_positions")
    _batch_stores = ("low_keys", "low_values")

    def __init__(self, policy: Policy, *, budget: float = 1.0, tokens: int = 0, sinks: int = 4, window: int = 32,
                 observe: int = 32, low_spec: QuantSpec | RotationSpec | None = None, exact_dtype: torch.dtype | None = None,
                 layer_idx: int = -1, shard=None):
        super().__init__()
        where = f"layer {layer_idx}"
        if not (0 < budget <= 1):
            raise ValueError(f"{where}: budget must be a fraction in (0, 1], got {budget}")
        check_counts(layer_idx, tokens=tokens, sinks=sinks, window=window, observe=observe)
        self.policy, self.budget, self.tokens = policy, budget, tokens
        self.sinks, self.window, self.observe = sinks, window, max(observe, 1)
        self.low_spec, self.exact_dtype, self.layer_idx = low_spec, exact_dtype, layer_idx
        self.shard = shard
        self.sliding_window = None
        self.is_sliding = False
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = self.positions = self.scores = None
        self.low_keys = self.low_spec.make_store(f"layer {self.layer_idx} low keys") if self.low_spec else None
        self.low_values = self.low_spec.make_store(f"layer {self.layer_idx} low values") if self.low_spec else None
        if self.low_spec:
            self.low_keys.shard = self.low_values.shard = self.shard
        self.low_positions = None
        self.seen = 0
        self.calls = 0
        self._awaiting = False  # an update not yet answered by attend()
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        if self.low_spec is not None:
            self.low_spec.check_head_dim(d, f"layer {self.layer_idx} low tier")
        super().lazy_initialization(key_states, value_states)  # the kept tokens, in `exact_dtype`
        self.positions = torch.zeros((b, h, 0), dtype=torch.int32, device=key_states.device)
        self.scores = torch.zeros((b, h, 0), dtype=torch.float32, device=key_states.device)
        self.low_positions = self.positions.clone()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._begin_update(key_states, value_states)
        b, h, t, _ = key_states.shape
        pos = torch.arange(self.seen, self.seen + t, dtype=torch.int32, device=key_states.device)
        self.keys = torch.cat([self.keys, key_states.to(self.keys.dtype)], -2)
        self.values = torch.cat([self.values, value_states.to(self.values.dtype)], -2)
        self.positions = torch.cat([self.positions, pos.expand(b, h, t)], -1)
        self.scores = torch.cat([self.scores, self.scores.new_zeros(b, h, t)], -1)
        self.seen += t
        if self.calls == 0:  # the prefill attends over exactly the states it computed (plain SDPA, see attend)
            self._hand_over(key_states)
            return key_states, value_states
        keys = self.keys if self.keys.dtype == self.dtype else self.keys.to(self.dtype)
        self._hand_over(keys)
        return keys, (self.values if self.values.dtype == self.dtype else self.values.to(self.dtype))

    # -- attention, scoring, eviction -----------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor | None:
        """Attention output of a decoding step; None at the prefill, whose attention is plain SDPA over the
        prompt's exact states (nothing is evicted before it), so that only the scores are computed here."""
        self._begin_attend()
        prefill = self.calls == 0
        out, received = self.attention(query, mask, scaling, outputs=not prefill)
        self.calls += 1
        self.scores = self.policy.score(self.scores, received, self.positions, prefill)
        if prefill or self.policy.evicts_while_decoding:
            self._evict()
        return out

    def _all_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(keys, values, positions) of the low tier then the kept tokens, and the low tier's length."""
        k, v, p = self.keys.float(), self.values.float(), self.positions
        if self.low_keys is not None and self.low_keys.tokens:
            k = torch.cat([self.low_keys.decode(torch.float32), k], -2)
            v = torch.cat([self.low_values.decode(torch.float32), v], -2)
            p = torch.cat([self.low_positions, p], -1)
        return k, v, p, p.shape[-1] - self.positions.shape[-1]

    def attention(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                  outputs: bool = True) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Attention output [B, Hq, q, d] (None without `outputs`) and the attention each kept token received,
        per KV head."""
        k, v, pos, n_low = self._all_tokens()
        b, hq, ql, _ = query.shape
        h = k.shape[1]
        if hq % h:
            raise ValueError(f"layer {self.layer_idx}: {hq} query heads for {h} KV heads")
        rep = hq // h
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        pos_q = pos.repeat_interleave(rep, 1).long()  # [B, Hq, T]
        q = query.float()
        out = torch.empty(b, hq, ql, v.shape[-1], dtype=torch.float32, device=q.device) if outputs else None
        got_all = q.new_zeros(b, hq, pos.shape[-1])
        got_obs = q.new_zeros(b, hq, pos.shape[-1])
        got_last = None
        # scoring only (a prefill): the queries the policy reads, not the whole prompt
        needs = self.policy.needs
        begin = 0 if outputs or "all" in needs else ql if not needs else max(ql - self.observe, 0)
        if begin == ql:
            got_last = q.new_zeros(b, hq, pos.shape[-1])
        for start in range(begin, ql, _QUERY_BLOCK):
            stop = min(start + _QUERY_BLOCK, ql)
            s = (q[:, :, start:stop] @ k.transpose(-1, -2)) * scaling
            if mask is not None:
                m = mask[:, :, start:stop]
                allowed = m.expand(b, hq, -1, -1).gather(-1, pos_q[:, :, None, :].expand(-1, -1, stop - start, -1))
                s = s.masked_fill(~allowed, float("-inf")) if allowed.dtype == torch.bool else s + allowed.float()
            else:
                qpos = torch.arange(self.seen - ql + start, self.seen - ql + stop, device=q.device)
                s = s.masked_fill(pos_q[:, :, None, :] > qpos[None, None, :, None], float("-inf"))
            p = torch.softmax(s, -1).nan_to_num(0.0)
            if outputs:
                out[:, :, start:stop] = p @ v
            got_all += p.sum(2)
            first_obs = max(ql - self.observe, start)
            if first_obs < stop:
                got_obs += p[:, :, first_obs - start:].sum(2)
            if stop == ql:
                got_last = p[:, :, -1]
        received = {name: got[..., n_low:].reshape(b, h, rep, -1).mean(2)
                    for name, got in (("all", got_all), ("observed", got_obs), ("last", got_last))}
        if self.policy.per_layer:  # one score per token for the layer: the mean over every KV head (every rank's)
            every = gather_heads(self.shard, torch.stack(list(received.values())), dim=2)
            received = {name: m.mean(1, keepdim=True).expand(b, h, -1) for name, m in zip(received, every)}
        return (out.to(query.dtype) if outputs else None), received

    def budget_tokens(self) -> int:
        """How many tokens stay exact now."""
        if self.tokens:
            keep = self.tokens
        else:
            keep = math.ceil(self.budget * self.seen)
        return max(keep, min(self.seen, self.sinks + self.window))

    def _evict(self) -> None:
        keep = self.budget_tokens()
        held = self.positions.shape[-1]
        if held <= keep:
            return
        protected = (self.positions < self.sinks) | (self.positions >= self.seen - self.window)
        rank = self.policy.rank(self.scores, self.positions, self.seen).masked_fill(protected, float("inf"))
        if self.policy.per_layer:  # the same tokens in every head: rank by the head-mean score
            rank = gather_heads(self.shard, rank).mean(1, keepdim=True).expand_as(rank)
        order = torch.sort(rank, dim=-1, descending=True, stable=True).indices
        kept = order[..., :keep].sort(-1).values
        gone = order[..., keep:].sort(-1).values
        if self.low_keys is not None:
            idx = gone[..., None].expand(-1, -1, -1, self.keys.shape[-1])
            self.low_keys.append(self.keys.gather(2, idx))
            self.low_values.append(self.values.gather(2, idx))
            self.low_positions = torch.cat([self.low_positions, self.positions.gather(2, gone)], -1)
        idx = kept[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys, self.values = self.keys.gather(2, idx), self.values.gather(2, idx)
        self.positions, self.scores = self.positions.gather(2, kept), self.scores.gather(2, kept)

    # -- transformers layer API -----------------------------------------------------------------------------------
    def held(self) -> int:
        if not self.is_initialized:
            return 0
        return self.positions.shape[-1] + self.low_positions.shape[-1]

    # -- reporting ------------------------------------------------------------------------------------------------
    def parts(self) -> dict[str, list[torch.Tensor]]:
        out = add_store_parts({"codes": [], "scales": [], "means": [], "window": [], "sinks": [], "positions": []},
                              self.low_keys, self.low_values)
        if self.is_initialized:
            out["window"].extend([self.keys, self.values])  # kept exact tokens
            out["positions"].extend([self.positions, self.low_positions, self.scores])
        return out

    def describe(self) -> dict[str, Any]:
        low = f", evicted at {self.low_spec.bits} bits" if self.low_spec else ""
        budget = f"{self.tokens} tokens" if self.tokens else f"{self.budget:.0%} of tokens"
        return {"bits": f"{self.policy.name}: {budget}{low}", "sinks": self.sinks, "window": self.window,
                "kept": 0 if self.positions is None else self.positions.shape[-1],
                "low": 0 if self.low_positions is None else self.low_positions.shape[-1]}
