"""PyTorch references of the kernels: what each must compute, written the plain way.

`quantize_pack` is `codecs.quant.encode_block` itself (the CPU path of every store). `packed_attention` decodes the
store to full precision, puts the keys back in order and runs dense attention with the same mask rules.
"""
from __future__ import annotations

import torch

from ..codecs.packing import unpack
from ..codecs.quant import GroupCodec, encode_block
from ..codecs.store import PagedStore

quantize_pack = encode_block



def check_mask(mask: torch.Tensor | None, tkeys: int, b: int | None = None, qn: int | None = None
               ) -> torch.Tensor | None:
    """The boolean mask a packed-attention kernel takes, [B, QN, TK] (True = attend), from [B, 1, QN, TK] or
    [B, QN, TK]; a clear error for a mask of another dtype, per-head masks or the wrong number of keys. With `b`
    and `qn`, broadcast to [b, qn, TK] with unit stride along the keys (what the kernels index)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be boolean (True = attend), got {mask.dtype}")
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise ValueError(f"mask must be shared by the heads ([B, 1, QN, TK]), got {tuple(mask.shape)}")
        mask = mask[:, 0]
    if mask.shape[-1] != tkeys:
        raise ValueError(f"mask covers {mask.shape[-1]} keys but the layer holds {tkeys}")
    if b is not None:
        mask = mask.expand(b, qn, tkeys)
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    return mask

def int8_keys(codec) -> bool:
    """Whether `qdot="int8"` changes how keys of this codec are scored: per-channel groups of 2-8 bits without a
    head mean (the groups whose scales the kernel folds into the query)."""
    return isinstance(codec, GroupCodec) and codec.bits != 16 and codec.axis == "channel" and codec.center != "head"


def int8_query(query: torch.Tensor, key_store: PagedStore, scaling: float) -> tuple:
    """The CPU kernel's int8 query, as it computes it: per query row and key group, the folded row q * scale (q in
    float32, times `scaling`) rounded to int8 with the scale a = max|q * scale| / 127. Returns (qi [B, HQ, QN, NG, D]
    float holding integers, a [B, HQ, QN, NG], c0 = q . (zero + channel mean) [B, HQ, QN, NG] in float64, codes
    [B, HKV, NG, G, D] float64)."""
    b, hq, qn, d = query.shape
    f = key_store.fields()
    hkv = f["codes"].shape[1]
    codes = unpack(f["codes"], key_store.codec.bits, d).double()  # [B, HKV, NG, G, D]
    scale, zero = f["scale"][:, :, :, 0].float(), f["zero"][:, :, :, 0].float()  # [B, HKV, NG, D]
    cm = key_store.state.get("channel_mean")
    if cm is not None:
        zero = zero + cm.float()
    rep = hq // hkv
    q = (query.float() * scaling).reshape(b, hkv, rep * qn, 1, d)
    qs = q * scale[:, :, None]  # [B, HKV, R, NG, D]
    amax = qs.abs().amax(-1)
    # 127 / amax as a true division, as the kernel computes it (`127.0 / tensor` is reciprocal-then-multiply in
    # torch, one ulp off at times, which flips a rounding at k + 0.5)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    qi = torch.round(qs * inv[..., None]).clamp(-127, 127)
    a = amax / 127.0
    c0 = (q.double() * zero[:, :, None].double()).sum(-1)
    shape = (b, hq, qn, -1)
    return qi.reshape(*shape, d), a.reshape(shape), c0.reshape(shape), codes


def _int8_scores(query: torch.Tensor, key_store: PagedStore, scaling: float) -> torch.Tensor:
    """Scores [B, HQ, QN, T] of the stored keys as the CPU kernel's int8 path computes them: a * (qi . code) + c0,
    the integer sums exact."""
    b, hq, qn, d = query.shape
    qi, a, c0, codes = int8_query(query, key_store, scaling)
    hkv = codes.shape[1]
    qi = qi.double().reshape(b, hkv, hq // hkv, qn, qi.shape[3], d)
    dots = torch.einsum("bhrqnd,bhngd->bhrqng", qi, codes).reshape(b, hq, qn, qi.shape[4], -1)
    scores = a.double()[..., None] * dots + c0[..., None]
    return scores.reshape(b, hq, qn, -1)


def packed_attention(query: torch.Tensor, key_store: PagedStore, value_store: PagedStore,
                     exact_keys: torch.Tensor, exact_values: torch.Tensor, exact_index: torch.Tensor,
                     key0: int, mask: torch.Tensor | None = None, scaling: float | None = None,
                     causal: bool = True, qdot: str = "float") -> torch.Tensor:
    """Same contract as `kvshrink.kernels.packed_attention`, in float32 PyTorch; returns query's dtype.
    qdot="int8": the stored keys of per-channel groups without a head mean are scored as the CPU kernel's int8
    path scores them (`int8_query`)."""
    if qdot not in ("float", "int8"):
        raise ValueError(f"qdot must be 'float' or 'int8', got {qdot!r}")
    b, hq, qn, d = query.shape
    hkv = exact_keys.shape[1]
    scaling = d ** -0.5 if scaling is None else scaling
    idx = exact_index.long().cpu()
    before = idx < key0
    parts_k, parts_v = [exact_keys[:, :, before].float()], [exact_values[:, :, before].float()]
    if key_store.tokens:
        parts_k.append(key_store.decode(torch.float32))
        parts_v.append(value_store.decode(torch.float32))
    parts_k.append(exact_keys[:, :, ~before].float())
    parts_v.append(exact_values[:, :, ~before].float())
    k = torch.cat(parts_k, 2).repeat_interleave(hq // hkv, 1)
    v = torch.cat(parts_v, 2).repeat_interleave(hq // hkv, 1)
    tk = k.shape[2]
    scores = query.float() @ k.transpose(-1, -2) * scaling
    if qdot == "int8" and key_store.tokens and int8_keys(key_store.codec):
        n0 = int(before.sum())
        scores[..., n0:n0 + key_store.tokens] = _int8_scores(query, key_store, scaling).float()
    if mask is not None:
        allowed = (mask if mask.dim() == 4 else mask[:, None]).to(scores.device)
    else:
        allowed = torch.ones(qn, tk, dtype=torch.bool, device=scores.device)
        if causal:
            allowed = torch.arange(tk, device=scores.device)[None, :] <= (tk - qn + torch.arange(qn, device=scores.device))[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(scores, -1).nan_to_num(0.0)
    return (w @ v).to(query.dtype)
