"""kvshrink's attention function, registered with transformers' attention interface under the name "kvshrink".

Cache layers that attend over their own compressed storage (`LatentLayer`: scores in the low-rank latent space)
announce themselves in `update()`; the attention call of the same layer that follows is then answered by the
layer (or, when its `attend` returns None, only observed by it and answered by SDPA: an evicting layer's prefill). Every other layer (the `full` cache, quantized layers, sliding-window layers) gets transformers' own SDPA
attention unchanged, so a model switched to "kvshrink" computes exactly what it computed with "sdpa".
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "kvshrink"
_state = threading.local()


def announce(layer: Any, returned_keys: torch.Tensor) -> None:
    """Called by a layer's `update()`: the attention call that receives `returned_keys` is the layer's to answer."""
    pending = getattr(_state, "pending", None)
    if pending is None:
        pending = _state.pending = {}
    pending[layer.layer_idx] = (layer, returned_keys)


def claim(layer_idx: int, keys: torch.Tensor) -> Any | None:
    """The layer whose `update()` returned exactly `keys` (an announcement left by an abandoned step never matches)."""
    pending = getattr(_state, "pending", None)
    entry = None if pending is None else pending.pop(layer_idx, None)
    return entry[0] if entry is not None and entry[1] is keys else None


class SelfAttending:
    """Bookkeeping of a cache layer that attends over its own storage: every `update` must be followed by the
    attention call that the layer answers, or the model is not running kvshrink's attention."""

    layer_idx: int = -1
    kind: str = "this"
    _awaiting: bool = False

    def _begin_update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Refuse an update whose predecessor was never attended, check the shape, initialise on first use."""
        if self._awaiting:
            self._awaiting = False
            raise RuntimeError(
                f"layer {self.layer_idx}: the last update was not followed by kvshrink's attention; {self.kind} "
                f"cache needs the model to run with attn_implementation='{NAME}' (make_cache(model, ...) switches it)")
        if key_states.dim() != 4:
            raise ValueError(f"layer {self.layer_idx}: key_states must be [batch, heads, tokens, head_dim], "
                             f"got {tuple(key_states.shape)}")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)

    def _hand_over(self, keys: torch.Tensor) -> None:
        """The attention call that receives `keys` (what `update` returns) is this layer's to answer."""
        self._awaiting = True
        announce(self, keys)

    def _begin_attend(self) -> None:
        if not self._awaiting:
            raise RuntimeError(f"layer {self.layer_idx}: attend() without a preceding update()")
        self._awaiting = False


@contextlib.contextmanager
def observing(observer: Callable[[int, torch.Tensor, torch.Tensor | None, float | None], None]) -> Iterator[None]:
    """Within the block, every kvshrink attention call first hands (layer index, query, mask, scaling) to
    `observer` (how the evaluation records a prefill once for every method)."""
    previous = getattr(_state, "observer", None)
    _state.observer = observer
    try:
        yield
    finally:
        _state.observer = previous


def kvshrink_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    layer_idx = getattr(module, "layer_idx", -1)
    observer = getattr(_state, "observer", None)
    if observer is not None:
        observer(layer_idx, query, attention_mask, scaling)
    layer = claim(layer_idx, key)
    out = None
    if layer is not None:
        if kwargs.get("softcap") is not None:
            raise ValueError(f"layer {layer.layer_idx}: attention logit soft-capping is not supported by kvshrink's "
                             "self-attending layers")
        out = layer.attend(query, attention_mask, query.shape[-1] ** -0.5 if scaling is None else scaling)
    if out is None:  # no layer answers, or it only scored this step (a prefill): plain SDPA over what update gave
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make "kvshrink" a valid `attn_implementation` (idempotent)."""
    AttentionInterface.register(NAME, kvshrink_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def enable(model: Any) -> None:
    """Switch `model` to kvshrink attention (SDPA for every layer that does not attend by itself)."""
    register()
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError("latent attention needs the model itself (not only its config): make_cache(model, ...)")
    if getattr(config, "_attn_implementation", None) != NAME:
        model.set_attn_implementation(NAME)
