"""PyTorch references of the kernels: what each must compute, written the plain way.

`quantize_pack` is `codecs.quant.encode_block` itself (the CPU path of every store). `packed_attention` decodes the
store to full precision, puts the keys back in order and runs dense attention with the same mask rules.
"""
from __future__ import annotations

import torch

from ..codecs.quant import encode_block
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

def packed_attention(query: torch.Tensor, key_store: PagedStore, value_store: PagedStore,
                     exact_keys: torch.Tensor, exact_values: torch.Tensor, exact_index: torch.Tensor,
                     key0: int, mask: torch.Tensor | None = None, scaling: float | None = None,
                     causal: bool = True) -> torch.Tensor:
    """Same contract as `kvshrink.kernels.packed_attention`, in float32 PyTorch; returns query's dtype."""
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
    if mask is not None:
        allowed = (mask if mask.dim() == 4 else mask[:, None]).to(scores.device)
    else:
        allowed = torch.ones(qn, tk, dtype=torch.bool, device=scores.device)
        if causal:
            allowed = torch.arange(tk, device=scores.device)[None, :] <= (tk - qn + torch.arange(qn, device=scores.device))[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(scores, -1).nan_to_num(0.0)
    return (w @ v).to(query.dtype)
