"""CompressedCache: a transformers `Cache` made of per-layer layers that report the bytes they hold.

The layers live in `kvshrink.layers` (the generic `composed` layer, `full`, `latent`, `residual`, on `base`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .codecs.base import PARTS
from .cachefile import save_cache
from .layers.base import _nbytes, _Reporting
from .layers.rows import RowSplit, left_padding


class CompressedCache(Cache):
    """A transformers `Cache` whose layers report the bytes they really hold."""

    def __init__(self, layers: list[CacheLayerMixin], method: str = "custom", options: dict | None = None,
                 spec: str | None = None):
        for i, layer in enumerate(layers):
            if not isinstance(layer, _Reporting):
                raise TypeError(f"layer {i}: {type(layer).__name__} does not report its bytes (not a kvshrink layer)")
        super().__init__(layers=layers)
        self.method = method
        self.options = dict(options or {})
        self.spec = spec or method  # the canonical spec string that rebuilds this cache (`make_cache(model, spec)`)
        self.fingerprint: dict[str, Any] | None = None  # of the model it was made for (set by make_cache)
        self.shard = None  # this rank's KV heads under tensor parallelism (set by make_cache), None otherwise
        self._padding_noted = False

    def note_attention_mask(self, mask: torch.Tensor) -> None:
        """Learn each row's left padding from the model's 2D attention mask, before the prefill: every layer that
        `splits_rows` then keeps one layer per row, from the row's first real token (`layers.rows`)."""
        if self._padding_noted:
            return
        self._padding_noted = True
        pads = left_padding(mask)
        if pads is None:
            return
        for i, layer in enumerate(self.layers):
            if getattr(layer, "splits_rows", False) and layer.sliding_window is None and not layer.is_initialized:
                self.layers[i] = RowSplit(layer, pads)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """A layer whose rows may keep different counts (`splits_batch`: per-head allocation) takes its first
        batch of several rows as one layer per row (`RowSplit`, nothing padded); then the layer's own update."""
        layer = self.layers[layer_idx]
        if getattr(layer, "splits_batch", False) and not layer.is_initialized and key_states.shape[0] > 1:
            self.layers[layer_idx] = RowSplit(layer, [0] * key_states.shape[0])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def save(self, path) -> Path:
        """Write this cache to a safetensors file (atomically); `kvshrink.load_cache(path, model)` resumes it."""
        return save_cache(self, path)

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds."""
        return sum(layer.nbytes() for layer in self.layers)

    def memory_report(self, across_ranks: bool = False) -> dict[str, Any]:
        """Real bytes held, by layer and by part, against the same tokens in a 16-bit `DynamicCache`.

        Under tensor parallelism the bytes are this rank's (its KV heads; `tensor_parallel` says which), unless
        `across_ranks`: then every byte count is summed over the ranks of the TP group (a collective: every rank
        must call it), so the report covers all heads. Parts each rank keeps a copy of (TaDA's head mean, DynaKV's
        joint coefficients, KV-Direct's residuals) are counted once per rank: that is what the ranks hold.
        """
        report = self._memory_report()
        shard = self.shard
        report["tensor_parallel"] = None if shard is None else {**shard.describe(),
                                                                "scope": "all ranks" if across_ranks else "rank"}
        if shard is None or not across_ranks:
            return report
        rows = report["by_layer"]
        keys = list(report["by_part"])
        counts = [report["nbytes"], report["fp16_nbytes"], *report["by_part"].values()]
        for row in rows:  # every rank has the same layers with the same parts
            counts += [row["nbytes"], row["fp16_nbytes"], *row["parts"].values()]
        total = iter(shard.sum_counts(counts))
        report["nbytes"], report["fp16_nbytes"] = next(total), next(total)
        report["by_part"] = {k: next(total) for k in keys}
        for row in rows:
            row["nbytes"], row["fp16_nbytes"] = next(total), next(total)
            row["parts"] = {k: next(total) for k in row["parts"]}
            row["ratio"] = row["nbytes"] / row["fp16_nbytes"] if row["fp16_nbytes"] else None
        report["ratio"] = report["nbytes"] / report["fp16_nbytes"] if report["fp16_nbytes"] else None
        return report

    def _memory_report(self) -> dict[str, Any]:
        by_part = dict.fromkeys(PARTS, 0)
        by_layer = []
        for i, layer in enumerate(self.layers):
            parts = {p: _nbytes(ts) for p, ts in layer.parts().items()}
            for p, n in parts.items():
                by_part[p] = by_part.get(p, 0) + n
            nb = sum(parts.values())
            tokens = layer.get_seq_length()
            ref_tokens = tokens if layer.sliding_window is None else min(tokens, layer.sliding_window - 1)
            shape = layer.shape()
            fp16 = 0 if shape is None else 2 * 2 * shape[0] * shape[1] * shape[2] * ref_tokens
            by_layer.append({
                "layer": i,
                "sliding_window": layer.sliding_window,
                "tokens": tokens,
                "nbytes": nb,
                "fp16_nbytes": fp16,
                "ratio": nb / fp16 if fp16 else None,
                "parts": parts,
                **layer.describe(),
            })
        nbytes = sum(r["nbytes"] for r in by_layer)
        fp16 = sum(r["fp16_nbytes"] for r in by_layer)
        shape = next((layer.shape() for layer in self.layers if layer.shape() is not None), None)
        return {
            "method": self.method,
            "options": self.options,
            "tokens": self.get_seq_length(),
            "batch": shape[0] if shape else 0,
            "nbytes": nbytes,
            "fp16_nbytes": fp16,
            "ratio": nbytes / fp16 if fp16 else None,
            "by_part": by_part,
            "by_layer": by_layer,
        }


def install_padding_hook(model: Any) -> None:
    """A forward pre-hook on `model` that hands the 2D attention mask of each call to the kvshrink cache it is
    called with (`CompressedCache.note_attention_mask`), once per model."""
    if getattr(model, "_kvshrink_padding_hook", False) or not hasattr(model, "register_forward_pre_hook"):
        return

    def hook(module, args, kwargs):
        cache, mask = kwargs.get("past_key_values"), kwargs.get("attention_mask")
        if isinstance(cache, CompressedCache) and isinstance(mask, torch.Tensor):
            cache.note_attention_mask(mask)
        return None

    model.register_forward_pre_hook(hook, with_kwargs=True)
    model._kvshrink_padding_hook = True
