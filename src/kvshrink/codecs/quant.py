"""Asymmetric group quantization with packed codes, optional mean-centering, and a growing store of it.

Pure functions (`quantize`, `dequantize`) work on groups laid along the last dimension. `QuantStore` holds the
quantized tokens of one tensor (the keys or the values) of one layer and appends blocks of tokens to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch

from .packing import pack, unpack

if TYPE_CHECKING:
    from ..distributed import HeadShard

QUANT_BITS = (2, 3, 4, 8, 16)
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
    exact_scale = (hi - zero.float()) / levels
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


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `quantize` (`n` codes along the last dimension), in float32."""
    return torch.addcmul(zero.float(), unpack(packed, bits, n).float(), scale.float())


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (keys or values) of one layer is quantized.

    bits: code width (16 keeps fp16 values, no codes). group: elements sharing one scale and zero point.
    axis: "token" puts a group along the channels of one token; "channel" along `group` tokens of one channel (KIVI
    keys). center: "head" subtracts each token's mean over the KV heads (TaDA, stored in fp16); "channel" subtracts
    each head's per-channel mean over the first block stored (the prefill); "none" subtracts nothing.
    mean_heads: which heads center="head" averages under tensor parallelism: "all" KV heads of the layer (gathered
    from every rank: the codes one process would store) or "rank" (this rank's heads only: no communication, a
    different codec); the same without tensor parallelism.
    """

    bits: int = 4
    group: int = 32
    axis: str = "token"
    center: str = "none"
    mean_heads: str = "all"

    def __post_init__(self) -> None:
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

    def make_store(self, name: str) -> "QuantStore":
        return QuantStore(self, name)

    def describe(self) -> str:
        scope = " (rank's heads)" if self.center == "head" and self.mean_heads == "rank" else ""
        return f"{self.axis} g{self.group} center={self.center}{scope}"

    def check_head_dim(self, head_dim: int, name: str) -> None:
        if self.axis == "token" and self.bits != 16 and head_dim % self.group:
            raise ValueError(
                f"{name}: group={self.group} does not divide head_dim={head_dim}; per-token groups run along the "
                f"channels, so choose a divisor of {head_dim}"
            )


def head_mean(x: torch.Tensor) -> torch.Tensor:
    """Each token's mean over the heads of x [B, H, T, D] (float32), as [B, 1, T, D].

    Summed head by head, in order, then divided by H: a fixed order of float operations that the GPU kernel
    repeats, so both produce the same bits (torch's own `mean` leaves the order to the backend).
    """
    s = x[:, 0]
    for h in range(1, x.shape[1]):
        s = s + x[:, h]
    return (s / x.shape[1]).unsqueeze(1)


def _to_fp16(x: torch.Tensor, what: str) -> torch.Tensor:
    h = x.half()
    if not torch.isfinite(h).all():
        raise ValueError(f"{what} exceeds the fp16 range (|x| > {_FP16_MAX:g})")
    return h


def encode_block(x: torch.Tensor, spec: "QuantSpec", channel_mean: torch.Tensor | None = None,
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
    codes, scale, zero = quantize(groups, spec.bits, dim)
    return codes, scale, zero, m


class QuantStore:
    """The quantized tokens of one tensor of one layer, shaped [batch, heads, tokens, head_dim] when decoded."""

    def __init__(self, spec: QuantSpec, name: str = "tensor"):
        self.spec = spec
        self.name = name
        self.tokens = 0
        self.head_dim = 0
        self.codes: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None
        self.head_mean: torch.Tensor | None = None  # [B, 1, T, D] fp16, center="head"
        self.channel_mean: torch.Tensor | None = None  # [B, H, 1, D] fp16, center="channel"
        # what turns a block into codes: `encode_block` (PyTorch) or a kernel with the same contract and output
        self.encoder = None
        # the global KV heads held under tensor parallelism (set by the layer): center="head" with mean_heads="all"
        # gathers the other ranks' heads of each block to take the mean over all of them
        self.shard: HeadShard | None = None

    def _fp16(self, x: torch.Tensor, what: str) -> torch.Tensor:
        return _to_fp16(x, f"{self.name}: {what}")

    def append(self, x: torch.Tensor) -> None:
        """Quantize and store a block of tokens x [B, H, T, D]; T must be a multiple of `tokens_per_unit`."""
        spec = self.spec
        t = x.shape[2]
        if t % spec.tokens_per_unit:
            raise ValueError(f"{self.name}: {t} tokens is not a multiple of the group of {spec.tokens_per_unit} tokens")
        if t == 0:
            return
        spec.check_head_dim(x.shape[-1], self.name)
        if spec.center == "channel" and self.channel_mean is None:
            self.channel_mean = self._fp16(x.float().mean(2, keepdim=True), "the channel mean")
        encode = self.encoder or encode_block
        if spec.center == "head" and spec.mean_heads == "all" and self.shard is not None:
            # the same float operations as one process over all heads; the kernels take no outside mean
            every = self.shard.gather_heads(x).float()
            encode = partial(encode_block, mean=self._fp16(head_mean(every), "the head mean"))
        try:
            codes, scale, zero, mean = encode(x, spec, self.channel_mean)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None
        self.head_dim = x.shape[-1]
        self.codes = codes if self.codes is None else torch.cat([self.codes, codes], 2)
        if scale is not None:
            self.scale = scale if self.scale is None else torch.cat([self.scale, scale], 2)
            self.zero = zero if self.zero is None else torch.cat([self.zero, zero], 2)
        if mean is not None:
            self.head_mean = mean if self.head_mean is None else torch.cat([self.head_mean, mean], 2)
        self.tokens += t

    def decode(self, dtype: torch.dtype) -> torch.Tensor | None:
        """All stored tokens, dequantized to [B, H, T, D] in `dtype`; None when empty."""
        if self.tokens == 0:
            return None
        spec = self.spec
        if spec.bits == 16:
            x = self.codes.float()
        else:
            n = spec.group if spec.axis == "token" else self.head_dim
            g = dequantize(self.codes, self.scale, self.zero, spec.bits, n)
            x = g.reshape(g.shape[0], g.shape[1], self.tokens, -1)
        if self.head_mean is not None:
            x = x + self.head_mean.float()
        if self.channel_mean is not None:
            x = x + self.channel_mean.float()
        return x.to(dtype)

    def parts(self) -> dict[str, list[torch.Tensor]]:
        """The tensors held, by part of the memory report."""
        out: dict[str, list[torch.Tensor]] = {"codes": [], "scales": [], "means": []}
        for part, t in (("codes", self.codes), ("scales", self.scale), ("scales", self.zero),
                        ("means", self.head_mean), ("means", self.channel_mean)):
            if t is not None:
                out[part].append(t)
        return out

    def map_batch(self, fn) -> None:
        """Apply `fn` (a function of a batch-first tensor) to every held tensor: beam reorder, batch selection."""
        for attr in ("codes", "scale", "zero", "head_mean", "channel_mean"):
            t = getattr(self, attr)
            if t is not None:
                setattr(self, attr, fn(t))

    def drop_front(self, n: int) -> None:
        """Forget the oldest `n` tokens (a multiple of `tokens_per_unit`)."""
        if n <= 0:
            return
        unit = self.spec.tokens_per_unit
        if n % unit or n > self.tokens:
            raise ValueError(f"{self.name}: cannot drop {n} of {self.tokens} tokens in units of {unit}")
        # clone: a slice would keep the whole old storage alive behind a smaller numel
        self.codes = self.codes[:, :, n // unit:].clone()
        if self.scale is not None:
            self.scale = self.scale[:, :, n // unit:].clone()
            self.zero = self.zero[:, :, n // unit:].clone()
        if self.head_mean is not None:
            self.head_mean = self.head_mean[:, :, n:].clone()
        self.tokens -= n
