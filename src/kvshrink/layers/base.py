"""What kvshrink's cache layers share: byte reporting, batch operations, the transformers layer API of a layer that
counts the tokens it was given in `seen`, and `ExactWindow`, the exact sinks and recent window of the layers that
compress tokens as they leave that window (quantized stores, low-rank coefficients).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from ..compat import query_length as _query_length

def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def check_counts(layer_idx: int, **counts: Any) -> None:
    """Raise if any of the named counts (window, sinks...) is not a non-negative integer."""
    for arg, value in counts.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"layer {layer_idx}: {arg} must be a non-negative integer, got {value!r}")


def add_store_parts(out: dict[str, list[torch.Tensor]], *stores) -> dict[str, list[torch.Tensor]]:
    """Add the tensors of each store (None skipped) to `out`, by part."""
    for store in stores:
        if store is not None:
            for part, ts in store.parts().items():
                out[part].extend(ts)
    return out


class _Reporting:
    """What every kvshrink layer tells the memory report."""

    layer_idx: int = -1
    sliding_window: int | None = None
    #: the global KV heads this layer holds under tensor parallelism (`distributed.HeadShard`), None otherwise
    shard = None

    def parts(self) -> dict[str, list[torch.Tensor]]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Method settings of this layer, for the report (bits, axis, window...)."""
        return {}

    def shape(self) -> tuple[int, int, int] | None:
        """(batch, kv_heads, head_dim) once initialised."""
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(_nbytes(ts) for ts in self.parts().values())


class _BatchOps:
    """Beam reordering and batch selection for a layer that maps a function over its batch-first tensors
    (`_map_batch`); offloading is not supported."""

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if torch.is_tensor(indices) else indices])

    def offload(self):
        raise NotImplementedError("kvshrink layers do not support offloading")

    def prefetch(self):
        raise NotImplementedError("kvshrink layers do not support offloading")


class CompressedLayer(_BatchOps, CacheLayerMixin, _Reporting):
    """Base of kvshrink's own layers (all but the `full` ones, which are transformers' layers unchanged).

    A subclass keeps `seen` (tokens ever passed in), `keys`/`values` (its exact tokens, batch-first) and a `_clear()`
    that empties it; it names in `_batch_tensors` / `_batch_stores` what beam search and batch selection map.
    Masks are indexed by position unless the layer says otherwise (`ExactWindow`).
    """

    is_compileable = False
    is_croppable = False
    #: whether eval.prefill may replay a recorded prefill into the layer (its prefill attention is plain SDPA)
    replays_prefill = False
    #: "a(n) <kind>" cache, for messages
    kind = "this"
    _batch_tensors: tuple[str, ...] = ()  # batch-first tensor attributes (None skipped)
    _batch_stores: tuple[str, ...] = ()  # store attributes with a `map_batch` (None skipped)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The model's dtype and device; empty exact keys and values, held in `exact_dtype` where the layer has one."""
        self.dtype, self.device = key_states.dtype, key_states.device
        held = getattr(self, "exact_dtype", None) or self.dtype
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty((b, h, 0, d), dtype=held)
        self.values = value_states.new_empty((b, value_states.shape[1], 0, value_states.shape[-1]), dtype=held)
        self.is_initialized = True

    def _clear(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        self._clear()

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        query_length = _query_length(query_length)
        return self.seen + query_length, 0  # masks are indexed by position; the layer gathers what it holds

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        """`get_max_length` under its transformers 5.0 - 5.2 name."""
        return self.get_max_length()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(f"layer {self.layer_idx}: {self.kind} cache cannot be cropped")

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not self.is_initialized:
            return
        for name in self._batch_tensors:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        for name in self._batch_stores:
            store = getattr(self, name)
            if store is not None:
                store.map_batch(fn)

    def shape(self):
        if not self.is_initialized:
            return None
        return self.keys.shape[0], self.keys.shape[1], self.keys.shape[3]

    # -- declared state: what a saved cache holds ----------------------------------------------------------------
    #: scalar attributes saved beside the tensors (`_batch_tensors`) and stores (`_batch_stores`)
    _state_counts: tuple[str, ...] = ("seen",)
    #: scalar attributes saved only when set (not None): a cache saved before they existed still loads
    _optional_counts: tuple[str, ...] = ()

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors by declared name, counts) of everything the layer holds."""
        counts: dict[str, Any] = {"initialized": bool(self.is_initialized)}
        tensors: dict[str, torch.Tensor] = {}
        if not self.is_initialized:
            return tensors, counts
        counts["dtype"] = str(self.dtype).removeprefix("torch.")
        counts["shape"] = [self.keys.shape[0], self.keys.shape[1], self.keys.shape[3], self.values.shape[3]]
        counts.update({name: getattr(self, name) for name in self._state_counts})
        counts.update({name: getattr(self, name) for name in self._optional_counts if getattr(self, name) is not None})
        for name in self._batch_tensors:
            t = getattr(self, name, None)
            if t is not None:
                tensors[name] = t
        for name in self._batch_stores:
            store = getattr(self, name, None)
            if store is not None:
                own, c = store.state_dict()
                tensors.update({f"{name}.{k}": t for k, t in own.items()})
                counts[name] = c
        return tensors, counts

    def load_state_dict(self, tensors: dict[str, torch.Tensor], counts: dict[str, Any]) -> None:
        """Put back what `state_dict` gave: initialise as a first update of that shape and dtype would, then set
        the tensors, counts and stores."""
        self._clear()
        if not counts.get("initialized"):
            return
        dtype = getattr(torch, counts["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"layer {self.layer_idx}: unknown dtype {counts['dtype']!r}")
        b, h, dk, dv = counts["shape"]
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        self.lazy_initialization(torch.empty(b, h, 0, dk, dtype=dtype, device=device),
                                 torch.empty(b, h, 0, dv, dtype=dtype, device=device))
        for name in self._batch_tensors:
            if name in tensors:
                setattr(self, name, tensors[name])
        for name in self._state_counts:
            setattr(self, name, counts[name])
        for name in self._optional_counts:
            setattr(self, name, counts.get(name))
        for name in self._batch_stores:
            store = getattr(self, name, None)
            if store is not None:
                prefix = f"{name}."
                store.load_state_dict({k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)},
                                      counts[name])


class ExactWindow:
    """Exact attention-sink tokens first, an exact window of recent tokens last, and what the layer stores between.

    Tokens enter the window (`_take`); the first `sinks` go on to the sinks; those that left the window go to the
    layer's store in whole blocks (`_leaving` says how many). Only the window can be cropped. A mixin before
    `CompressedLayer`: the subclass sets `sinks`, `window`, `block` and says how many tokens it stores (`_stored`).
    """

    sinks: int = 0
    window: int = 0
    block: int = 1
    _batch_tensors = ("keys", "values", "sink_keys", "sink_values")
    #: per-token float32 tensors [B, H, T] kept beside the window (started, grown and cut with it)
    _window_extras: tuple[str, ...] = ()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.sink_keys, self.sink_values = self.keys, self.values
        b, h = key_states.shape[:2]
        for name in self._window_extras:
            setattr(self, name, key_states.new_zeros((b, h, 0), dtype=torch.float32))

    def _stored(self) -> int:
        """Tokens held between the sinks and the window."""
        raise NotImplementedError

    def _take(self, key_states: torch.Tensor, value_states: torch.Tensor,
              joined: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Take this step's tokens into the window (the first ones into the sinks). joined: the window and this
        step's tokens already joined (`kernels.cpu.append_finite`), else joined here."""
        t = key_states.shape[-2]
        if joined is None:
            joined = (torch.cat([self.keys, key_states.to(self.keys.dtype)], dim=-2),
                      torch.cat([self.values, value_states.to(self.values.dtype)], dim=-2))
        self.keys, self.values = joined
        b, h = key_states.shape[:2]
        for name in self._window_extras:
            x = getattr(self, name)
            setattr(self, name, torch.cat([x, x.new_zeros(b, h, t)], -1))
        self.seen += t
        missing = self.sinks - self.sink_keys.shape[-2]
        if missing > 0 and self.seen - t < self.sinks:  # not refilled once a sliding window dropped them
            self.sink_keys = torch.cat([self.sink_keys, self.keys[:, :, :missing]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, self.values[:, :, :missing]], dim=-2)
            self._drop_front(missing)

    def _leaving(self) -> int:
        """Tokens beyond the window, in whole blocks: what the layer stores now."""
        excess = self.keys.shape[-2] - self.window
        return (excess // self.block) * self.block if excess > 0 else 0

    def _drop_front(self, n: int) -> None:
        """Forget the window's oldest `n` tokens (stored or dropped by the caller)."""
        self.keys = self.keys[:, :, n:].clone()
        self.values = self.values[:, :, n:].clone()
        for name in self._window_extras:
            setattr(self, name, getattr(self, name)[..., n:].clone())

    def held(self) -> int:
        """Tokens held (sinks, stored and window)."""
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[-2] + self._stored() + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        query_length = _query_length(query_length)
        held = self.held()
        return held + query_length, self.seen - held

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens; only tokens still in the exact window can go."""
        if tokens_to_remove > 0:
            raise ValueError(f"layer {self.layer_idx}: crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        if n > self.keys.shape[-2]:
            raise ValueError(
                f"layer {self.layer_idx}: cannot crop {n} tokens: only the {self.keys.shape[-2]} tokens of the "
                "full-precision window can be removed, older ones are already compressed"
            )
        self.keys = self.keys[:, :, :-n].clone()
        self.values = self.values[:, :, :-n].clone()
        for name in self._window_extras:
            setattr(self, name, getattr(self, name)[..., :-n].clone())
        self.seen -= n

    def _exact_parts(self, out: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        """Add the window (with its extras) and the sinks to `out`, once initialised."""
        if self.is_initialized:
            out["window"].extend([self.keys, self.values, *(getattr(self, n) for n in self._window_extras)])
            out["sinks"].extend([self.sink_keys, self.sink_values])
        return out
