"""KV-Direct's residual checkpointing, two schemes: the cache layers (and the token scheme's shared prefix runner).

`ResidualLayer` (scheme=layer): per layer. Every token keeps the residual-stream vector that
entered this decoder layer (and its position id); only the most recent `window` tokens keep materialised keys and
values. Older keys and values are recomputed on every step with the layer's own modules - input norm, k/v
projections, k_norm where the model has one, the model's rotary embedding at the token's position - so they are
the values the model computed, not an approximation (up to matmul row-count effects in the last bits).

The residual arrives through a forward pre-hook on each decoder layer (`kvshrink.residual.install_hooks`, installed by
`make_cache(model, "kvdirect")`) that hands the layer's input to the cache layer about to be updated.

`TokenLayer` + `PrefixRunner` (scheme=token): one residual per token for all layers (the first layer's input, as
the paper counts it); keys and values of tokens older than the budget are recomputed exactly by running those
tokens (a prefix: the oldest are evicted first, and causal attention makes their states depend on nothing later)
through the decoder layers again at every step, streamed layer by layer inside the step.
"""
from __future__ import annotations

import inspect
import sys
from typing import Any

import torch

from ..rope import decoder_layers as _decoder_layers
from ..rope import rotary_of
from .base import CompressedLayer, check_counts

RESIDUAL_DTYPES = ("model", "float16", "bfloat16", "int8")


def store_residual(h: torch.Tensor, residual_dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(codes, int8 scale or None) of residuals h [B, T, hidden] held as `residual_dtype`."""
    if residual_dtype == "model":
        return h.detach().clone(), None
    if residual_dtype in ("float16", "bfloat16"):
        return h.to(getattr(torch, residual_dtype)), None
    scale = (h.abs().amax(-1, keepdim=True).float() / 127).clamp_min(1e-12)
    codes = torch.round(h.float() / scale).clamp(-127, 127).to(torch.int8)
    return codes, scale.half()


def _append_residuals(holder: Any, h: torch.Tensor, pos: torch.Tensor) -> None:
    """Add residuals h [B, T, hidden] and their positions [B, T] to what `holder` (a layer or the prefix runner)
    keeps in `residuals`, `residual_scale` and `position_ids`, held as its `residual_dtype`."""
    codes, scale = store_residual(h, holder.residual_dtype)
    holder.residuals = codes if holder.residuals is None else torch.cat([holder.residuals, codes], 1)
    if scale is not None:
        holder.residual_scale = scale if holder.residual_scale is None else torch.cat([holder.residual_scale, scale], 1)
    pos = pos.to(torch.int32)
    holder.position_ids = pos if holder.position_ids is None else torch.cat([holder.position_ids, pos], 1)


def _load_residuals(holder: Any) -> torch.Tensor:
    """The residuals `holder` keeps, in its `dtype`."""
    if holder.residual_scale is not None:
        return (holder.residuals.float() * holder.residual_scale.float()).to(holder.dtype)
    return holder.residuals.to(holder.dtype)


class ResidualLayer(CompressedLayer):
    """Residuals of every token plus the last `window` tokens' keys and values, for one decoder layer."""

    replays_prefill = False  # needs the residual stream, which a replayed prefill does not run
    kind = "a kvdirect"
    _batch_tensors = ("residuals", "residual_scale", "position_ids", "keys", "values")

    def __init__(self, decoder_layer: torch.nn.Module, rotary: Any, layer_type: str, *, window: int = 0,
                 residual_dtype: str = "model", layer_idx: int = -1):
        super().__init__()
        if residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"layer {layer_idx}: residual_dtype must be one of {RESIDUAL_DTYPES}, got {residual_dtype!r}")
        check_counts(layer_idx, window=window)
        attn = decoder_layer.self_attn
        for name in ("k_proj", "v_proj"):
            if not hasattr(attn, name):
                raise ValueError(f"layer {layer_idx}: {type(attn).__name__} has no {name}; kvdirect supports "
                                 "attention with separate k_proj and v_proj")
        if not hasattr(decoder_layer, "input_layernorm"):
            raise ValueError(f"layer {layer_idx}: {type(decoder_layer).__name__} has no input_layernorm")
        self.norm, self.attn, self.rotary, self.layer_type = decoder_layer.input_layernorm, attn, rotary, layer_type
        self._rotary_takes_type = "layer_type" in inspect.signature(rotary.forward).parameters
        self._apply_rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb")
        self.window, self.residual_dtype, self.layer_idx = window, residual_dtype, layer_idx
        self.sliding_window = None
        self.is_sliding = False
        self.pending: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._clear()

    def _clear(self) -> None:
        self.residuals = self.residual_scale = self.position_ids = None
        self.keys = self.values = None
        self.seen = 0
        self.is_initialized = False

    # -- residual storage -----------------------------------------------------------------------------------------
    def _load(self) -> torch.Tensor:
        return _load_residuals(self)

    def recompute(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (after the rotary embedding) and values [B, H, T, d] of residuals h [B, T, hidden]."""
        attn = self.attn
        x = self.norm(h)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        args = (x, position_ids, self.layer_type) if self._rotary_takes_type else (x, position_ids)
        cos, sin = self.rotary(*args)
        _, k = self._apply_rope(k, k, cos, sin)
        return k, v

    # -- transformers layer API (the rest is CompressedLayer's) ----------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.pending is None:
            raise RuntimeError(f"layer {self.layer_idx}: no residual arrived for these keys; kvdirect needs the hooks "
                               "that make_cache(model, 'kvdirect') installs on the model it was made for")
        h, pos = self.pending
        self.pending = None
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, t = h.shape[0], h.shape[1]
        if h.shape[1] != key_states.shape[-2]:
            raise RuntimeError(f"layer {self.layer_idx}: {h.shape[1]} residuals for {key_states.shape[-2]} new keys")
        if pos is None:
            pos = torch.arange(self.seen, self.seen + t, device=h.device)
        pos = pos.expand(b, t)
        old = self.residuals.shape[1] if self.residuals is not None else 0
        evicted = old - self.keys.shape[-2]
        if evicted > 0:
            k_old, v_old = self.recompute(self._load()[:, :evicted], self.position_ids[:, :evicted].long())
            out_k = torch.cat([k_old, self.keys, key_states], -2)
            out_v = torch.cat([v_old, self.values, value_states], -2)
        else:
            out_k = torch.cat([self.keys, key_states], -2)
            out_v = torch.cat([self.values, value_states], -2)
        _append_residuals(self, h, pos)
        keep = min(self.window, out_k.shape[-2])
        self.keys = out_k[:, :, out_k.shape[-2] - keep:].clone()
        self.values = out_v[:, :, out_v.shape[-2] - keep:].clone()
        self.seen += t
        return out_k, out_v

    # -- reporting ------------------------------------------------------------------------------------------------
    def parts(self) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {"residuals": [], "positions": [], "window": []}
        if self.is_initialized:
            out["residuals"].extend(t for t in (self.residuals, self.residual_scale) if t is not None)
            out["positions"].append(self.position_ids)
            out["window"].extend([self.keys, self.values])
        return out

    def describe(self) -> dict[str, Any]:
        return {"bits": f"residual {self.residual_dtype}", "window": self.window}


class _Capture:
    """A stand-in cache for one decoder layer run on the evicted prefix, a chunk of queries at a time: collects the
    keys and values the layer's own attention computes (after its projections, k_norm and rotary embedding) and
    gives each chunk everything collected so far, as a chunked prefill would."""

    def __init__(self):
        self.keys = self.values = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], -2)
            self.values = torch.cat([self.values, value_states], -2)
        return self.keys, self.values


class PrefixRunner:
    """KV-Direct's token scheme, shared by the layers of one cache: one residual vector per token (the input of the
    first recomputed decoder layer: layer 0 unless the method materialises the first `start` layers), and, during a
    step, the evicted prefix's hidden state pushed through the decoder layers
    one at a time, so that each layer gets the prefix's keys and values exactly when it needs them and only one
    layer's recomputed keys and values (plus the prefix's hidden state) are alive at once."""

    def __init__(self, model: Any, budget: int, residual_dtype: str, start: int = 0, chunk: int = 256):
        if residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"kvdirect: residual_dtype must be one of {RESIDUAL_DTYPES}, got {residual_dtype!r}")
        self.layers = _decoder_layers(model)
        if not 0 <= start < len(self.layers):
            raise ValueError(f"kvdirect: materialize must be in [0, {len(self.layers) - 1}] for this model's "
                             f"{len(self.layers)} layers, got {start}")
        self.start = start  # the first recomputed layer; its input is the one residual kept per token
        if chunk < 1:
            raise ValueError(f"kvdirect: recompute_chunk must be >= 1, got {chunk}")
        self.chunk = chunk  # prefix queries per attention call: bounds the scores to heads x chunk x prefix
        self.rotary = rotary_of(model)
        text = model.config.get_text_config(decoder=True)
        self.layer_types = list(getattr(text, "layer_types", None) or ["full_attention"] * len(self.layers))
        self.sliding_window = getattr(text, "sliding_window", None)
        self._rotary_takes_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.budget, self.residual_dtype = budget, residual_dtype
        self.residuals = self.residual_scale = self.position_ids = None
        self.seen = 0
        self.recompute_seconds = 0.0  # time spent recomputing, summed over steps
        self.recomputed_tokens = 0  # prefix tokens pushed through one layer, summed
        self._reset_step()

    def _reset_step(self) -> None:
        self.evicted = 0
        self.hidden = None
        self.next_layer = self.start
        self._embeddings: dict[str, Any] = {}

    def begin(self, h: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        """A step starts (pre-hook of layer `start`): fix the evicted prefix, keep the new residuals."""
        if h.shape[0] != 1:
            raise ValueError("kvdirect scheme=token recomputes the evicted prefix of one sequence: batch size 1 only")
        self._reset_step()
        self.evicted = max(self.seen - self.budget, 0)
        if self.evicted:
            self.hidden = self._load()[:, :self.evicted]
        t = h.shape[1]
        pos = (position_ids if position_ids is not None else torch.arange(self.seen, self.seen + t,
                                                                         device=h.device)[None]).expand(1, t)
        _append_residuals(self, h, pos)
        self.seen += t
        self.dtype = h.dtype

    def _load(self) -> torch.Tensor:
        return _load_residuals(self)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The residuals kept for every token (the one vector per token all layers recompute from)."""
        tensors = {n: getattr(self, n) for n in ("residuals", "residual_scale", "position_ids")
                   if getattr(self, n) is not None}
        dtype = getattr(self, "dtype", None)
        return tensors, {"seen": self.seen, "dtype": None if dtype is None else str(dtype).removeprefix("torch.")}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], counts: dict[str, Any]) -> None:
        for n in ("residuals", "residual_scale", "position_ids"):
            setattr(self, n, tensors.get(n))
        self.seen = counts["seen"]
        if counts["dtype"] is not None:
            self.dtype = getattr(torch, counts["dtype"])

    def prefix_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the evicted prefix at `layer_idx`, then its hidden state moved past that layer."""
        import time

        if layer_idx != self.next_layer:
            raise RuntimeError(f"kvdirect scheme=token: layer {layer_idx} updated, layer {self.next_layer} expected "
                               "(the prefix is pushed through the layers in order)")
        start = time.perf_counter()
        e = self.evicted
        kind = self.layer_types[layer_idx]
        pos = self.position_ids[:, :e].long()
        if kind not in self._embeddings:
            args = (self.hidden, pos, kind) if self._rotary_takes_type else (self.hidden, pos)
            self._embeddings[kind] = self.rotary(*args)
        cos, sin = self._embeddings[kind]
        window = self.sliding_window if kind == "sliding_attention" else None
        capture = _Capture()
        out_hidden = torch.empty_like(self.hidden)
        for c0 in range(0, e, self.chunk):  # a chunked prefill of the prefix through this layer
            c1 = min(c0 + self.chunk, e)
            q = torch.arange(c0, c1, device=self.hidden.device)[:, None]
            k = torch.arange(c1, device=self.hidden.device)[None, :]
            allowed = k <= q
            if window:
                allowed &= k > q - window
            out = self.layers[layer_idx](self.hidden[:, c0:c1], attention_mask=allowed[None, None],
                                         position_ids=pos[:, c0:c1], past_key_values=capture, use_cache=True,
                                         position_embeddings=(cos[:, c0:c1], sin[:, c0:c1]))
            out_hidden[:, c0:c1] = out[0] if isinstance(out, tuple) else out
        self.hidden = out_hidden
        self.next_layer = layer_idx + 1
        if self.next_layer == len(self.layers):
            self.hidden = None  # the step's prefix work is done: free it
        self.recompute_seconds += time.perf_counter() - start
        self.recomputed_tokens += e
        return capture.keys, capture.values


class TokenLayer(CompressedLayer):
    """KV-Direct's token scheme, one decoder layer: the keys and values of the last `budget` tokens; older ones come
    from the shared `PrefixRunner`, recomputed each step. Layer `runner.start` also reports the runner's residuals."""

    replays_prefill = False  # needs the residual stream, which a replayed prefill does not run
    kind = "a kvdirect"

    def __init__(self, runner: PrefixRunner, layer_idx: int, sliding_window: int | None = None):
        super().__init__()
        self.runner, self.layer_idx = runner, layer_idx
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.keys = self.values = None
        self.seen = 0
        self.is_initialized = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        runner = self.runner
        if runner.seen != self.seen + key_states.shape[-2]:
            raise RuntimeError(f"layer {self.layer_idx}: no residual arrived for these keys; kvdirect needs the hooks "
                               "that make_cache(model, 'kvdirect') installs on the model it was made for")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        parts_k, parts_v = [self.keys, key_states], [self.values, value_states]
        if runner.evicted:
            k_old, v_old = runner.prefix_kv(self.layer_idx)
            parts_k.insert(0, k_old)
            parts_v.insert(0, v_old)
        out_k, out_v = torch.cat(parts_k, -2), torch.cat(parts_v, -2)
        self.seen += key_states.shape[-2]
        keep = min(runner.budget, self.seen)
        held = torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)
        self.keys, self.values = held[0][:, :, held[0].shape[-2] - keep:].clone(), \
            held[1][:, :, held[1].shape[-2] - keep:].clone()
        return out_k, out_v

    def reset(self) -> None:
        raise NotImplementedError(f"layer {self.layer_idx}: make a new kvdirect cache instead of resetting one")

    _batch_tensors = ("keys", "values")

    def _clear(self) -> None:
        self.keys = self.values = None
        self.seen = 0
        self.is_initialized = False

    def shared_state(self) -> dict[str, Any]:
        """The prefix runner every layer of the cache shares (saved once)."""
        return {"runner": self.runner}

    def _map_batch(self, fn) -> None:
        raise NotImplementedError("kvdirect scheme=token holds one sequence (batch size 1)")

    def parts(self) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {"residuals": [], "positions": [], "window": []}
        if self.is_initialized:
            out["window"].extend([self.keys, self.values])
        r = self.runner
        if self.layer_idx == r.start and r.residuals is not None:  # one residual per token, for every layer
            out["residuals"].extend(t for t in (r.residuals, r.residual_scale) if t is not None)
            out["positions"].append(r.position_ids)
        return out

    def describe(self) -> dict[str, Any]:
        return {"bits": f"token residual {self.runner.residual_dtype}", "window": self.runner.budget,
                "recompute_seconds": round(self.runner.recompute_seconds, 4) if self.layer_idx == 0 else None}
