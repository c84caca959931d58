"""kvshrink's attention function, registered with transformers' attention interface under the name "kvshrink".

Cache layers that attend over their own compressed storage (codes read by a kernel, rotated codes, scored
eviction, low-rank coefficients) announce themselves in `update()`; the attention call that then receives the
tensor that `update()` returned is answered by the layer (or, when its `attend` returns None, only observed by it
and answered by SDPA: an evicting layer's prefill). The hand-off is keyed by that tensor's identity, so two caches
generating at once, in two threads or one, each get their own layer's answer. Every other layer (the `full` cache,
quantized layers read by SDPA, sliding-window layers) gets transformers' own SDPA attention unchanged, so a model
switched to "kvshrink" computes exactly what it computed with "sdpa".

Token policies that project their own queries from a layer's input (kvpress's scorers) read that input through
`capture_inputs` / `layer_inputs`: hooks on the attention modules, installed only by the methods that need them.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "kvshrink"
_state = threading.local()  # the prefill observer (evaluation) and captured layer inputs; the hand-off below is not
_lock = threading.Lock()
#: update() -> attention hand-offs, keyed by the identity of the key tensor the cache layer returned: the attention
#: call that receives exactly that tensor is that layer's, whichever cache, thread or model it runs in
_pending: dict[int, tuple[Any, torch.Tensor]] = {}


def announce(layer: Any, returned_keys: torch.Tensor) -> None:
    """Called by a layer's `update()`: the attention call that receives `returned_keys` is the layer's to answer.
    A layer's earlier announcement that was never claimed (an abandoned step) is withdrawn."""
    with _lock:
        old = getattr(layer, "_announced", None)
        if old is not None:
            _pending.pop(old, None)
        _pending[id(returned_keys)] = (layer, returned_keys)  # the tensor is held, so its id is not reused
        layer._announced = id(returned_keys)


def withdraw(layer: Any) -> None:
    """Forget a layer's announcement (a layer that answers for it, `RowSplit`, announces itself instead)."""
    with _lock:
        old = getattr(layer, "_announced", None)
        if old is not None:
            _pending.pop(old, None)
            layer._announced = None


def claim(layer_idx: int, keys: torch.Tensor) -> Any | None:
    """The layer whose `update()` returned exactly `keys` (identity, not equality), or None."""
    with _lock:
        entry = _pending.get(id(keys))
        if entry is None or entry[1] is not keys or entry[0].layer_idx != layer_idx:
            return None
        del _pending[id(keys)]
        entry[0]._announced = None
        return entry[0]


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


@dataclass(frozen=True)
class LayerInputs:
    """What an attention module was called with: the module, its input hidden states [B, T, hidden] (after the
    decoder layer's norm) and its other keyword arguments (position embeddings, mask, cache positions)."""

    module: torch.nn.Module
    hidden_states: torch.Tensor
    kwargs: dict[str, Any]


def capture_inputs(model: Any) -> int:
    """Forward hooks on each attention module of `model` (`...layers.N.self_attn`) that keep its `LayerInputs` in
    this thread while it runs (`layer_inputs()`), for token policies that score from them; installed once per
    model. Only the running module's inputs are referenced, never kept after its forward. Returns how many modules
    are hooked."""
    if getattr(model, "_kvshrink_input_hooks", 0):
        return model._kvshrink_input_hooks
    modules = [m for name, m in model.named_modules() if name.endswith("self_attn") and hasattr(m, "layer_idx")]
    if not modules:
        raise ValueError(f"{type(model).__name__}: no attention module named '...self_attn' with a layer_idx; "
                         "its inputs cannot be captured")

    def before(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        _state.inputs = LayerInputs(module, hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"})

    def after(module, args, kwargs, output):
        _state.inputs = None

    for m in modules:
        m.register_forward_pre_hook(before, with_kwargs=True)
        m.register_forward_hook(after, with_kwargs=True, always_call=True)
    model._kvshrink_input_hooks = len(modules)
    return len(modules)


def layer_inputs() -> LayerInputs | None:
    """The inputs of the attention module running in this thread (None unless `capture_inputs` hooked it)."""
    return getattr(_state, "inputs", None)


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
