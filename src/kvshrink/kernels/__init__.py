"""GPU kernels over the packed cache (Triton), beside their PyTorch references.

- `quantize_pack(x, spec, channel_mean)`: a block of 16/32-bit keys or values to a store's packed codes, fp16
  scales and zero points and fp16 head mean; the same bits as `codecs.quant.encode_block` (the reference).
- `packed_attention(...)`: attention of a few query tokens over a layer's packed store plus its full-precision
  tokens (sinks, recent window, this step's), flash-decoding style: the store is cut into splits along the context,
  each split dequantizes its codes in registers and keeps a running softmax, and a last kernel merges the splits.
  The reference is `reference.packed_attention`: decode the store, then dense attention.

Triton is optional (`pip install kvshrink[gpu]`); the kernels run on CUDA tensors, or on CPU tensors under
Triton's interpreter (`TRITON_INTERPRET=1`, set before kvshrink is imported), which is how the tests run them.
The CPU counterpart of `packed_attention` (a C++ extension built on first use) is `kernels.cpu.packed_attention`.
"""
from __future__ import annotations

import importlib.util
import math
import os
from functools import lru_cache

import torch

from ..codecs.packing import packed_size
from ..codecs.base import BIT_WIDTHS
from ..codecs.quant import _FP16_MAX, GroupCodec
from ..codecs.rotation import RotationCodec, gaussian_codebook, rotated_problem, unrotate
from ..codecs.store import PagedStore

KERNEL_BITS = BIT_WIDTHS["uniform"]
MAX_QUERY_TOKENS = 16  # decode steps with at most this many query tokens go to the kernel; longer ones (prefill) to SDPA
_CENTERS = {"none": 0, "head": 1, "channel": 2}
_LOG2E = 1.4426950408889634


def available() -> bool:
    """Whether Triton can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (CPU tensors allowed)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable_on(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of `device`."""
    return available() and (torch.device(device).type == "cuda" or interpreting())


def unusable(device: torch.device, codecs: list[tuple[str, object]], head_dim: int,
             insisted: bool = False) -> str | None:
    """Why the Triton kernels cannot decode these (label, codec) pairs for a model on `device`, or None when they
    can: Triton missing, a device that is not CUDA (Triton's interpreter counts only when the caller `insisted` on
    the kernels), or the first codec they do not read."""
    if not available():
        return "Triton is not installed (pip install 'kvshrink[gpu]')"
    if torch.device(device).type != "cuda" and not (insisted and interpreting()):
        return f"the model is on {device}, not CUDA"
    return next((f"{label}: {reason}" for label, codec in codecs if (reason := unsupported(codec, head_dim))), None)


def unsupported(spec, head_dim: int) -> str | None:
    """Why the kernels cannot serve this codec's layout, or None when they can: the `grouped` layout, and the
    `rotated` codec's (Lloyd-Max codes with their norms, fp8 with a scale, uniform groups, rotated fp16: the query
    turns once per KV head, the output turns back once)."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim must be a power of two >= 16 for the kernels, got {head_dim}"
    if isinstance(spec, RotationCodec):
        if spec.quantizer != "uniform" or spec.bits == 16:
            return None
        spec = GroupCodec(spec.bits, spec.group, "token")  # uniform groups of rotated channels: the grouped layout
    if not isinstance(spec, GroupCodec):
        return f"the {getattr(spec, 'name', type(spec).__name__)} codec has no GPU kernel yet"
    if spec.bits not in KERNEL_BITS:
        return f"bits must be one of {KERNEL_BITS} for the kernels, got {spec.bits}"
    if spec.bits == 16:
        return None
    per_word = 8 if spec.bits == 3 else 8 // spec.bits
    g = spec.group
    if g & (g - 1):
        return f"group must be a power of two for the kernels, got {g}"
    if spec.axis == "token" and (g % per_word or g > head_dim):
        return (f"per-token groups of {spec.bits}-bit codes must be a multiple of {per_word} codes and at most "
                f"head_dim={head_dim} for the kernels, got group={g}")
    return None


@lru_cache(maxsize=1)
def _triton():
    if not available():
        raise RuntimeError("the GPU kernels need Triton: pip install 'kvshrink[gpu]' (or pip install triton)")
    from . import triton_kernels

    return triton_kernels


def _check_device(t: torch.Tensor, what: str) -> None:
    if not usable_on(t.device):
        raise RuntimeError(f"{what} is on {t.device}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")


def quantize_pack(x: torch.Tensor, spec: GroupCodec, channel_mean: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`codecs.quant.encode_block` on the GPU: (codes, scale, zero, head mean) for x [B, H, T, D], same bits."""
    tk = _triton()
    _check_device(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, heads, tokens, head_dim], got {tuple(x.shape)}")
    b, h, t, d = x.shape
    why = unsupported(spec, d)
    if why:
        raise ValueError(why)
    if spec.axis == "channel" and spec.bits != 16 and t % spec.group:
        raise ValueError(f"{t} tokens is not a multiple of the group of {spec.group} tokens")
    if spec.center == "channel":
        if channel_mean is None:
            raise ValueError("center='channel' needs the channel mean of the first block")
        channel_mean = channel_mean.to(torch.float16).contiguous()
    x = x.contiguous()
    dev = x.device
    head_mean = torch.empty((b, 1, t, d), dtype=torch.float16, device=dev) if spec.center == "head" else None
    token_axis = spec.axis == "token"
    if spec.bits == 16:
        codes, scale, zero = torch.empty((b, h, t, d), dtype=torch.float16, device=dev), None, None
    elif token_axis:
        ng = d // spec.group
        codes = torch.empty((b, h, t, ng, packed_size(spec.group, spec.bits)), dtype=torch.uint8, device=dev)
        scale = torch.empty((b, h, t, ng, 1), dtype=torch.float16, device=dev)
        zero = torch.empty_like(scale)
    else:
        codes = torch.empty((b, h, t // spec.group, spec.group, packed_size(d, spec.bits)), dtype=torch.uint8,
                            device=dev)
        scale = torch.empty((b, h, t // spec.group, 1, d), dtype=torch.float16, device=dev)
        zero = torch.empty_like(scale)
    if t:
        tb = spec.group if (spec.bits != 16 and not token_axis) else 16
        dummy = codes
        tk._quantize_pack_kernel[(_cdiv(t, tb), b)](
            x, codes, dummy if scale is None else scale, dummy if zero is None else zero,
            dummy if head_mean is None else head_mean, dummy if channel_mean is None else channel_mean,
            t, H=h, D=d, TB=tb, BITS=spec.bits, GROUP=spec.group, TOKEN_AXIS=token_axis,
            CENTER=_CENTERS[spec.center],
            # no fused multiply-adds: (x - zero) * inv then its fraction became one fma, whose unrounded product
            # moved codes at .5 ties (seen on an H200); the reference rounds the product first
            enable_fp_fusion=False)
    if head_mean is not None and not torch.isfinite(head_mean).all():
        raise ValueError(f"the head mean exceeds the fp16 range (|x| > {_FP16_MAX:g})")
    if spec.bits == 16:
        if not torch.isfinite(codes).all():
            raise ValueError(f"a value exceeds the fp16 range (|x| > {_FP16_MAX:g})")
    elif not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        raise ValueError(f"values outside the fp16 range (|x| > {_FP16_MAX:g}) cannot get fp16 scales")
    return codes, scale, zero, head_mean


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


#: the kind of stored row each kernel dispatches on (the C++ and the Triton kernel number them alike)
ROW_KINDS = {"grouped": 0, "lloydmax": 1, "fp8": 2}


def _store_args(store: PagedStore, head_dim: int):
    """(codes, scale, zero, head mean, channel mean, codebook, scale rows, bits, tokens per scale row, channels per
    scale column, center code, kind) of a store, for the split kernel: its declared fields over every page,
    contiguous (the GPU kernel reads one tensor per field; the pages are joined on the device). Rotated Lloyd-Max
    and fp8 rows pass their per-token norms as the scale and (Lloyd-Max) the codebook divided by sqrt(head_dim)."""
    layout = store.layout
    names = {f.name for f in layout.fields}
    codes = store.field("codes").contiguous()
    get = lambda n: codes if n not in names else store.field(n).contiguous()  # noqa: E731
    bits, kind, book = layout.param("bits"), 0, codes
    if layout.kind == "rotated":
        quantizer = layout.param("quantizer")
        if bits != 16 and quantizer != "uniform":
            kind = ROW_KINDS[quantizer]
            if quantizer == "lloydmax":
                book = (gaussian_codebook(bits)[0] / math.sqrt(head_dim)).to(codes.device).contiguous()
            return codes, get("norms"), codes, codes, codes, book, store.tokens, bits, 1, head_dim, 0, kind
        group, axis, center = layout.param("group"), "token", "none"
    else:
        group, axis, center = (layout.param(k) for k in ("group", "axis", "center"))
    if bits == 16:
        gt, gd, rows = 1, head_dim, 0
    elif axis == "token":
        gt, gd, rows = 1, group, store.tokens
    else:
        gt, gd, rows = group, 1, store.tokens // group
    scale, zero, hm = get("scale"), get("zero"), get("head_mean")
    cm = store.state["channel_mean"].contiguous() if "channel_mean" in store.state else codes
    return codes, scale, zero, hm, cm, book, rows, bits, gt, gd, _CENTERS[center], kind


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def packed_attention(query: torch.Tensor, key_store: PagedStore, value_store: PagedStore,
                     exact_keys: torch.Tensor, exact_values: torch.Tensor, exact_index: torch.Tensor,
                     key0: int, mask: torch.Tensor | None = None, scaling: float | None = None,
                     causal: bool = True, block_tokens: int | None = None, splits: int | None = None
                     ) -> torch.Tensor:
    """Attention of query [B, HQ, QN, D] over a packed store and full-precision tokens; returns [B, HQ, QN, D].

    The keys, in order, are: exact tokens whose key index (`exact_index`, int32 [TE]) is below `key0`, then the
    store's tokens (key indices key0 .. key0 + tokens - 1), then the other exact tokens; `exact_keys`/`exact_values`
    are [B, HKV, TE, D]. `mask` (bool, True = attend) is [B, 1, QN, TK] or [B, QN, TK] over those TK key indices;
    without one, `causal` lets query i (of the last QN positions) see key indices up to TK - QN + i.
    block_tokens: tokens dequantized per loop step (default 64, 32 at head dim 256); splits: how many programs
    share the store's tokens of one (sequence, KV head) (default: enough to fill the GPU twice over).
    """
    tk = _triton()
    _check_device(query, "query")
    b, hq, qn, d = query.shape
    hkv = exact_keys.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if qn > MAX_QUERY_TOKENS:
        raise ValueError(f"packed_attention serves at most {MAX_QUERY_TOKENS} query tokens, got {qn}")
    for store in (key_store, value_store):
        why = unsupported(store.codec, d)
        if why:
            raise ValueError(f"{store.name}: {why}")
    if key_store.tokens != value_store.tokens:
        raise ValueError(f"the key store holds {key_store.tokens} tokens but the value store {value_store.tokens}")
    n_rep = hq // hkv
    t_store = key_store.tokens
    te = exact_keys.shape[2]
    tkeys = te + t_store
    scaling = d ** -0.5 if scaling is None else scaling
    # rotated codes are read in their rotated space: the query and the exact tokens turn with them (in float32,
    # the query then rounded back to its dtype), the output turns back once per query head
    rotated = any(isinstance(s.codec, RotationCodec) and s.codec.rotate for s in (key_store, value_store))
    out_dtype = query.dtype
    value_signs = None
    if rotated:
        query, exact_keys, exact_values, value_signs = rotated_problem(query, key_store, value_store, exact_keys,
                                                                       exact_values)
        query = query.to(out_dtype)  # the dots run in the model's dtype, as for unrotated codes
    query = query.contiguous()
    exact_keys, exact_values = exact_keys.contiguous(), exact_values.contiguous()
    exact_index = exact_index.to(device=query.device, dtype=torch.int32).contiguous()
    has_mask = mask is not None
    if has_mask:
        from .reference import check_mask

        mask = check_mask(mask, tkeys, b, qn)
        mask_b, mask_q = mask.stride(0), mask.stride(1)
    else:
        mask, mask_b, mask_q = exact_index, 0, 0
    bq = max(16, 1 << math.ceil(math.log2(max(1, qn * n_rep))))
    bt = block_tokens or (64 if d <= 128 else 32)  # a [BT, D] float32 block per tensor lives in registers
    if splits is None:
        splits = max(1, min(_cdiv(2 * _sm_count(query.device), b * hkv), _cdiv(t_store, bt)))
    per_split = _cdiv(_cdiv(max(t_store, 1), splits), bt) * bt
    n_store = _cdiv(t_store, per_split) if t_store else 0
    n_slots = n_store + 1
    dev = query.device
    m = torch.empty((b * hkv, n_slots, bq), dtype=torch.float32, device=dev)
    l_ = torch.empty_like(m)
    acc = torch.empty((b * hkv, n_slots, bq, d), dtype=torch.float32, device=dev)
    qscale = scaling * _LOG2E
    ieee = query.dtype == torch.float32
    if n_store:
        k = _store_args(key_store, d)
        v = _store_args(value_store, d)
        tk._packed_split_kernel[(n_store, b * hkv)](
            query, *k[:6], *v[:6], mask, m, l_, acc,
            t_store, k[6], v[6], hq, qn, tkeys, mask_q, mask_b, key0, per_split, n_slots, qscale,
            HKV=hkv, D=d, N_REP=n_rep, BQ=bq, BT=bt,
            K_BITS=k[7], K_GT=k[8], K_GD=k[9], K_CENTER=k[10], K_KIND=k[11],
            V_BITS=v[7], V_GT=v[8], V_GD=v[9], V_CENTER=v[10], V_KIND=v[11],
            HAS_MASK=has_mask, CAUSAL=causal and not has_mask and qn > 1, DOT_IEEE=ieee)
    tk._exact_split_kernel[(b * hkv,)](
        query, exact_keys, exact_values, exact_index, mask, m, l_, acc,
        te, hq, qn, tkeys, mask_q, mask_b, n_store, n_slots, qscale,
        HKV=hkv, D=d, N_REP=n_rep, BQ=bq, BT=min(bt, max(16, 1 << math.ceil(math.log2(max(te, 1))))),
        HAS_MASK=has_mask, CAUSAL=causal and not has_mask and qn > 1, DOT_IEEE=ieee)
    out = torch.empty_like(query)
    tk._reduce_kernel[(b * hkv,)](m, l_, acc, out, hq, qn, n_slots, HKV=hkv, D=d, N_REP=n_rep, BQ=bq,
                                  BS=1 << math.ceil(math.log2(n_slots)))
    if value_signs is not None:
        out = unrotate(out, value_signs)
    return out.to(out_dtype)
