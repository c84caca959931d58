"""Prefill once, give every method its cache from it.

Every replayable cache layer attends over the exact keys and values of the prompt during the prefill (SDPA, as the
plain cache does) and only then stores them its own way; so the prefill's computation, its hidden states and its
last logits are the same for every such method. `record_prefill` runs the prompt once through a plain cache and
keeps, per layer, what the cache received (keys, values, cache kwargs) and what the attention call received (the
queries, the mask, the scaling: what eviction and significance policies score with). `replay` then feeds a fresh
cache of any method exactly those calls in the model's order: `cache.update(k, v, layer, kwargs)`, then the
layer's own `attend` when the layer claims the attention call. The result is the cache that running the prefill
through that method would have built, at the cost of its stores and scores instead of a forward pass.

A cache is replayable when each of its layers says so (`replays_prefill = True`: the layer's prefill attention is
plain SDPA over the states it was given) or is one of transformers' own dynamic or quantized layers. Others
(latent layers, which attend over their own reconstruction; KV-Direct's residual layers, which need the residual
stream) run their own prefill. KVzip's layers (`replay_needs_model`) replay too when the model is given: after the
replay `replay` runs their reconstruction pass, as the model's forward hook does after a prefill, so a KVzip cell
shares the prompt's prefill with the others and pays only for its pass; the record keeps the pass's scores, so a
second KVzip cache of the prompt with the same pass (another budget, byte cap or codec) pays for neither.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, QuantizedLayer

from .. import attention
from ..models import last_logits_only
from ..policies import kvzip


@dataclass
class PrefillRecord:
    """What one prefill gave each layer's cache and attention call, and the logits of its last position."""

    ids: torch.Tensor  # [1, N]
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[tuple[tuple, dict[str, Any]]] = field(default_factory=list)
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    masks: dict[int, torch.Tensor | None] = field(default_factory=dict)
    scalings: dict[int, float] = field(default_factory=dict)
    logits: torch.Tensor | None = None  # [1, vocab], the model's dtype
    seconds: float = 0.0
    passes: dict = field(default_factory=dict)  # kvzip's reconstruction passes run on it: their scores, by pass

    def nbytes(self) -> int:
        ts = [*self.keys, *self.values, *self.queries.values(), *(m for m in self.masks.values() if m is not None),
              *(t for p in self.passes.values() for t in p["scores"])]
        return sum(t.numel() * t.element_size() for t in ts)


class _RecordingCache(DynamicCache):
    """A plain `DynamicCache` that also keeps what each layer's update received (sliding layers trim their own
    storage, the record keeps every token)."""

    def __init__(self, config, record: PrefillRecord):
        super().__init__(config=config)
        self._record = record

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        r = self._record
        if layer_idx != len(r.keys):
            raise RuntimeError(f"prefill recording: layer {layer_idx} updated out of order (expected {len(r.keys)})")
        r.keys.append(key_states)
        r.values.append(value_states)
        r.kwargs.append((args, dict(kwargs)))  # replayed as given, whatever this transformers version passes
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@torch.no_grad()
def record_prefill(model, ids: torch.Tensor) -> PrefillRecord:
    """Run the prompt `ids` [1, N] once through a plain cache and record every layer's cache and attention inputs."""
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"ids must be token ids shaped [1, length >= 1], got {tuple(ids.shape)}")
    attention.enable(model)  # SDPA for every layer, as before, but through kvshrink's function, which we observe
    record = PrefillRecord(ids=ids)

    def observe(layer_idx: int, query: torch.Tensor, mask: torch.Tensor | None, scaling: float | None) -> None:
        record.queries[layer_idx] = query
        record.masks[layer_idx] = mask
        record.scalings[layer_idx] = query.shape[-1] ** -0.5 if scaling is None else scaling

    start = time.perf_counter()
    with attention.observing(observe):
        out = model(ids.to(model.device), past_key_values=_RecordingCache(model.config, record), use_cache=True,
                    **last_logits_only(model))
    record.logits = out.logits[:, -1].detach()
    record.seconds = time.perf_counter() - start
    if len(record.queries) != len(record.keys):
        raise RuntimeError(f"prefill recording saw {len(record.keys)} cache updates but {len(record.queries)} "
                           "attention calls: the model does not run its attention through the attention interface")
    return record


def replayable(cache, tokens: int | None = None, model: Any = None) -> bool:
    """Whether `replay` builds exactly the cache that a prefill of `tokens` tokens through `cache` would.

    A layer whose kernel answers short prompts itself (`replays_prefill_from`: the shortest prompt that goes through
    SDPA over the exact states) replays only prompts at least that long; with `tokens` unknown it does not. A layer
    whose prefill ends with a pass through the model (`replay_needs_model`: KVzip's) replays only with `model`."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    plain = (DynamicLayer, DynamicSlidingWindowLayer, QuantizedLayer)

    def ok(layer) -> bool:
        if getattr(layer, "replay_needs_model", False) and model is None:
            return False
        flag = getattr(layer, "replays_prefill", None)
        if flag is None:
            return isinstance(layer, plain)
        if not flag:
            return False
        least = getattr(layer, "replays_prefill_from", None)
        return least is None or (tokens is not None and tokens >= least)

    return all(ok(layer) for layer in layers)


@torch.no_grad()
def replay(record: PrefillRecord, cache, model: Any = None) -> torch.Tensor:
    """Fill `cache` as the recorded prefill would have; return the prefill's last logits [1, vocab]. `model` (the
    one that made the record): runs what follows a prefill through it, KVzip's reconstruction pass, whose scores
    the record keeps (`record.passes`) for the next cache of the prompt that runs the same pass."""
    if not replayable(cache, record.ids.shape[1], model):
        if model is None and replayable(cache, record.ids.shape[1], model=True):
            raise ValueError(f"{type(cache).__name__}: its prefill ends with a pass through the model (kvzip): "
                             "replay(record, cache, model=...) runs it")
        raise ValueError(f"{type(cache).__name__}: its layers change the prefill's computation; run the prefill "
                         "through it instead")
    if len(cache.layers) != len(record.keys):
        raise ValueError(f"the cache has {len(cache.layers)} layers, the recorded prefill {len(record.keys)}")
    for i, (k, v) in enumerate(zip(record.keys, record.values)):
        args, kwargs = record.kwargs[i]
        keys, _ = cache.update(k, v, i, *args, **kwargs)
        layer = attention.claim(i, keys)
        if layer is not None:  # the layer scores (or stores) by the queries it sees: give it the recorded ones
            layer.attend(record.queries[i], record.masks[i], record.scalings[i])
    if model is not None and any(kvzip.awaits_pass(x) for x in cache.layers):
        kvzip.reconstruct(model, cache, record.ids, memo=record.passes)
    return record.logits
