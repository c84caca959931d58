"""`RowSplit`: a layer of a left-padded batch kept as one layer per row, each holding only its row's real tokens, so
that a row's answer does not depend on what else is in the batch.

Left padding puts each row's first real token at a different position. A layer that groups tokens (a per-channel
quantization group, a flushed block, a level assignment), takes the first tokens as sinks, or counts tokens for a
budget would otherwise mix pad positions into its groups, sinks, scores and budgets. `CompressedCache` learns each
row's padding from the model's 2D attention mask (a forward pre-hook installed by `make_cache`) before the prefill
and wraps every layer that `splits_rows` in a `RowSplit`: row b's layer gets the row's tokens from its first real
one, and sees exactly what a run of that row alone would.

For attention the rows' keys and values are put back in position order, each row's padded front filled with zeros
(the model's mask hides those positions); a layer that answers its attention itself (a kernel, rotated codes, a token
policy) answers row by row, with the row's part of the mask. Only left padding (pads first, then every token real) is
split; other masks leave the layer as it is.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from .. import attention
from ..compat import query_length as _query_length
from .base import _BatchOps, _Reporting


class RowSplit(_BatchOps, CacheLayerMixin, _Reporting):
    """One `template`-like layer per batch row; `pads[b]` leading positions of row b are padding."""

    is_compileable = False
    is_croppable = False
    replays_prefill = False  # a replayed prefill is one row, never split

    def __init__(self, template: Any, pads: list[int]):
        super().__init__()
        self.template = template
        self.layer_idx = template.layer_idx
        self.sliding_window = template.sliding_window
        self.is_sliding = getattr(template, "is_sliding", False)
        self.shard = template.shard
        self.kind = template.kind
        self.pads = list(pads)
        self.rows = [self._copy(template) for _ in pads]
        self.seen = 0
        self._awaiting = False
        self.is_initialized = False

    @staticmethod
    def _copy(layer: Any) -> Any:
        """A copy of a layer that shares what is not its own state (a tensor-parallel shard, a prefix runner)."""
        memo = {id(x): x for x in (getattr(layer, "shard", None), getattr(layer, "runner", None)) if x is not None}
        return copy.deepcopy(layer, memo)

    # -- transformers layer API -----------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        b = key_states.shape[0]
        if b != len(self.rows):
            raise ValueError(f"layer {self.layer_idx}: {b} rows given, the padding named {len(self.rows)}")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        first = self.seen == 0
        t = key_states.shape[-2]
        outs = []
        for i, row in enumerate(self.rows):
            start = self.pads[i] if first else 0
            outs.append(row.update(key_states[i:i + 1, :, start:], value_states[i:i + 1, :, start:], *args, **kwargs))
        self.seen += t
        # a row that answers its attention call itself announced it: the call is this layer's, answered row by row
        waiting = [getattr(row, "_awaiting", False) for row in self.rows]
        for row in self.rows:
            attention.withdraw(row)
        keys = self._join([o[0] for o in outs])
        values = self._join([o[1] for o in outs])
        if any(waiting):
            if not all(waiting):
                raise RuntimeError(f"layer {self.layer_idx}: rows disagree on who answers the attention call")
            self._awaiting = True
            attention.announce(self, keys)
        return keys, values

    def _join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Rows' tensors [1, H, L_b, D] as [B, H, L, D], each row's front filled with zeros so that its last token
        lines up with the others' (its positions, as the model's mask indexes them)."""
        length = max(p.shape[-2] for p in parts)
        out = parts[0].new_zeros(len(parts), parts[0].shape[1], length, parts[0].shape[-1])
        for i, p in enumerate(parts):
            if p.shape[-2]:
                out[i, :, length - p.shape[-2]:] = p[0]
        return out

    def attend(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor | None:
        """Each row's answer over its own tokens (its part of the mask: positions from its first real token)."""
        if not self._awaiting:
            raise RuntimeError(f"layer {self.layer_idx}: attend() without a preceding update()")
        self._awaiting = False
        outs = []
        for i, row in enumerate(self.rows):
            m = None if mask is None else mask[i:i + 1, ..., self.pads[i]:]
            outs.append(row.attend(query[i:i + 1], m, scaling))
        if all(o is None for o in outs):
            return None  # the rows only scored (a prefill): SDPA over the joined exact states
        if any(o is None for o in outs):
            raise RuntimeError(f"layer {self.layer_idx}: some rows answered the attention call and some did not")
        return torch.cat(outs, 0)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        query_length = _query_length(query_length)
        # rows see themselves from their first real token (the prefill's pads never reach them); the joined tensors
        # cover every position
        first = self.seen == 0
        sizes = [row.get_mask_sizes(query_length - pad if first else query_length)[0] + pad
                 for row, pad in zip(self.rows, self.pads)]
        return max(sizes), 0

    def get_max_length(self) -> int:
        return self.rows[0].get_max_length()

    def get_max_cache_shape(self) -> int:
        """`get_max_length` under its transformers 5.0 - 5.2 name."""
        return self.get_max_length()

    def reset(self) -> None:
        self.rows = [self._copy(self.template) for _ in self.rows]
        self.seen = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        for row in self.rows:
            row.crop(tokens_to_remove)
        self.seen -= -tokens_to_remove if tokens_to_remove < 0 else 0

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Beam reordering and batch selection move whole rows (a row taken twice is copied)."""
        picked = fn(torch.arange(len(self.rows))).tolist()
        taken: set[int] = set()
        rows, pads = [], []
        for i in picked:
            rows.append(self.rows[i] if i not in taken else self._copy(self.rows[i]))
            pads.append(self.pads[i])
            taken.add(i)
        self.rows, self.pads = rows, pads

    # -- reporting and saving -------------------------------------------------------------------------------------
    def parts(self) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {}
        for row in self.rows:
            for part, ts in row.parts().items():
                out.setdefault(part, []).extend(ts)
        return out

    def shape(self) -> tuple[int, int, int] | None:
        first = self.rows[0].shape()
        return None if first is None else (len(self.rows), first[1], first[2])

    def describe(self) -> dict[str, Any]:
        return {**self.rows[0].describe(), "padding": list(self.pads)}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        counts: dict[str, Any] = {"pads": self.pads, "seen": self.seen, "rows": []}
        for i, row in enumerate(self.rows):
            own, c = row.state_dict()
            tensors.update({f"row.{i}.{k}": t for k, t in own.items()})
            counts["rows"].append(c)
        return tensors, counts

    def load_state_dict(self, tensors: dict[str, torch.Tensor], counts: dict[str, Any]) -> None:
        self.pads, self.seen = list(counts["pads"]), counts["seen"]
        self.rows = [self._copy(self.template) for _ in self.pads]
        for i, (row, c) in enumerate(zip(self.rows, counts["rows"])):
            prefix = f"row.{i}."
            row.load_state_dict({k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}, c)
        self.is_initialized = any(c.get("initialized") for c in counts["rows"])


def left_padding(mask: torch.Tensor) -> list[int] | None:
    """Each row's count of leading pad positions of a 2D attention mask [B, T] (1 = real), or None when a row is not
    padding-then-tokens (right padding, holes) or no row is padded."""
    if mask.dim() != 2:
        return None
    m = mask.bool()
    pads = (~m).int().cumprod(-1).sum(-1)  # leading zeros
    real = m.sum(-1)
    if not torch.equal(pads + real, torch.full_like(pads, m.shape[-1])) or int(pads.max()) == 0:
        return None
    return pads.tolist()
