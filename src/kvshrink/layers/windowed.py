"""`WindowedLayer`: exact sinks, compressed key and value stores, then an exact window of recent tokens (KIVI, TaDA,
and TurboQuant through `RotatedLayer`).

Attention gets the exact keys/values of the tokens passed in this step (so the prefill attends in full precision)
and the decoded store for the past; only then are the tokens that left the window compressed.
With `kernels=True` (CUDA, Triton), decode steps never decode the store: the layer answers kvshrink's attention call
itself with `kernels.packed_attention`, which reads the packed codes, and tokens leaving the window are quantized by
`kernels.quantize_pack`. The prefill still gets the decoded store and SDPA.
With `kernels="cpu"` decode steps are answered the same way by `kernels.cpu.packed_attention` (a C++ kernel reading
the packed codes on the CPU); blocks leaving the window are quantized by the PyTorch encoder.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .. import kernels
from ..attention import SelfAttending
from ..codecs.quant import QuantSpec
from ..codecs.rotation import RotationSpec, fwht, unrotate
from ..kernels import MAX_QUERY_TOKENS
from ..kernels import cpu as cpu_kernel
from .base import PARTS, CompressedLayer, ExactWindow, add_store_parts, check_counts


class WindowedLayer(ExactWindow, SelfAttending, CompressedLayer):
    """Exact attention-sink tokens, then compressed key and value stores, then an exact window of recent tokens.

    The first `sinks` tokens stay exact (attention concentrates on them). At least `window` recent tokens stay exact; older ones move to the stores in blocks (a whole number of
    per-channel groups), so the window holds between `window` and `window + block - 1` tokens. With
    `sliding_window` set (Gemma 3's local layers) tokens no later query can see are dropped, oldest block first.
    """

    replays_prefill = True  # prefill: attention gets the exact states given (see eval.prefill)
    replays_prefill_from = None  # with kernels: prompts this long or longer (shorter ones the kernel answers)
    _batch_stores = ("key_store", "value_store")

    def __init__(self, key_spec: QuantSpec, value_spec: QuantSpec, window: int = 32, layer_idx: int = -1,
                 sliding_window: int | None = None, sinks: int = 0, exact_dtype: torch.dtype | None = None,
                 kernels: bool | str = False, shard=None):
        super().__init__()
        self.shard = shard  # under tensor parallelism: the stores' head mean and rotations span every rank's heads
        if kernels not in (False, True, "triton", "cpu"):
            raise ValueError(f"layer {layer_idx}: kernels must be False, True/'triton' or 'cpu', got {kernels!r}")
        self.kernels = "triton" if kernels is True else kernels  # False, "triton" (CUDA) or "cpu"
        if kernels:  # a short prompt goes through the kernel path, whose attention is not SDPA
            self.replays_prefill_from = MAX_QUERY_TOKENS + 1
        self.kind = "a kernel-attending quantized"
        if exact_dtype is not None and exact_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"layer {layer_idx}: exact_dtype must be float16, bfloat16, float32 or None, got {exact_dtype}")
        self.exact_dtype = exact_dtype  # None: the model's dtype
        check_counts(layer_idx, window=window, sinks=sinks)
        self.layer_idx = layer_idx
        self.key_spec, self.value_spec = key_spec, value_spec
        self.window = window
        self.sinks = sinks
        self.block = math.lcm(key_spec.tokens_per_unit, value_spec.tokens_per_unit)
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self._clear()

    def _clear(self) -> None:
        self.key_store = self.key_spec.make_store(f"layer {self.layer_idx} keys")
        self.value_store = self.value_spec.make_store(f"layer {self.layer_idx} values")
        self.key_store.shard = self.value_store.shard = self.shard
        self.keys = self.values = None  # the full-precision window, as in transformers' layers
        self.sink_keys = self.sink_values = None
        self.seen = 0  # tokens ever passed in (positions)
        self.is_initialized = False

    # -- transformers layer API -------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.key_spec.check_head_dim(key_states.shape[-1], f"layer {self.layer_idx} keys")
        self.value_spec.check_head_dim(value_states.shape[-1], f"layer {self.layer_idx} values")
        device = key_states.device
        if self.kernels == "cpu":
            if device.type != "cpu":
                raise RuntimeError(f"layer {self.layer_idx}: kernels='cpu' needs CPU tensors (the states are on "
                                   f"{device}); use kernel='triton' or 'torch'")
        elif self.kernels:
            if not kernels.usable_on(device):
                raise RuntimeError(f"layer {self.layer_idx}: kernels=True needs CUDA tensors and Triton "
                                   f"(the states are on {device}); use kernel='torch'")
        super().lazy_initialization(key_states, value_states)  # exact window and sinks, in `exact_dtype`
        if self.kernels == "triton":
            self.key_store.encoder = self.value_store.encoder = kernels.quantize_pack

    def _check(self, name: str, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"layer {self.layer_idx}: {name} must be [batch, heads, tokens, head_dim], got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).nonzero()[0].tolist()
            raise ValueError(
                f"layer {self.layer_idx}: {name} contain NaN or Inf (first at [batch, head, token, channel] = {bad}); "
                "a compressed cache cannot store non-finite values"
            )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.kernels and key_states.shape[-2] <= MAX_QUERY_TOKENS:
            # on a GPU no finiteness check here: it would stop the GPU at every layer of every step; `_flush` checks
            # each block before it is compressed (a non-finite value in the exact window harms no stored code). On
            # the CPU the check costs nothing worth saving, so bad input is refused before anything is written.
            if self.kernels == "cpu":
                self._check("key_states", key_states)
                self._check("value_states", value_states)
            self._begin_update(key_states, value_states)
            self._add(key_states, value_states, flush=False)
            self._hand_over(self.keys)  # answered by attend(), which then compresses what left the window
            return self.keys, self.values
        self._check("key_states", key_states)
        self._check("value_states", value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past_k = self.key_store.decode(self.dtype)
        past_v = self.value_store.decode(self.dtype)
        # attention gets this step's states exactly as computed; the window keeps them in `exact_dtype`
        cast = lambda t: t if t.dtype == self.dtype else t.to(self.dtype)  # noqa: E731
        out_k = torch.cat([t for t in (cast(self.sink_keys), past_k, cast(self.keys), key_states) if t is not None], -2)
        out_v = torch.cat([t for t in (cast(self.sink_values), past_v, cast(self.values), value_states)
                           if t is not None], -2)
        self._add(key_states, value_states)
        if self.sliding_window is not None:
            self._forget_outside_window()
        return out_k, out_v

    def _add(self, key_states: torch.Tensor, value_states: torch.Tensor, flush: bool = True) -> None:
        """Take this step's tokens into the window (the first ones into the sinks) and compress what left it."""
        self._take(key_states, value_states)
        if flush:
            self._flush()

    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention of this step's queries [B, HQ, Q, D] over everything held, read packed by the kernel."""
        self._begin_attend()
        sinks = self.sink_keys.shape[-2]
        stored = self.key_store.tokens
        dev = query.device
        index = torch.cat([torch.arange(sinks, device=dev, dtype=torch.int32),
                           torch.arange(sinks + stored, sinks + stored + self.keys.shape[-2], device=dev,
                                        dtype=torch.int32)])
        attention = cpu_kernel.packed_attention if self.kernels == "cpu" else kernels.packed_attention
        out = attention(
            query, self.key_store, self.value_store, torch.cat([self.sink_keys, self.keys], -2),
            torch.cat([self.sink_values, self.values], -2), index, sinks, mask=attention_mask, scaling=scaling)
        self._flush()  # as on the PyTorch path: this step attended its tokens exactly, now they may be compressed
        if self.sliding_window is not None:
            self._forget_outside_window()
        return out

    def _flush(self) -> None:
        n = self._leaving()
        if n == 0:
            return
        if self.kernels:
            self._check("key_states", self.keys[:, :, :n])
            self._check("value_states", self.values[:, :, :n])
        self.key_store.append(self.keys[:, :, :n])
        self.value_store.append(self.values[:, :, :n])
        self._drop_front(n)

    def _forget_outside_window(self) -> None:
        """Keep only what the next query can see: the last `sliding_window - 1` tokens (rounded out to a block)."""
        excess = self.held() - (self.sliding_window - 1)
        if excess <= 0:
            return
        n = min(excess, self.sink_keys.shape[-2])
        if n:
            self.sink_keys = self.sink_keys[:, :, n:].clone()
            self.sink_values = self.sink_values[:, :, n:].clone()
            excess -= n
        if excess <= 0:
            return
        unit = self.block
        from_store = min(excess, self.key_store.tokens) // unit * unit
        self.key_store.drop_front(from_store)
        self.value_store.drop_front(from_store)
        excess -= from_store
        if excess > 0 and self.key_store.tokens == 0:
            self._drop_front(excess)

    def check_head_dim(self, head_dim: int) -> None:
        """Raise a clear error now if a group cannot tile this head dimension."""
        self.key_spec.check_head_dim(head_dim, f"layer {self.layer_idx} keys")
        self.value_spec.check_head_dim(head_dim, f"layer {self.layer_idx} values")

    def _stored(self) -> int:
        return self.key_store.tokens

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    # -- reporting ----------------------------------------------------------------------------------------------
    def parts(self) -> dict[str, list[torch.Tensor]]:
        return self._exact_parts(add_store_parts({p: [] for p in PARTS}, self.key_store, self.value_store))

    def describe(self) -> dict[str, Any]:
        k, v = self.key_spec, self.value_spec
        return {
            "bits": f"{k.bits}/{v.bits}",
            "key": k.describe(),
            "value": v.describe(),
            "window": self.window,
            "sinks": self.sinks,
        }


class RotatedLayer(WindowedLayer):
    """A `WindowedLayer` over rotation-codec stores that attends without rotating stored tokens back.

    Decoding steps: the query is rotated once per KV head (R q) and scored against the stored keys in the rotated
    space ((R q)·(R k) = q·k); the probability-weighted sum of stored values stays rotated and is rotated back once
    (R^-1 of one vector per query head), instead of once per stored token. Sinks and the exact window are attended
    as they are. The prefill, with nothing stored yet, is plain SDPA over the exact states.
    """

    kind = "a rotation-codec"

    def __init__(self, key_spec: RotationSpec, value_spec: RotationSpec, *args, **kwargs):
        for what, spec in (("key", key_spec), ("value", value_spec)):
            if not isinstance(spec, RotationSpec):
                raise TypeError(f"RotatedLayer needs a RotationSpec for its {what}s, got {type(spec).__name__}")
        super().__init__(key_spec, value_spec, *args, **kwargs)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self.key_store.tokens == 0:
            return super().update(key_states, value_states, *args, **kwargs)
        self._check("key_states", key_states)
        self._check("value_states", value_states)
        self._begin_update(key_states, value_states)
        cast = lambda t: t.float()  # noqa: E731
        # what this step attends, in key order: sinks, stored (rotated), window, this step's tokens
        self._step = (cast(self.sink_keys), cast(self.sink_values), self.key_store.decode_rotated(),
                      self.value_store.decode_rotated(), torch.cat([cast(self.keys), cast(key_states)], -2),
                      torch.cat([cast(self.values), cast(value_states)], -2))
        self._add(key_states, value_states)
        if self.sliding_window is not None:
            self._forget_outside_window()
        self._hand_over(key_states)
        return key_states, value_states

    @staticmethod
    def _rotate_query(q: torch.Tensor, store, h: int) -> torch.Tensor:
        """R q per query head, with the rotation of the KV head (of h) it reads (GQA)."""
        if not store.spec.rotate:
            return q
        s = store.signs(h, q.shape[-1]).repeat_interleave(q.shape[1] // h, 0)
        return fwht(q * s[None, :, None, :].to(q.device))

    def attend(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        self._begin_attend()
        ks, vs, k_rot, v_rot, kw, vw = self._step
        self._step = None
        q = query.float()
        b, hq, ql, d = q.shape
        h = kw.shape[1]
        if hq % h:
            raise ValueError(f"layer {self.layer_idx}: {hq} query heads for {h} KV heads")
        rep = hq // h
        grow = lambda t: t.repeat_interleave(rep, 1)  # noqa: E731
        q_rot = self._rotate_query(q, self.key_store, h)
        scores = torch.cat([q @ grow(ks).transpose(-1, -2), q_rot @ grow(k_rot).transpose(-1, -2),
                            q @ grow(kw).transpose(-1, -2)], -1) * scaling
        n = scores.shape[-1]
        if mask is not None:
            m = mask[..., -n:] if mask.shape[-1] >= n else mask
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
        elif ql > 1:
            causal = torch.arange(n, device=q.device)[None, :] > (n - ql + torch.arange(ql, device=q.device))[:, None]
            scores = scores.masked_fill(causal, float("-inf"))
        p = torch.softmax(scores, -1)
        n_sink, n_mid = ks.shape[-2], k_rot.shape[-2]
        stored = p[..., n_sink:n_sink + n_mid] @ grow(v_rot)  # still rotated: one inverse per query head below
        if self.value_store.spec.rotate:
            s = self.value_store.signs(h, d).repeat_interleave(rep, 0)
            stored = unrotate(stored, s)
        out = p[..., :n_sink] @ grow(vs) + stored + p[..., n_sink + n_mid:] @ grow(vw)
        return out.to(query.dtype)

