"""Asymmetric group quantization with packed codes and optional mean-centring: the `grouped` codec (KIVI, TaDA).

Pure functions (`quantize`, `dequantize`, `encode_block`) work on groups laid along the last dimension; `GroupCodec`
declares the layout a store holds them in and encodes / decodes blocks of tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..options import option
from .base import BIT_WIDTHS, Codec, Field, Layout, register_codec
from .packing import pack, packed_size, unpack

QUANT_BITS = BIT_WIDTHS["uniform"]
AXES = ("token", "channel")
CENTERS = ("none", "head", "channel")
MEAN_HEADS = ("all", "rank")
_FP16_MAX = 65504.0


def quantize(x: torch.Tensor, bits: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize groups running along `dim` to `bits`-bit codes with an fp16 scale and minimum per group.

    Returns (codes packed along the last dimension, scale, zero), scale and zero keeping `dim` with size 1, so that
    x ~= code * scale + zero. The fp16 zero is rounded down and the fp16 scale up, so every element lies inside the
    representable range and the error is at most half a step.
    """
    if bits not in QUANT_BITS or bits == 16:
        raise ValueError(f"bits must be one of {QUANT_BITS[:-1]} for quantize(), got {bits!r}")
    x = x.float()
    levels = (1 << bits) - 1
    lo = x.amin(dim, keepdim=True)
    hi = x.amax(dim, keepdim=True)
    zero = lo.half()
    too_high = zero.float() > lo
    if too_high.any():
        zero = torch.where(too_high, torch.nextafter(zero, torch.full_like(zero, float("-inf"))), zero)
    # a tensor divisor: CUDA's torch divides by a Python scalar as a multiplication by its reciprocal, which rounds
    # differently in the last bit now and then (seen on an H200); true division gives the CPU's and the kernel's bits
    exact_scale = (hi - zero.float()) / torch.full_like(hi, levels)
    scale = exact_scale.half()
    too_low = scale.float() < exact_scale
    if too_low.any():
        scale = torch.where(too_low, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        raise ValueError(f"values outside the fp16 range (|x| > {_FP16_MAX:g}) cannot get fp16 scales")
    s = scale.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = torch.round((x - zero.float()) * inv).clamp_(0, levels).to(torch.uint8)
    return pack(codes, bits), scale, zero


# The native quantize-and-pack on the CPU (a decode step's block leaving the window, a prefill's blocks):
# `kernels.cpu` sets it once its compiled extension is loaded. It computes the same float32 operations as `quantize`
# and `pack` (the same bits) in one call instead of ~30: 1.7-5.8x faster than them on the blocks measured
# (docs/cpu-decode.md).
_native = None


def set_native_ops(ops) -> None:
    """Register the compiled `grouped_encode` op (None: always the PyTorch steps)."""
    global _native
    _native = ops


def _native_encode(x: torch.Tensor, groups: torch.Tensor, dim: int, spec: "GroupCodec"):
    """(codes, scale, zero) of x [B, H, T, D] (float32, centred) through the native op, or None where it does not
    run (no extension, not the CPU, 16 bits). `groups`, `dim`: x viewed as `quantize` reads it (groups
    along `dim` of `groups`), from which the fields' shapes are those `quantize` returns."""
    if _native is None or x.device.type != "cpu" or x.dtype != torch.float32 or spec.bits not in (2, 3, 4, 8):
        return None
    *lead, last = groups.shape
    codes = torch.empty((*lead, packed_size(last, spec.bits)), dtype=torch.uint8)
    along = dim % groups.dim()  # scale and zero keep that dimension with size 1
    scale = torch.empty(groups.shape[:along] + (1,) + groups.shape[along + 1:], dtype=torch.float16)
    zero = torch.empty_like(scale)
    if not _native.grouped_encode(codes, scale, zero, x.contiguous(), spec.bits, spec.group,
                                  0 if spec.axis == "token" else 1):
        raise ValueError(f"values outside the fp16 range (|x| > {_FP16_MAX:g}) cannot get fp16 scales")
    return codes, scale, zero


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `quantize` (`n` codes along the last dimension), in float32."""
    return torch.addcmul(zero.float(), unpack(packed, bits, n).float(), scale.float())


@register_codec
@dataclass(frozen=True)
class GroupCodec(Codec):
    """Asymmetric group quantization (KIVI, TaDA): codes packed, an fp16 scale and minimum per group.

    bits: code width (16 keeps fp16 values, no codes). group: elements sharing one scale and zero point.
    axis: "token" puts a group along the channels of one token; "channel" along `group` tokens of one channel (KIVI
    keys). center: "head" subtracts each token's mean over the KV heads (TaDA, stored in fp16); "channel" subtracts
    each head's per-channel mean over the first block stored (the prefill); "none" subtracts nothing.
    mean_heads: which heads center="head" averages under tensor parallelism: "all" KV heads of the layer (gathered
    from every rank: the codes one process would store) or "rank" (this rank's heads only: no communication, a
    different codec); the same without tensor parallelism.
    """

    name = "grouped"
    summary = "asymmetric group codes, fp16 scale and zero per group, optional mean-centring (KIVI, TaDA)"
    backends = {"cpu": ("torch", "cpu"), "cuda": ("torch", "triton")}

    bits: int = option(4, f"code width: {', '.join(map(str, QUANT_BITS))} (16 = fp16 values, no codes)")
    group: int = option(32, "elements sharing one fp16 scale and zero point (tokens for per-channel groups)")
    axis: str = option("token", "groups run along the channels of one 'token' or along tokens of one 'channel'")
    center: str = option("none", "subtracted before coding: 'none', 'head' (per-token mean over KV heads, fp16) or "
                                 "'channel' (per-head channel mean of the first block, fp16)")
    mean_heads: str = option("all", "under tensor parallelism, the heads center=head averages: 'all' or 'rank'")

    def validate(self) -> None:
        if self.bits not in QUANT_BITS:
            raise ValueError(f"bits must be one of {QUANT_BITS}, got {self.bits!r}")
        if not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"group must be a positive integer, got {self.group!r}")
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")
        if self.center not in CENTERS:
            raise ValueError(f"center must be one of {CENTERS}, got {self.center!r}")
        if self.mean_heads not in MEAN_HEADS:
            raise ValueError(f"mean_heads must be one of {MEAN_HEADS}, got {self.mean_heads!r}")

    @property
    def tokens_per_unit(self) -> int:
        """Tokens that must be appended or dropped together (a per-channel group spans `group` tokens)."""
        return self.group if self.axis == "channel" and self.bits != 16 else 1

    @property
    def lossless(self) -> bool:
        return False

    def layout(self, head_dim: int) -> Layout:
        d, g, bits = head_dim, self.group, self.bits
        if bits == 16:
            fields = [Field("codes", torch.float16, (d,), "codes")]
        elif self.axis == "token":
            fields = [Field("codes", torch.uint8, (d // g, packed_size(g, bits)), "codes"),
                      Field("scale", torch.float16, (d // g, 1), "scales"),
                      Field("zero", torch.float16, (d // g, 1), "scales")]
        else:
            fields = [Field("codes", torch.uint8, (g, packed_size(d, bits)), "codes", tokens=g),
                      Field("scale", torch.float16, (1, d), "scales", tokens=g),
                      Field("zero", torch.float16, (1, d), "scales", tokens=g)]
        if self.center == "head":
            fields.append(Field("head_mean", torch.float16, (d,), "means", shared_heads=True))
        elif self.center == "channel":
            fields.append(Field("channel_mean", torch.float16, (1, d), "means", tokens=0))
        params = (("bits", bits), ("group", g), ("axis", self.axis), ("center", self.center))
        return Layout("grouped", params, tuple(fields), self.tokens_per_unit)

    def describe(self) -> str:
        scope = " (rank's heads)" if self.center == "head" and self.mean_heads == "rank" else ""
        return f"{self.axis} g{self.group} center={self.center}{scope}"

    def check_head_dim(self, head_dim: int, name: str) -> None:
        if self.axis == "token" and self.bits != 16 and head_dim % self.group:
            raise ValueError(
                f"{name}: group={self.group} does not divide head_dim={head_dim}; per-token groups run along the "
                f"channels, so choose a divisor of {head_dim}"
            )

    def encode(self, x: torch.Tensor, store) -> dict[str, torch.Tensor]:
        if self.center == "channel" and "channel_mean" not in store.state:
            store.state["channel_mean"] = _to_fp16(x.float().mean(2, keepdim=True), "the channel mean")
        encode = store.encoder or encode_block
        if self.center == "head" and self.mean_heads == "all" and store.shard is not None:
            # the same float operations as one process over all heads; the kernels take no outside mean
            every = store.shard.gather_heads(x).float()
            encode = partial(encode_block, mean=_to_fp16(head_mean(every), "the head mean"))
        codes, scale, zero, mean = encode(x, self, store.state.get("channel_mean"))
        out = {"codes": codes}
        if scale is not None:
            out["scale"], out["zero"] = scale, zero
        if mean is not None:
            out["head_mean"] = mean
        return out

    def decode(self, fields: dict[str, torch.Tensor], store) -> torch.Tensor:
        codes = fields["codes"]
        if self.bits == 16:
            x = codes.float()
        else:
            d = store.head_dim
            g = dequantize(codes, fields["scale"], fields["zero"], self.bits, self.group if self.axis == "token" else d)
            x = g.reshape(g.shape[0], g.shape[1], -1, d)
        if "head_mean" in fields:
            x = x + fields["head_mean"].float()
        if "channel_mean" in store.state:
            x = x + store.state["channel_mean"].float()
        return x


def head_mean(x: torch.Tensor) -> torch.Tensor:
    """Each token's mean over the heads of x [B, H, T, D] (float32), as [B, 1, T, D].

    Summed head by head, in order, then divided by H: a fixed order of float operations that the GPU kernel
    repeats, so both produce the same bits (torch's own `mean` leaves the order to the backend).
    """
    s = x[:, 0]
    for h in range(1, x.shape[1]):
        s = s + x[:, h]
    return (s / torch.full_like(s, x.shape[1])).unsqueeze(1)  # true division on CUDA too (see quantize)


def _to_fp16(x: torch.Tensor, what: str) -> torch.Tensor:
    h = x.half()
    if not torch.isfinite(h).all():
        raise ValueError(f"{what} exceeds the fp16 range (|x| > {_FP16_MAX:g})")
    return h


def encode_block(x: torch.Tensor, spec: "GroupCodec", channel_mean: torch.Tensor | None = None,
                 mean: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One block of tokens x [B, H, T, D] as a store holds it: (codes, scale, zero, head mean).

    The reference of the quantize-and-pack kernel (`kvshrink.kernels.quantize_pack` gives the same bits).
    center="channel" subtracts `channel_mean` [B, H, 1, D] (fp16, fixed by the first block); center="head"
    subtracts the fp16 per-token head mean, which is returned: x's own, or `mean` [B, 1, T, D] (fp16) when it was
    computed over more heads than x holds (every tensor-parallel rank's). Per-token groups: codes
    [B, H, T, D/G, bytes], scale/zero [B, H, T, D/G, 1]; per-channel groups: codes [B, H, T/G, G, bytes],
    scale/zero [B, H, T/G, 1, D].
    bits=16 returns the centred fp16 values as codes and no scale or zero.
    """
    b, h, t, d = x.shape
    x = x.float()
    m = None
    if spec.center == "head":
        m = _to_fp16(head_mean(x), "the head mean") if mean is None else mean
        x = x - m.float()
    elif spec.center == "channel":
        if channel_mean is None:
            raise ValueError("center='channel' needs the channel mean of the first block")
        x = x - channel_mean.float()
    if spec.bits == 16:
        return _to_fp16(x, "a value"), None, None, m
    # per token: [B, H, T, D/G, G], groups along the last dim; per channel: [B, H, T/G, G, D], groups along the
    # tokens of a block. Codes are packed along the last dim either way, so decoding is a plain reshape.
    if spec.axis == "token":
        groups, dim = x.reshape(b, h, t, d // spec.group, spec.group), -1
    else:
        groups, dim = x.reshape(b, h, t // spec.group, spec.group, d), -2
    native = _native_encode(x, groups, dim, spec)
    codes, scale, zero = native if native is not None else quantize(groups, spec.bits, dim)
    return codes, scale, zero, m
