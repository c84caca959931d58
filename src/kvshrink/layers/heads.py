"""`HeadSplit`: a layer kept as one single-KV-head layer per KV head, so that each head holds its own number of
tokens (and bytes are only what each holds): AdaKV's adaptive budgets, RazorAttention's retrieval heads.

Head h's layer gets the keys and values of head h ([B, 1, T, D]) and answers the attention of the query heads that
share it (query heads h*rep .. (h+1)*rep - 1, as transformers' grouped-query attention repeats KV heads); the
answers are concatenated. A head layer that attends by itself (a scored `ComposedLayer`) answers its slice; a plain
head layer (every token kept, by a codec, no sliding window) is attended here over what its `update` returned.
The prefill is plain SDPA over the exact states (every head layer only scores then), so a prefill may be replayed.

With a shared allocation (`floor` given: AdaKV) the head layers score at the prefill without evicting; the layer's
budget (the heads' uniform budgets summed) is then split by `policies.allocation.head_budgets` over their ranked
candidates, and each head keeps its count. Masks are indexed by position (every head holds positions, or all of
them). Rows of a batch can hold different counts, so an allocated layer takes one row per call: a batch is split
into rows first (`RowSplit`, which `CompressedCache` puts in front when the attention mask shows more than one row).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from .. import attention
from ..attention import SelfAttending
from ..policies.allocation import head_budgets
from .base import _BatchOps, _Reporting


class HeadSplit(SelfAttending, _BatchOps, CacheLayerMixin, _Reporting):
    """One layer per KV head (`heads[h]` holds head h). floor: None, each head keeps its own budget; a share in
    [0, 1], the heads' budgets are allocated together at the prefill, each head keeping at least that share of
    its uniform budget (AdaKV's alpha)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    replays_prefill = True  # the prefill is SDPA over the exact states given; the heads only score
    splits_rows = True  # a left-padded batch keeps one HeadSplit per row (layers/rows.py)

    def __init__(self, heads: list[Any], *, floor: float | None = None, layer_idx: int = -1,
                 label: str = ""):
        super().__init__()
        where = f"layer {layer_idx}"
        if not heads:
            raise ValueError(f"{where}: a head split needs at least one head layer")
        for i, head in enumerate(heads):
            if getattr(head, "sliding_window", None) is not None or getattr(head, "shard", None) is not None:
                raise ValueError(f"{where}: head {i}: per-head layers support neither sliding windows nor tensor "
                                 "parallelism")
        if floor is not None:
            if not 0 <= floor <= 1:
                raise ValueError(f"{where}: floor must be a share in [0, 1], got {floor}")
            for i, head in enumerate(heads):
                policy = getattr(head, "policy", None)
                if policy is None or policy.evicts_while_decoding:
                    raise ValueError(f"{where}: head {i}: an allocated budget needs a token policy that compresses "
                                     "the prompt only")
                head.defer_eviction = True
        self.heads, self.floor, self.layer_idx, self.label = list(heads), floor, layer_idx, label
        self.kind = heads[0].kind
        self.splits_batch = floor is not None  # rows may keep different counts: one row per call
        self.seen = 0
        self.calls = 0
        self._plain: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.is_initialized = False

    # -- transformers layer API -----------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._begin_update(key_states, value_states)
        b, h, t, _ = key_states.shape
        if h != len(self.heads):
            raise ValueError(f"layer {self.layer_idx}: {h} KV heads given, the layer holds {len(self.heads)}")
        if self.floor is not None and b > 1 and self.calls == 0:
            raise ValueError(f"layer {self.layer_idx}: adaptive head budgets allocate each row's budget on its own: "
                             f"give the prefill one row at a time, or a 2D attention_mask so that the cache splits "
                             f"the {b} rows (generate() passes one)")
        self._plain = {}
        for i, head in enumerate(self.heads):
            out = head.update(key_states[:, i:i + 1], value_states[:, i:i + 1], *args, **kwargs)
            if getattr(head, "_awaiting", False):
                attention.withdraw(head)  # this layer answers the call, head by head
            else:
                self._plain[i] = out
        if not any(getattr(head, "probing", False) for head in self.heads):
            self.seen += t  # a scoring pass's tokens (KVzip's reconstruction) are attended, never held
        self._hand_over(key_states)  # the prefill's SDPA reads it; later calls are answered here
        return key_states, value_states

    def attend(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor | None:
        """Each head's answer for its query heads, concatenated; None at the prefill (SDPA over the exact states),
        after which an allocated layer sets each head's count."""
        self._begin_attend()
        b, hq, ql, _ = query.shape
        n = len(self.heads)
        if hq % n:
            raise ValueError(f"layer {self.layer_idx}: {hq} query heads for {n} KV heads")
        rep = hq // n
        first = self.calls == 0
        self.calls += 1
        outs: list[torch.Tensor | None] = []
        for i, head in enumerate(self.heads):
            q = query[:, i * rep:(i + 1) * rep]
            if i in self._plain:
                outs.append(None if first else self._attend_plain(q, *self._plain[i], mask, scaling))
            else:
                outs.append(head.attend(q, mask, scaling))
        self._plain = {}
        if first:
            if any(o is not None for o in outs):
                raise RuntimeError(f"layer {self.layer_idx}: a head layer answered the prefill's attention")
            if self.floor is not None:
                self._allocate()
            return None
        return torch.cat([o.to(query.dtype) for o in outs], 1)

    @staticmethod
    def _attend_plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scaling: float) -> torch.Tensor:
        """Attention of `q` [B, rep, Q, D] over a plain head's every token [B, 1, T, D] (mask by position)."""
        s = (q.float() @ k.float().transpose(-1, -2)) * scaling
        n, ql = s.shape[-1], s.shape[-2]
        if mask is not None:
            m = mask[..., -n:]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
        elif ql > 1:
            causal = torch.arange(n, device=q.device)[None, :] > (n - ql + torch.arange(ql, device=q.device))[:, None]
            s = s.masked_fill(causal, float("-inf"))
        return torch.softmax(s, -1).nan_to_num(0.0) @ v.float()

    def _allocate(self) -> None:
        """Split the heads' summed budget by one ranking over all their candidates; each head keeps its count."""
        ranked = [head.ranked_candidates() for head in self.heads]
        rooms = [max(min(head.budget_tokens() - fixed, rank.shape[-1]), 0)
                 for head, (rank, fixed) in zip(self.heads, ranked)]
        floor = int(self.floor * min(rooms))
        counts = head_budgets([rank[0, 0] for rank, _ in ranked], sum(rooms), floor)
        for head, (_, fixed), count in zip(self.heads, ranked, counts):
            head._evict(fixed + count)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0  # masks by position: each head gathers what it holds

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        for head in self.heads:
            head.reset()
        self.seen = self.calls = 0
        self._plain = {}
        self._awaiting = False
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(f"layer {self.layer_idx}: a per-head cache cannot be cropped")

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for head in self.heads:
            head._map_batch(fn)

    # -- reporting and saving -------------------------------------------------------------------------------------
    def held_per_head(self) -> list[int]:
        """Tokens each head holds (sinks, stored, window; a compensation token not counted)."""
        return [head.held() if hasattr(head, "held") else head.get_seq_length() for head in self.heads]

    def parts(self) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {}
        for head in self.heads:
            for part, ts in head.parts().items():
                out.setdefault(part, []).extend(ts)
        return out

    def shape(self) -> tuple[int, int, int] | None:
        first = self.heads[0].shape()
        return None if first is None else (first[0], len(self.heads), first[2])

    def describe(self) -> dict[str, Any]:
        out = dict(self.heads[0].describe())
        if self.label:
            out["bits"] = self.label
        out["held_per_head"] = self.held_per_head()
        out.pop("kept", None)
        return out

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        counts: dict[str, Any] = {"seen": self.seen, "calls": self.calls, "heads": []}
        for i, head in enumerate(self.heads):
            own, c = head.state_dict()
            tensors.update({f"head.{i}.{k}": t for k, t in own.items()})
            counts["heads"].append(c)
        return tensors, counts

    def load_state_dict(self, tensors: dict[str, torch.Tensor], counts: dict[str, Any]) -> None:
        if len(counts["heads"]) != len(self.heads):
            raise ValueError(f"layer {self.layer_idx}: {len(counts['heads'])} heads saved, the layer has "
                             f"{len(self.heads)}")
        self.reset()
        for i, (head, c) in enumerate(zip(self.heads, counts["heads"])):
            prefix = f"head.{i}."
            head.load_state_dict({k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}, c)
        self.seen, self.calls = counts["seen"], counts["calls"]
        self.is_initialized = any(c.get("initialized") for c in counts["heads"])
        if self.is_initialized:
            self.dtype = self.heads[0].dtype
