"""Bit packing of small integer codes into uint8 words (pure functions).

Widths that divide 8 (1, 2, 4, 8) pack 8/bits codes per byte. Other widths (3, 5, 6, 7) pack 8 codes into a word
of `bits` bytes, so a 3-bit group of 32 codes takes exactly 12 bytes and only a group whose length is not a
multiple of 8 wastes bits, in its last word.
"""
from __future__ import annotations

import torch

PACKABLE_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits!r}")


def _word_dtype(bits: int) -> torch.dtype:
    """The narrowest signed integer that holds a word of 8 codes (3 bits: 24 bits, an int32)."""
    return torch.int32 if 8 * bits < 32 else torch.int64


def packed_size(n: int, bits: int) -> int:
    """Number of bytes that `n` codes of `bits` bits occupy once packed."""
    _check_bits(bits)
    if 8 % bits == 0:
        per = 8 // bits
        return -(-n // per)
    return -(-n // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dimension into a uint8 tensor."""
    _check_bits(bits)
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    if 8 % bits == 0:
        per = 8 // bits
        c = codes.to(torch.uint8)
        pad = (-n) % per
        if pad:
            c = torch.nn.functional.pad(c, (0, pad))
        c = c.reshape(*lead, -1, per)
        out = c[..., 0].clone()
        for i in range(1, per):
            out |= c[..., i] << (i * bits)
        return out
    wide = _word_dtype(bits)
    c = codes.to(wide)
    pad = (-n) % 8
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*lead, -1, 8)
    shifts = torch.arange(8, device=c.device, dtype=wide) * bits
    word = (c << shifts).sum(-1, dtype=wide)  # 8 * bits <= 56 bits: no overflow
    byte_shifts = torch.arange(bits, device=c.device, dtype=wide) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.to(torch.uint8).reshape(*lead, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: the first `n` codes along the last dimension, as uint8."""
    _check_bits(bits)
    lead = packed.shape[:-1]
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(
            f"packed last dimension is {packed.shape[-1]} bytes, but {n} codes of {bits} bits take {packed_size(n, bits)}"
        )
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
        codes = (packed.unsqueeze(-1) >> shifts) & mask
        return codes.reshape(*lead, -1)[..., :n]
    wide = _word_dtype(bits)
    b = packed.to(wide).reshape(*lead, -1, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=wide) * 8
    word = (b << byte_shifts).sum(-1, dtype=wide)
    shifts = torch.arange(8, device=packed.device, dtype=wide) * bits
    codes = (word.unsqueeze(-1) >> shifts) & mask
    return codes.to(torch.uint8).reshape(*lead, -1)[..., :n]
