"""`ComposedLayer`: the one generic cache layer. Exact attention-sink tokens first, then the tokens a codec stores
(chosen by a token policy, when the layer has one), then an exact window of recent tokens.

Without a policy every token that leaves the window is stored (KIVI, TaDA, TurboQuant): tokens move to the key and
value stores in whole blocks (a whole number of each codec's units), so the window holds between `window` and
`window + block - 1` tokens; the prefill attends over the exact states it was given (SDPA) and only then are they
stored, and decoding steps attend over the sinks, the decoded store and the window. A decode backend may read the
codes instead: "cpu" (the C++ kernel) or "triton" (the GPU kernels) for the `grouped` and `rotated` codecs'
layouts, "rotated" (PyTorch: query rotated once per KV head, stored tokens never rotated back) for the `rotated`
codec. With `sliding_window`
(Gemma 3's local layers) tokens no later query can see are dropped, oldest first.

With a policy (SnapKV, H2O, TOVA, StreamingLLM, or any registered one) the layer keeps a budget of tokens: each held
token has a position (int32) and a score (float32), both counted. The layer attends by itself through kvshrink's
attention function, so the scores come from the same query-key products as the output; after the prefill (and
after each decoding step for policies that evict while decoding) it keeps the best-scored tokens between the
protected sinks and window and stores them with the codec (the `exact` codec: the kept tokens as they are). With a
low tier the evicted tokens are stored by a second codec instead of dropped (MiKV). Masks are indexed by position.

A policy that compresses the prompt only (SnapKV) keeps every generated token by default (`generated="keep"`), so a
long generation grows the cache past the budget. `generated="budget"` holds the generated tokens to the budget too:
each decoding step adds the attention the step's query gives every held token, and whenever `chunk` more tokens
have left the recent window the layer keeps, among those that left, as many as the budget allows, ranked by the
attention they received per query since they arrived (the queries after them: SnapKV's observation window on the
generation); the oldest kept ones are stored in whole codec units, the few left over wait exact at the window's
front (ranked again with the next chunk), and the others are dropped (or sent to the low tier). The held count is
then what the prompt kept plus the budget's share of the generated tokens (the budget of all tokens seen, when the
prompt kept its share), plus at most one chunk and one codec unit waiting.

Under `generated="keep"` a prompt-only policy never reads its scores after the prompt's eviction; `scores="free"`
drops them then (4 bytes per held token and KV head; the default keeps them, so existing specs keep their bytes),
and `positions="bits"` also holds the kept prompt positions as a bitmask, one bit per prompt token and KV head
instead of an int32 per kept one (every position after the prompt is held); decoding steps then attend through SDPA
over the held tokens (`_attend_settled`).

A layer that defers eviction (`defer_eviction`) keeps the whole prompt exact after the prefill until told how many
tokens stay (`_evict(keep)`); meanwhile a scoring pass (`probing`, KVzip's reconstruction) may run forward passes
whose tokens attend over the held prompt and score it but are never kept: the layer's length and positions stay
the prompt's.

Under tensor parallelism (`shard`) the layer holds its rank's KV heads; a per-layer policy (TOVA: every head keeps
the same tokens) averages its scores over every rank's heads, gathered, so all ranks keep the same positions.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch

from .. import kernels as gpu_kernels
from ..attention import SelfAttending
from ..compat import query_length as _query_length
from ..codecs.base import PARTS, Codec
from ..codecs.exact import ExactCodec
from ..codecs.rotation import RotationCodec, decode_rotated, fwht, unrotate
from ..codecs.perhead import PerHead
from ..codecs.quant import GroupCodec
from ..codecs.store import PAGE_TOKENS, PagedStore, lcm_units, make_store
from ..distributed import gather_heads
from ..kernels import MAX_QUERY_TOKENS
from ..kernels import cpu as cpu_kernel
from ..policies.scoring import Policy, ScoreContext
from .base import CompressedLayer, ExactWindow, check_counts

BACKENDS = ("torch", "cpu", "triton", "rotated")
GENERATED = ("keep", "budget")  # what a prompt-only policy does with generated tokens (see the module doc)
SCORES = ("keep", "free")  # a prompt-only policy's scores after the prompt's eviction (see the module doc)
POSITIONS = ("int32", "bits")  # how a freed layer holds its kept prompt positions (see the module doc)
_MIN_CHUNK = 32  # generated=budget: at least this many tokens are ranked together
_QUERY_BLOCK = 512  # queries per block when a scored layer attends (bounds the score matrix at block x tokens)
_EXACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: PyTorch's fused CPU attention that also returns each query's log-sum-exp (a scoring pass's fast path)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def retention_problem(policy: Policy | None, generated: str, scores: str, positions: str) -> str | None:
    """What is wrong with a layer's `generated`, `scores` and `positions` for its policy (None: nothing); the
    layer and the method spec (EvictionMethod.validate) both ask, each naming itself before the answer."""
    what = ("the layer has no token policy" if policy is None
            else f"{policy.name} evicts while decoding" if policy.evicts_while_decoding else None)
    if generated not in GENERATED:
        return f"generated must be one of {', '.join(GENERATED)}, got {generated!r}"
    if generated != "keep" and what:
        return (f"generated={generated} holds the tokens generated after the prompt to a prompt-only policy's "
                f"budget, but {what}, so only generated=keep applies")
    if scores not in SCORES:
        return f"scores must be one of {', '.join(SCORES)}, got {scores!r}"
    if scores == "free" and (what or generated != "keep"):
        return (f"scores=free drops the held tokens' scores once the prompt is evicted, but "
                f"{what or 'generated=budget ranks the generated tokens by them'}; use scores=keep")
    if positions not in POSITIONS:
        return f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}"
    if positions == "bits" and scores != "free":
        return ("positions=bits packs the kept prompt positions once nothing is evicted again, which scores=free "
                f"says; got scores={scores}: add scores=free")
    return None


@functools.lru_cache(maxsize=64)
def _positions(sinks: int, stored: int, length: int, device: str) -> torch.Tensor:
    """int32 key positions 0..sinks-1, then sinks + stored onwards, `sinks + length` of them (read-only: kernels
    read slices of it). Scratch shared by every layer of every cache (all layers store their blocks at the same
    steps), not a layer's state: a few hundred bytes per entry, at most 64 entries."""
    index = torch.arange(sinks + length, device=device, dtype=torch.int32)
    index[sinks:] += stored
    return index


class ComposedLayer(ExactWindow, SelfAttending, CompressedLayer):
    """Exact sinks, a codec's stored tokens (optionally chosen by a policy), an exact recent window.

    budget: with a policy, a fraction of the tokens seen (0 < budget <= 1) kept, or `tokens` > 0 a fixed count
    (never below sinks + window). low_codecs: (key, value) codecs of the tier evicted tokens go to (None: dropped).
    """

    splits_rows = True  # a left-padded batch keeps one layer per row (layers/rows.py)

    def __init__(self, key_codec: Codec, value_codec: Codec, *, window: int = 32, sinks: int = 4,
                 policy: Policy | None = None, budget: float = 1.0, tokens: int = 0, observe: int = 32,
                 low_codecs: tuple[Codec, Codec] | None = None, exact_dtype: torch.dtype | None = None,
                 backend: str = "torch", layer_idx: int = -1, sliding_window: int | None = None, shard=None,
                 qdot: str = "float", generated: str = "keep", scores: str = "keep", positions: str = "int32"):
        super().__init__()
        where = f"layer {layer_idx}"
        problem = retention_problem(policy, generated, scores, positions)
        if problem:
            raise ValueError(f"{where}: {problem}")
        check_counts(layer_idx, window=window, sinks=sinks, tokens=tokens, observe=observe)
        if backend not in BACKENDS:
            raise ValueError(f"{where}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if qdot not in ("float", "int8"):
            raise ValueError(f"{where}: qdot must be 'float' or 'int8', got {qdot!r}")
        if qdot != "float" and backend != "cpu":
            raise ValueError(f"{where}: qdot={qdot!r} is an option of the CPU kernel (backend 'cpu'), got backend "
                             f"{backend!r}")
        if exact_dtype is not None and exact_dtype not in _EXACT_DTYPES:
            raise ValueError(f"{where}: exact_dtype must be float16, bfloat16, float32 or None, got {exact_dtype}")
        if policy is not None:
            if not 0 < budget <= 1:
                raise ValueError(f"{where}: budget must be a fraction in (0, 1], got {budget}")
            if sliding_window is not None:
                raise ValueError(f"{where}: a token policy on a sliding-window layer is not supported (it never "
                                 "holds more than its window)")
            if backend != "torch":
                raise ValueError(f"{where}: a layer with a token policy attends by itself (backend 'torch'), "
                                 f"got backend {backend!r}")
            if policy.evicts_while_decoding:
                for what, codec in (("keys", key_codec), ("values", value_codec)):
                    if codec.tokens_per_unit > 1:
                        raise ValueError(
                            f"{where}: {policy.name} evicts single tokens while decoding, but the {what}' "
                            f"{codec.name} codes span {codec.tokens_per_unit} tokens (groups along tokens): code "
                            "them per token (e.g. key_axis=token) or use a policy that compresses the prompt only")
                    if getattr(codec, "center", "none") == "head" and not policy.per_layer:
                        raise ValueError(
                            f"{where}: {policy.name} evicts different tokens per head while decoding, but the {what}' "
                            "head mean is shared by every head of a token: use mean=channel or none, or a per-layer "
                            "policy (tova)")
        if shard is not None and any(isinstance(c, PerHead) for c in (key_codec, value_codec)):
            raise ValueError(f"{where}: per-head codecs under tensor parallelism are not supported yet")
        if backend != "torch" and any(isinstance(c, PerHead) for c in (key_codec, value_codec)):
            raise ValueError(f"{where}: per-head codecs decode through the PyTorch path (backend 'torch'), "
                             f"got backend {backend!r}")
        if backend == "rotated" and not all(isinstance(c, RotationCodec) for c in (key_codec, value_codec)):
            raise TypeError(f"{where}: backend 'rotated' needs the rotated codec for keys and values, got "
                            f"{key_codec.name} / {value_codec.name}")
        self.key_codec, self.value_codec = key_codec, value_codec
        self.policy, self.budget, self.tokens, self.observe = policy, budget, tokens, max(observe, 1)
        self.low_codecs = low_codecs
        self.window, self.sinks, self.layer_idx = window, sinks, layer_idx
        self.exact_dtype = exact_dtype
        self.backend = backend
        self.qdot = qdot
        self.shard = shard
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        # tokens moved to the stores together: whole units of every codec (one token at a time under a policy
        # whose codecs allow it: what it evicts is single tokens)
        self.block = lcm_units(key_codec, value_codec)
        self.generated = generated
        self.free_scores = scores == "free"
        self.pack_positions = positions == "bits"
        self.chunk = max(self.block, _MIN_CHUNK)  # generated=budget: tokens past the window ranked together
        self.page_tokens = -(-PAGE_TOKENS // self.block) * self.block
        self.kind = "a scored" if policy is not None else "a kernel-attending" if backend != "torch" else "a compressed"
        # a short prompt goes through the kernel path, whose attention is not SDPA
        self.replays_prefill_from = MAX_QUERY_TOKENS + 1 if backend in ("cpu", "triton") else None
        self._clear()

    replays_prefill = True  # the prefill attends over the exact states given (SDPA); see eval.prefill
    #: the prefill scores but does not evict: whoever set it decides how many tokens stay, then calls `_evict(keep)`
    defer_eviction = False

    @property
    def scored(self) -> bool:
        return self.policy is not None

    def _store(self, codec: Codec, what: str) -> PagedStore:
        store = make_store(codec, f"layer {self.layer_idx} {what}", self.page_tokens,
                           "value" if what.endswith("values") else "key")
        store.shard = self.shard
        return store

    def _clear(self) -> None:
        self.key_store = self._store(self.key_codec, "keys")
        self.value_store = self._store(self.value_codec, "values")
        self.low_keys = self.low_values = None
        if self.low_codecs is not None:
            self.low_keys = self._store(self.low_codecs[0], "low keys")
            self.low_values = self._store(self.low_codecs[1], "low values")
        self.keys = self.values = None  # the exact window
        self.sink_keys = self.sink_values = None
        self.positions = self.scores = self.low_positions = None  # scored layers: held tokens' positions, scores
        # positions="bits", once the prompt is evicted: the kept prompt positions as a bitmask [B, H, ceil(P/8)]
        # (uint8, bit i of byte j: position 8j+i) and P; every position from P on is held (see held_positions)
        self.kept_bits: torch.Tensor | None = None
        self.prompt_end: int | None = None
        self.seen = 0
        self.calls = 0
        self._awaiting = False
        self._step = None
        self._given = None
        self.probing = False  # a scoring pass runs: its tokens attend over the held ones and are not kept
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self.awaiting_keep = False  # deferred eviction: the prefill is held whole until `_evict(keep)`
        self.decode_from: int | None = None  # generated=budget: the first decoded position (scores restart there)
        self.prompt_held: int | None = None  # generated=budget: tokens held after the prompt was compressed
        self.is_initialized = False

    def _stores(self) -> tuple[PagedStore, ...]:
        return tuple(s for s in (self.key_store, self.value_store, self.low_keys, self.low_values) if s is not None)

    # -- transformers layer API -------------------------------------------------------------------------------
    def check_head_dim(self, head_dim: int) -> None:
        """Raise a clear error now if a codec cannot store this head dimension."""
        for store in self._stores():
            store.codec.check_head_dim(head_dim, store.name)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.check_head_dim(key_states.shape[-1])
        device = key_states.device
        if self.backend == "cpu" and device.type != "cpu":
            raise RuntimeError(f"layer {self.layer_idx}: kernels='cpu' needs CPU tensors (the states are on "
                               f"{device}); use kernel='triton' or 'torch'")
        if self.backend == "triton" and not gpu_kernels.usable_on(device):
            raise RuntimeError(f"layer {self.layer_idx}: kernels=True needs CUDA tensors and Triton "
                               f"(the states are on {device}); use kernel='torch'")
        super().lazy_initialization(key_states, value_states)  # exact window and sinks, in `exact_dtype`
        for store in self._stores():  # `exact:dtype=model` holds the model's dtype
            for s in getattr(store, "groups", None) and [g for _, g in store.groups] or [store]:
                if isinstance(s.codec, ExactCodec) and s.codec.dtype == "model":
                    s.codec = dataclasses.replace(s.codec, dtype=str(self.dtype).removeprefix("torch."))
        if self.backend == "triton":  # grouped codes are quantized and packed on the GPU (the same bits)
            for store in (self.key_store, self.value_store):
                if isinstance(store.codec, GroupCodec):
                    store.encoder = gpu_kernels.quantize_pack
        if self.scored:
            b, h = key_states.shape[:2]
            self.positions = torch.zeros((b, h, 0), dtype=torch.int32, device=device)
            self.scores = torch.zeros((b, h, 0), dtype=torch.float32, device=device)
            self.low_positions = self.positions.clone()

    def _check(self, name: str, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"layer {self.layer_idx}: {name} must be [batch, heads, tokens, head_dim], got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).nonzero()[0].tolist()
            raise ValueError(
                f"layer {self.layer_idx}: {name} contain NaN or Inf (first at [batch, head, token, channel] = {bad}); "
                "a compressed cache cannot store non-finite values"
            )

    def _check_finite(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """`_check` both, through one sum each first: a sum is finite only if every element is (an inf or NaN makes
        it inf or NaN), so the elementwise check with its error runs only when a sum is not (bad input, or finite
        values whose sum overflows)."""
        if not (key_states.dim() == 4 and value_states.dim() == 4 and math.isfinite(key_states.sum().item())
                and math.isfinite(value_states.sum().item())):
            self._check("key_states", key_states)
            self._check("value_states", value_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.scored:
            return self._update_scored(key_states, value_states)
        if self.backend in ("cpu", "triton") and key_states.shape[-2] <= MAX_QUERY_TOKENS:
            # on a GPU no finiteness check here: it would stop the GPU at every layer of every step; `_flush` checks
            # each block before it is compressed (a non-finite value in the exact window harms no stored code). On
            # the CPU the check is cheap (made as the step joins the window, or one sum per tensor first), so bad
            # input is refused before anything is written.
            joined = None
            if self.backend == "cpu":  # checked and joined to the window in one native call where it can
                if self.is_initialized:
                    joined = cpu_kernel.append_finite(self.keys, self.values, key_states, value_states)
                if joined is None:
                    self._check_finite(key_states, value_states)
            self._begin_update(key_states, value_states)
            self._take(key_states, value_states, joined)
            self._hand_over(self.keys)  # answered by attend(), which then compresses what left the window
            return self.keys, self.values
        if self.backend == "rotated" and self.is_initialized and self.key_store.tokens:
            return self._update_rotated(key_states, value_states)
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
        self._take(key_states, value_states)
        self._flush()
        if self.sliding_window is not None:
            self._forget_outside_window()
        return out_k, out_v

    def attend(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor | None:
        """This step's attention, answered by the layer (kvshrink's attention function calls it)."""
        self._begin_attend()
        if self.scored:
            return self._attend_scored(query, mask, scaling)
        if self.backend == "rotated":
            return self._attend_rotated(query, mask, scaling)
        return self._attend_kernel(query, mask, scaling)

    # -- storing what left the window -----------------------------------------------------------------------------
    def _flush(self) -> None:
        n = self._leaving()
        if n == 0:
            return
        if self.backend == "triton":  # on the CPU every token was checked as it entered (update)
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
        from_store = min(excess, self.key_store.tokens) // self.block * self.block
        self.key_store.drop_front(from_store)
        self.value_store.drop_front(from_store)
        excess -= from_store
        if excess > 0 and self.key_store.tokens == 0:
            self._drop_front(excess)

    def _stored(self) -> int:
        return self.key_store.tokens

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    # -- decode backends reading the codes ------------------------------------------------------------------------
    def _attend_kernel(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention of this step's queries [B, HQ, Q, D] over everything held, read packed by the kernel."""
        sinks = self.sink_keys.shape[-2]
        index = self._exact_positions(sinks, self.key_store.tokens, self.keys.shape[-2], query.device)
        extra = {"qdot": self.qdot} if self.backend == "cpu" else {}
        attention = cpu_kernel.packed_attention if self.backend == "cpu" else gpu_kernels.packed_attention
        keys, values = self.keys, self.values
        if sinks:
            keys, values = torch.cat([self.sink_keys, keys], -2), torch.cat([self.sink_values, values], -2)
        out = attention(query, self.key_store, self.value_store, keys, values, index, sinks, mask=attention_mask,
                        scaling=scaling, **extra)
        self._flush()  # as on the PyTorch path: this step attended its tokens exactly, now they may be compressed
        if self.sliding_window is not None:
            self._forget_outside_window()
        return out

    def _exact_positions(self, sinks: int, stored: int, window: int, device: torch.device) -> torch.Tensor:
        """The key positions of the exact tokens [sinks + window] (int32): the sinks', then the window's after the
        stored tokens; a slice of a tensor shared by every step and layer with these counts (`_positions`)."""
        length = max(window, self.window + self.block + MAX_QUERY_TOKENS)
        return _positions(sinks, stored, length, str(device))[:sinks + window]

    def _update_rotated(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """A decoding step over rotated codes: what it attends is gathered here, answered by `attend`."""
        self._check("key_states", key_states)
        self._check("value_states", value_states)
        self._begin_update(key_states, value_states)
        cast = lambda t: t.float()  # noqa: E731
        # what this step attends, in key order: sinks, stored (rotated), window, this step's tokens
        self._step = (cast(self.sink_keys), cast(self.sink_values), decode_rotated(self.key_store),
                      decode_rotated(self.value_store), torch.cat([cast(self.keys), cast(key_states)], -2),
                      torch.cat([cast(self.values), cast(value_states)], -2))
        self._take(key_states, value_states)
        self._flush()
        if self.sliding_window is not None:
            self._forget_outside_window()
        self._hand_over(key_states)
        return key_states, value_states

    def _attend_rotated(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """The query rotated once per KV head scores the stored keys in the rotated space ((R q).(R k) = q.k); the
        weighted sum of stored values stays rotated and is rotated back once per query head."""
        ks, vs, k_rot, v_rot, kw, vw = self._step
        self._step = None
        q = query.float()
        b, hq, ql, d = q.shape
        h = kw.shape[1]
        if hq % h:
            raise ValueError(f"layer {self.layer_idx}: {hq} query heads for {h} KV heads")
        rep = hq // h
        grow = lambda t: t.repeat_interleave(rep, 1)  # noqa: E731
        kc = self.key_codec
        q_rot = q if not kc.rotate else fwht(q * kc.signs(self.key_store, h, d).repeat_interleave(rep, 0)[
            None, :, None, :].to(q.device))
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
        vc = self.value_codec
        if vc.rotate:
            stored = unrotate(stored, vc.signs(self.value_store, h, d).repeat_interleave(rep, 0))
        out = p[..., :n_sink] @ grow(vs) + stored + p[..., n_sink + n_mid:] @ grow(vw)
        return out.to(query.dtype)

    # -- scored layers: a policy keeps a budget of tokens ---------------------------------------------------------
    def _update_scored(self, key_states: torch.Tensor, value_states: torch.Tensor):
        if self.probing:
            return self._update_probe(key_states, value_states)
        if self.awaiting_keep:
            raise RuntimeError(
                f"layer {self.layer_idx}: the prompt is held whole until a scoring pass decides how many tokens stay "
                f"({self.policy.name}'s pass runs after the prefill, from the forward hook that make_cache(model, ...) "
                "installs); a new step cannot come first. Prefill through the model itself (not a replayed prefill)")
        self._begin_update(key_states, value_states)
        b, h, t, _ = key_states.shape
        pos = torch.arange(self.seen, self.seen + t, dtype=torch.int32, device=key_states.device)
        self._given = (key_states, value_states)  # the policy may read them (ScoreContext.given) until attend
        self._take(key_states, value_states)
        if self.kept_bits is None:  # packed: every position from prompt_end on is held
            self.positions = torch.cat([self.positions, pos.expand(b, h, t)], -1)
        if self.scores is not None:  # None: freed after the prompt's eviction (scores="free")
            self.scores = torch.cat([self.scores, self.scores.new_zeros(b, h, t)], -1)
        if self.calls == 0:  # the prefill attends over exactly the states it computed (plain SDPA, see attend)
            self._hand_over(key_states)
            return key_states, value_states
        keys = self.keys if self.keys.dtype == self.dtype else self.keys.to(self.dtype)
        self._hand_over(keys)  # what attention receives is never read: the layer answers the call
        return keys, (self.values if self.values.dtype == self.dtype else self.values.to(self.dtype))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.scored:
            return self.seen + _query_length(query_length), 0  # masks by position; the layer gathers what it holds
        return super().get_mask_sizes(query_length)

    def held(self) -> int:
        if not self.is_initialized:
            return 0
        low = self.low_positions.shape[-1] if self.scored else 0
        return self.sink_keys.shape[-2] + self.key_store.tokens + self.keys.shape[-2] + low

    def held_states(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of the kept tokens in the order they are held (sinks, stored, window), in `dtype`, the
        stored ones decoded; what a decoding step attends over besides the low tier."""
        parts_k = [self.sink_keys, self.key_store.decode(dtype), self.keys]
        parts_v = [self.sink_values, self.value_store.decode(dtype), self.values]
        return (torch.cat([x.to(dtype) for x in parts_k if x is not None], -2),
                torch.cat([x.to(dtype) for x in parts_v if x is not None], -2))

    def _held_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(keys, values, positions) of the low tier then the kept tokens in position order (sinks, stored,
        window), float32, and the low tier's length."""
        k, v = self.held_states(torch.float32)
        p = kept = self.held_positions()
        if self.low_keys is not None and self.low_keys.tokens:
            k = torch.cat([self.low_keys.decode(torch.float32), k], -2)
            v = torch.cat([self.low_values.decode(torch.float32), v], -2)
            p = torch.cat([self.low_positions, p], -1)
        return k, v, p, p.shape[-1] - kept.shape[-1]

    @property
    def packs_positions(self) -> bool:
        """positions="bits" applies: a layer with a low tier keeps int32 positions (its low tier's are interleaved
        with the kept ones); kvzip's byte model (`layer_bytes`) asks too."""
        return self.pack_positions and self.low_keys is None

    def held_positions(self) -> torch.Tensor:
        """The kept tokens' positions [B, H, N] int32, in the order they are held (read from the bitmask and the
        tail after the prompt when packed, positions="bits")."""
        if self.kept_bits is None:
            return self.positions
        b, h = self.kept_bits.shape[:2]
        shifts = torch.arange(8, dtype=torch.uint8, device=self.kept_bits.device)
        kept = ((self.kept_bits[..., None] >> shifts) & 1).reshape(b, h, -1)[..., :self.prompt_end].bool()
        prompt = kept.nonzero()[:, 2].to(torch.int32).reshape(b, h, -1)  # every head keeps the same count
        tail = torch.arange(self.prompt_end, self.seen, dtype=torch.int32, device=prompt.device)
        return torch.cat([prompt, tail.expand(b, h, -1)], -1)

    def _update_probe(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """A scoring pass's step: its tokens are attended (by `attend`) after the held ones, and never kept."""
        self._begin_update(key_states, value_states)
        self._probe = (key_states, value_states)
        self._hand_over(key_states)
        return key_states, value_states

    def _attend_scored(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor | None:
        """Attention output of a decoding step; None at the prefill, whose attention is plain SDPA over the
        prompt's exact states (nothing is evicted before it), so that only the scores are computed here."""
        if self._probe is not None:
            ctx = ScoreContext(self, query, mask, scaling, False, probe=self._probe)
            self._probe = None
            out = ctx.output
            self.scores = self.policy.score(ctx)
            return out
        if self.scores is None:  # freed (scores="free"): nothing is scored or evicted again
            self._given = None
            self.calls += 1
            plain = self.low_keys is None and self._logit_bias() is None  # else the general path, unscored
            out = self._attend_settled(query, mask, scaling) if plain else self.attention(query, mask, scaling,
                                                                                          needs=())[0]
            self._settle()
            return out
        prefill = self.calls == 0
        ctx = ScoreContext(self, query, mask, scaling, prefill, self._given)
        self._given = None
        out = ctx.output if not prefill else None
        self.calls += 1
        if not prefill and self.generated == "budget":
            self._hold_generated(ctx.received["last"], query.shape[-2])
            return out
        self.scores = self.policy.score(ctx)
        if prefill and self.defer_eviction:
            self.awaiting_keep = True  # held whole (exact, in the window) until `_evict(keep)`
        elif prefill or self.policy.evicts_while_decoding:
            self._evict()
        else:
            self._settle()
        return out

    def _attend_settled(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """A step after the prompt's eviction whose scores were freed: plain attention over what the layer holds,
        through SDPA (the query heads sharing a KV head read it once), masked by the held tokens' positions, no
        attention statistics (nothing reads them). In float32, as the scored path computes: in bf16 the answers of
        a Qwen RULER prompt changed (a UUID needle lost), so freeing the scores changes bytes, not answers."""
        k, v, pos, _ = self._held_tokens()  # no low tier here (see attend)
        b, hq, ql, _ = query.shape
        h, pos = k.shape[1], pos.long()
        if hq % h:
            raise ValueError(f"layer {self.layer_idx}: {hq} query heads for {h} KV heads")
        if mask is None:  # causal by position
            qpos = torch.arange(self.seen - ql, self.seen, device=query.device)
            allowed = pos[:, :, None, :] <= qpos[None, None, :, None]
        else:
            m = mask.expand(b, h, -1, -1) if mask.shape[1] == 1 else mask[:, ::hq // h]
            allowed = m.gather(-1, pos[:, :, None, :].expand(-1, -1, m.shape[-2], -1))
            if allowed.dtype != torch.bool:
                allowed = allowed.float()
        allowed = allowed.repeat_interleave(hq // h, 1)
        out = torch.nn.functional.scaled_dot_product_attention(query.float(), k, v, attn_mask=allowed,
                                                               scale=scaling, enable_gqa=True)
        return out.nan_to_num(0.0).to(query.dtype)

    def attention(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, outputs: bool = True,
                  needs: tuple[str, ...] = ("all", "observed", "last"),
                  extra: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Attention output [B, Hq, q, d] (None without `outputs`) and the attention each held token received,
        per KV head ("all" queries, the last `observe` ones, the "last" one, averaged over the query heads sharing
        it; "max": the largest from any query and any of those heads, when asked for), over what the layer holds.
        `extra`: a scoring pass's own keys and values, attended after the held tokens (at the positions after
        `seen`) and given no score."""
        k, v, pos, n_low = self._held_tokens()
        n_held = pos.shape[-1]
        b, hq, ql, _ = query.shape
        h = k.shape[1]
        q_first = self.seen - ql  # the queries' first position
        if extra is not None:
            k, v = torch.cat([k, extra[0].float()], -2), torch.cat([v, extra[1].float()], -2)
            new = torch.arange(self.seen, self.seen + extra[0].shape[-2], dtype=pos.dtype, device=pos.device)
            pos = torch.cat([pos, new.expand(b, h, -1)], -1)
            q_first = self.seen
        if hq % h:
            raise ValueError(f"layer {self.layer_idx}: {hq} query heads for {h} KV heads")
        rep = hq // h
        n = pos.shape[-1]
        # held in position order from 0 without a gap (strictly increasing per head): the mask's first n columns
        in_order = n_low == 0 and bool((pos[..., -1] == n - 1).all())
        if extra is not None and outputs and set(needs) == {"max"} and in_order:
            fast = self._probe_attention(query, mask, scaling, k, v, n_held)
            if fast is not None:
                return fast
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        pos_q = pos.repeat_interleave(rep, 1).long()  # [B, Hq, T]
        bias = self._logit_bias()
        if bias is not None:
            bias = bias.repeat_interleave(rep, 1)[:, :, None, :]
        in_order = in_order and mask is not None
        q = query.float()
        out = torch.empty(b, hq, ql, v.shape[-1], dtype=torch.float32, device=q.device) if outputs else None
        got_all = q.new_zeros(b, hq, pos.shape[-1])
        got_obs = q.new_zeros(b, hq, pos.shape[-1])
        got_last = None
        got_max = q.new_zeros(b, hq, pos.shape[-1]) if "max" in needs else None
        # scoring only (a prefill): the queries the policy reads, not the whole prompt
        begin = 0 if outputs or "all" in needs else ql if not needs else max(ql - self.observe, 0)
        if begin == ql:
            got_last = q.new_zeros(b, hq, pos.shape[-1])
        for start in range(begin, ql, _QUERY_BLOCK):
            stop = min(start + _QUERY_BLOCK, ql)
            s = (q[:, :, start:stop] @ k.transpose(-1, -2)) * scaling
            if bias is not None:
                s = s + bias
            if mask is not None:
                m = mask[:, :, start:stop]
                allowed = m[..., :n] if in_order else m.expand(b, hq, -1, -1).gather(
                    -1, pos_q[:, :, None, :].expand(-1, -1, stop - start, -1))
                s = s.masked_fill(~allowed, float("-inf")) if allowed.dtype == torch.bool else s + allowed.float()
            else:
                qpos = torch.arange(q_first + start, q_first + stop, device=q.device)
                s = s.masked_fill(pos_q[:, :, None, :] > qpos[None, None, :, None], float("-inf"))
            p = torch.softmax(s, -1).nan_to_num(0.0)
            if outputs:
                out[:, :, start:stop] = p @ v
            if "all" in needs:
                got_all += p.sum(2)
            if got_max is not None:
                got_max = torch.maximum(got_max, p.amax(2))
            first_obs = max(ql - self.observe, start)
            if first_obs < stop and "observed" in needs:
                got_obs += p[:, :, first_obs - start:].sum(2)
            if stop == ql:
                got_last = p[:, :, -1]
        received = {name: got[..., n_low:n_held].reshape(b, h, rep, -1).mean(2)
                    for name, got in (("all", got_all), ("observed", got_obs), ("last", got_last))}
        if got_max is not None:
            received["max"] = got_max[..., n_low:n_held].reshape(b, h, rep, -1).amax(2)
        if self.policy.per_layer:  # one score per token for the layer: the mean over every KV head (every rank's)
            every = gather_heads(self.shard, torch.stack(list(received.values())), dim=2)
            received = {name: m.mean(1, keepdim=True).expand(b, h, -1) for name, m in zip(received, every)}
        return (out.to(query.dtype) if outputs else None), received

    def _probe_attention(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, k: torch.Tensor,
                         v: torch.Tensor, n_held: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """`attention` for a scoring pass that reads only "max" (KVzip's reconstruction) over held tokens in position
        order without a low tier (the caller checks), or None where this path does not apply (not on the CPU, a
        logit bias, or a mask other than "every held token, and the pass causally"). PyTorch's fused CPU attention, which also returns each
        query's log-sum-exp, runs twice without a mask (over the held tokens; over the pass's own tokens, causal)
        and the two are merged by their log-sum-exps; a held token's largest probability is exp(max over queries of
        score - log-sum-exp), from one more product over the held keys. Per KV head, its query heads in turn: no
        key or value is repeated. The same numbers as the general path up to float rounding (tests/test_kvzip.py).
        """
        if query.device.type != "cpu" or self._logit_bias() is not None or _FLASH_CPU is None:
            return None
        b, hq, ql, d = query.shape
        h, n = k.shape[1], k.shape[-2]
        rep = hq // h
        if mask is not None:  # the pass must see every held token, and itself causally: nothing else is handled
            if mask.dim() != 4 or mask.shape[-1] < n or mask.shape[-2] != ql or n - n_held != ql:
                return None
            cols = mask[..., :n] if mask.dtype == torch.bool else mask[..., :n] == 0
            causal = torch.ones(ql, ql, dtype=torch.bool).tril()
            if not (bool(cols[..., :n_held].all()) and bool((cols[..., n_held:] == causal).all())):
                return None
        elif n - n_held != ql:
            return None
        q = query.float()
        kh, vh = k[:, :, :n_held].contiguous(), v[:, :, :n_held].contiguous()
        kp, vp = k[:, :, n_held:].contiguous(), v[:, :, n_held:].contiguous()
        held_t = kh.reshape(b * h, n_held, d).transpose(-1, -2)
        out = torch.empty(b, hq, ql, d, dtype=torch.float32)
        best = torch.full((b, h, n_held), float("-inf"))
        for r in range(rep):
            qr = q[:, r::rep].contiguous()  # each KV head's r-th query head: [B, H, q, D]
            o_pass, lse_pass = _FLASH_CPU(qr, kp, vp, 0.0, True, scale=scaling)  # the pass over itself, causal
            for start in range(0, ql, _QUERY_BLOCK):
                stop = min(start + _QUERY_BLOCK, ql)
                qb = qr[:, :, start:stop]
                o_held, lse_held = _FLASH_CPU(qb, kh, vh, 0.0, False, scale=scaling)  # every held token
                o_own, lse_own = o_pass[:, :, start:stop], lse_pass[:, :, start:stop]
                lse = torch.logaddexp(lse_held, lse_own)
                out[:, r::rep, start:stop] = (o_held * (lse_held - lse).exp()[..., None]
                                              + o_own * (lse_own - lse).exp()[..., None])
                logp = torch.baddbmm(-lse.reshape(b * h, -1, 1), (qb * scaling).reshape(b * h, -1, d), held_t)
                best = torch.maximum(best, logp.amax(1).reshape(b, h, n_held))
        got = best.exp()
        if self.policy.per_layer:
            got = gather_heads(self.shard, got).mean(1, keepdim=True).expand(b, h, -1)
        return out.to(query.dtype), {"max": got}

    def _logit_bias(self) -> torch.Tensor | None:
        """A term [B, H, T] added to every query's logits over the held tokens (in `_held_tokens` order), or None:
        a token standing for several (a compensation token) adds the log of their count."""
        return None

    def ranked_candidates(self) -> tuple[torch.Tensor, int]:
        """(the policy's rank [B, H, N] of the tokens eviction may drop now: stored ones then those leaving the
        window; the count of held tokens it may not: sinks and window). What a per-head allocation reads."""
        n_sink, n_store = self.sink_keys.shape[-2], self.key_store.tokens
        n_cand = n_store + max(self.keys.shape[-2] - self.window, 0)
        cand = slice(n_sink, n_sink + n_cand)
        rank = self.policy.rank(self.scores[..., cand], self.positions[..., cand], self.seen)
        return rank, self.positions.shape[-1] - n_cand

    def budget_tokens(self) -> int:
        """How many tokens stay (exact or stored) now."""
        keep = self.tokens if self.tokens else math.ceil(self.budget * self.seen)
        return max(keep, min(self.seen, self.sinks + self.window))

    def _evict(self, keep: int | None = None) -> None:
        """Keep the best-ranked tokens between the protected sinks and window, stored by the codec; the others
        go to the low tier or are dropped. `keep`: the tokens to hold (default: `budget_tokens()`)."""
        self.awaiting_keep = False
        n_sink, n_store = self.sink_keys.shape[-2], self.key_store.tokens
        leaving = max(self.keys.shape[-2] - self.window, 0)  # window tokens old enough to be ranked
        keep = self.budget_tokens() if keep is None else keep
        held = self.positions.shape[-1]
        if held <= keep:
            self._settle()
            self._after_prompt_eviction()
            return
        # candidates: the stored tokens then the ones leaving the window, in position order
        n_cand = n_store + leaving
        cand = slice(n_sink, n_sink + n_cand)
        room = keep - (held - n_cand)  # what the candidates may keep
        rank = self.policy.rank(self.scores[..., cand], self.positions[..., cand], self.seen)
        if self.policy.per_layer:  # the same tokens in every head: rank by the head-mean score
            rank = gather_heads(self.shard, rank).mean(1, keepdim=True).expand_as(rank)
        kept, gone = self.policy.choose(rank, room)
        if n_store == 0 or self.low_keys is not None:
            cand_k, cand_v = self._candidates(leaving)
        if self.low_keys is not None:
            idx = gone[..., None].expand(-1, -1, -1, cand_k.shape[-1])
            self.low_keys.append(cand_k.gather(2, idx))
            self.low_values.append(cand_v.gather(2, idx))
            self.low_positions = torch.cat([self.low_positions, self.positions[..., cand].gather(2, gone)], -1)
        if n_store == 0:  # the first eviction: the kept ones are coded, whole units of the codecs
            in_store = room // self.block * self.block
            idx = kept[..., :in_store, None].expand(-1, -1, -1, cand_k.shape[-1])
            self.key_store.append(cand_k.gather(2, idx))
            self.value_store.append(cand_v.gather(2, idx))
            rest = kept[..., in_store:, None].expand(-1, -1, -1, cand_k.shape[-1])  # stay exact, at the window's front
            self.keys = torch.cat([cand_k.gather(2, rest), self.keys[:, :, leaving:]], -2)
            self.values = torch.cat([cand_v.gather(2, rest), self.values[:, :, leaving:]], -2)
        else:  # one token at a time (policies that evict while decoding store per token): code the newcomers,
            # then keep the chosen ones: each coded token is coded once
            self.key_store.append(self.keys[:, :, :leaving])
            self.value_store.append(self.values[:, :, :leaving])
            self._drop_front(leaving)
            self.key_store.select(kept)
            self.value_store.select(kept)
        keep_idx = torch.cat([torch.arange(n_sink, device=kept.device).expand(*kept.shape[:2], -1), kept + n_sink,
                              torch.arange(n_sink + n_cand, held, device=kept.device).expand(*kept.shape[:2], -1)],
                             -1)
        self.positions, self.scores = self.positions.gather(2, keep_idx), self.scores.gather(2, keep_idx)
        self._after_prompt_eviction()

    def _after_prompt_eviction(self) -> None:
        """scores="free": a prompt-only policy never reads its scores again once the prompt is evicted; with
        positions="bits" the kept prompt positions become a bitmask (see packs_positions)."""
        if self.free_scores:
            self.scores = None
        if self.packs_positions:
            b, h, _ = self.positions.shape
            n = self.seen
            kept = torch.zeros((b, h, -(-n // 8) * 8), dtype=torch.uint8, device=self.positions.device)
            kept.scatter_(2, self.positions.long(), 1)
            shifts = torch.arange(8, dtype=torch.uint8, device=kept.device)
            self.kept_bits = (kept.reshape(b, h, -1, 8) << shifts).sum(-1).to(torch.uint8)
            self.prompt_end, self.positions = n, None

    def _hold_generated(self, heard: torch.Tensor, steps: int) -> None:
        """generated=budget, after a decoding step: add the attention `heard` [B, H, T] each held token got from the
        step's last query to its score (the prompt's scores are done with: they restart at the first step); once
        `chunk` tokens (past the few kept ones still waiting for a whole unit) have left the window, keep the
        budget's share of those that left, ranked by attention received per query since they arrived: whole codec
        units of them (the oldest) are stored, the rest wait exact at the window's front and are ranked again with
        the next chunk; the others are dropped (or sent to the low tier)."""
        if self.decode_from is None:
            self.decode_from = self.seen - steps
            self.prompt_held = self.positions.shape[-1] - steps
            self.scores = torch.zeros_like(self.scores)
        self.scores = self.scores + heard
        leaving = max(self.keys.shape[-2] - self.window, 0)
        if leaving < self.chunk + self.block - 1:  # fewer than `block` kept ones wait from the last time
            return
        n_sink, n_store = self.sink_keys.shape[-2], self.key_store.tokens
        held = self.positions.shape[-1]
        start = n_sink + n_store  # the leaving tokens: the window's oldest, right after the stored ones
        # what the prompt kept stays (a head or layer given more of the prompt by a shared ranking keeps it), and the
        # generated tokens get the budget's share of their own count; a fixed `tokens` count is the whole cache's
        keep = self.budget_tokens() if self.tokens else \
            self.prompt_held + math.ceil(self.budget * (self.seen - self.decode_from))
        room = min(max(keep - (held - leaving), 0), leaving)
        cand = slice(start, start + leaving)
        pos = self.positions[..., cand]
        rank = self.scores[..., cand] / (self.seen - pos.clamp_min(self.decode_from)).clamp_min(1).float()
        if self.policy.per_layer:
            rank = gather_heads(self.shard, rank).mean(1, keepdim=True).expand_as(rank)
        kept, gone = Policy.choose(self.policy, rank, room)
        lk, lv = self.keys[:, :, :leaving], self.values[:, :, :leaving]
        d = lk.shape[-1]
        if self.low_keys is not None and gone.shape[-1]:
            idx = gone[..., None].expand(-1, -1, -1, d)
            self.low_keys.append(lk.gather(2, idx))
            self.low_values.append(lv.gather(2, idx))
            self.low_positions = torch.cat([self.low_positions, pos.gather(2, gone)], -1)
        stored = room // self.block * self.block
        if stored:
            idx = kept[..., :stored, None].expand(-1, -1, -1, d)
            self.key_store.append(lk.gather(2, idx))
            self.value_store.append(lv.gather(2, idx))
        rest = kept[..., stored:, None].expand(-1, -1, -1, d)  # wait exact, in position order, before the window
        self.keys = torch.cat([lk.gather(2, rest), self.keys[:, :, leaving:]], -2)
        self.values = torch.cat([lv.gather(2, rest), self.values[:, :, leaving:]], -2)
        b, h = kept.shape[:2]
        keep_idx = torch.cat([torch.arange(start, device=kept.device).expand(b, h, -1), kept + start,
                              torch.arange(start + leaving, held, device=kept.device).expand(b, h, -1)], -1)
        self.positions, self.scores = self.positions.gather(2, keep_idx), self.scores.gather(2, keep_idx)

    def _candidates(self, leaving: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored tokens (decoded) then the ones leaving the window, in the window's dtype."""
        k, v = self.key_store.decode(self.keys.dtype), self.value_store.decode(self.values.dtype)
        lk, lv = self.keys[:, :, :leaving], self.values[:, :, :leaving]
        return (torch.cat([k, lk], -2) if k is not None else lk), (torch.cat([v, lv], -2) if v is not None else lv)

    def crop(self, tokens_to_remove: int) -> None:
        if self.scored:
            raise NotImplementedError(f"layer {self.layer_idx}: {self.kind} cache cannot be cropped")
        super().crop(tokens_to_remove)

    def _settle(self) -> None:
        """No eviction: window tokens beyond the window move to the stores in whole blocks."""
        n = self._leaving()
        if n:
            self.key_store.append(self.keys[:, :, :n])
            self.value_store.append(self.values[:, :, :n])
            self._drop_front(n)

    # -- reporting ----------------------------------------------------------------------------------------------
    def parts(self) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {p: [] for p in PARTS}
        for store in self._stores():
            for part, t in store.tensors():
                out[part].append(t)
        if self.scored and self.is_initialized:
            out["positions"].extend(t for t in (self.positions, self.kept_bits, self.low_positions, self.scores)
                                    if t is not None)
        return self._exact_parts(out)

    def describe(self) -> dict[str, Any]:
        k, v = self.key_codec, self.value_codec
        kb, vb = getattr(k, "bits", 16), getattr(v, "bits", 16)
        out = {"bits": f"{kb}/{vb}", "key": k.describe(), "value": v.describe(), "window": self.window,
               "sinks": self.sinks}
        if self.scored:
            budget = f"{self.tokens} tokens" if self.tokens else f"{self.budget:.0%} of tokens"
            low = f", evicted at {getattr(self.low_codecs[0], 'bits', 16)} bits" if self.low_codecs else ""
            kept = "" if isinstance(k, ExactCodec) else f", kept as {kb}/{vb}-bit {k.name}"
            held = ", generated tokens too" if self.generated == "budget" else ""
            out["bits"] = f"{self.policy.name}: {budget}{held}{kept}{low}"
            out["kept"] = 0 if not self.is_initialized else self.held_positions().shape[-1]
            out["low"] = 0 if self.low_positions is None else self.low_positions.shape[-1]
        return out

    # -- batch operations and saving ------------------------------------------------------------------------------
    _batch_tensors = ("keys", "values", "sink_keys", "sink_values", "positions", "scores", "low_positions",
                      "kept_bits")
    _batch_stores = ("key_store", "value_store", "low_keys", "low_values")
    _state_counts = ("seen", "calls")
    _optional_counts = ("decode_from", "prompt_held", "prompt_end")

    def load_state_dict(self, tensors: dict[str, torch.Tensor], counts: dict[str, Any]) -> None:
        super().load_state_dict(tensors, counts)
        if self.scored and self.is_initialized and "scores" not in tensors:  # saved after they were freed
            self.scores = None
        if self.scored and self.is_initialized and "kept_bits" in tensors:  # saved packed
            self.positions = None
