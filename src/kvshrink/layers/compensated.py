"""`CompensatedLayer`: sinks and a recent window kept exact, everything older folded into one compensation token
per head (RazorAttention's non-retrieval heads): the mean of the evicted keys and the mean of the evicted values,
with their count. Attention treats it as that many tokens with the same key and value: its logit gets log(count)
added, so it weighs what the evicted tokens would have weighed had their keys all been their mean.

The means are running float32 sums divided once per read, so a token evicted at step 10 000 still moves them; the
means (part `means`) and the counts (part `positions`) are counted in the bytes.
"""
from __future__ import annotations

from typing import Any

import torch

from ..codecs.exact import ExactCodec
from ..policies.scoring import get_policy
from .composed import ComposedLayer


class CompensatedLayer(ComposedLayer):
    """`sinks` first tokens and the `window` latest exact; the others' mean key and value, with their count."""

    def __init__(self, *, window: int, sinks: int, exact_dtype: torch.dtype | None = None, layer_idx: int = -1):
        if window + sinks < 1:
            raise ValueError(f"layer {layer_idx}: a compensated layer keeps sinks + window tokens, and both are 0")
        exact = ExactCodec("model" if exact_dtype is None else str(exact_dtype).removeprefix("torch."))
        super().__init__(exact, exact, window=window, sinks=sinks, policy=get_policy("streamingllm"),
                         tokens=sinks + window, exact_dtype=exact_dtype, layer_idx=layer_idx)
        self.kind = "a compensated"

    def _clear(self) -> None:
        super()._clear()
        self.comp_keys = self.comp_values = self.comp_count = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self.comp_keys = key_states.new_zeros((b, h, 1, d), dtype=torch.float32)  # sums until read
        self.comp_values = value_states.new_zeros((b, h, 1, value_states.shape[-1]), dtype=torch.float32)
        self.comp_count = torch.zeros((b, h, 1), dtype=torch.int32, device=key_states.device)

    def _evict(self, keep: int | None = None) -> None:
        """Fold the window tokens that leave it into the sums, then drop them (nothing is ever stored: the budget
        is exactly the sinks and the window)."""
        leaving = max(self.keys.shape[-2] - self.window, 0)
        if leaving:
            self.comp_keys += self.keys[:, :, :leaving].float().sum(-2, keepdim=True)
            self.comp_values += self.values[:, :, :leaving].float().sum(-2, keepdim=True)
            self.comp_count += leaving
        super()._evict(keep)

    def evicted(self) -> int:
        """Tokens folded into the compensation token (the same in every row and head)."""
        return 0 if self.comp_count is None else int(self.comp_count.max())

    def _held_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        k, v, p, n_low = super()._held_tokens()
        if not self.evicted():
            return k, v, p, n_low
        c = self.comp_count[..., None].float()
        first = torch.zeros_like(p[..., :1])  # the sinks' position: every query may see it
        return (torch.cat([self.comp_keys / c, k], -2), torch.cat([self.comp_values / c, v], -2),
                torch.cat([first, p], -1), n_low + 1)

    def _logit_bias(self) -> torch.Tensor | None:
        if not self.evicted():
            return None
        b, h, n = self.held_positions().shape
        bias = torch.zeros((b, h, n + 1), dtype=torch.float32, device=self.comp_count.device)
        bias[..., :1] = self.comp_count.float().log()
        return bias

    def parts(self) -> dict[str, list[torch.Tensor]]:
        out = super().parts()
        if self.is_initialized:
            out["means"].extend([self.comp_keys, self.comp_values])
            out["positions"].append(self.comp_count)
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "bits": "sinks + window + 1 compensation token", "compensated": self.evicted()}

    _batch_tensors = ComposedLayer._batch_tensors + ("comp_keys", "comp_values", "comp_count")
