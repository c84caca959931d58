"""The `gear` codec: GEAR (Kang et al. 2024), per block of tokens of one head: the largest-magnitude entries kept
exact (fp16 values and their positions in the block), the rest quantized (keys per channel over the block, values
per token, as KIVI), and the quantization error approximated by a low-rank product found by power iteration.

Decoding a block: the dequantized codes, plus the low-rank correction A B (A: `rank` fp16 coefficients per token,
B: a `rank` x head_dim fp16 basis per block), then the outliers written back in place. Every part is counted: codes,
scales (with the quantization's), `lowrank` (A and B), `outliers` (values and int16 positions).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..options import option
from .base import BIT_WIDTHS, Codec, Field, Layout, register_codec
from .quant import AXES, GroupCodec, dequantize, encode_block

GEAR_BITS = tuple(b for b in BIT_WIDTHS["uniform"] if b != 16)


def power_iteration(r: torch.Tensor, rank: int, iterations: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A [.., n, rank] (orthonormal columns) and B [.., rank, d] with A B ~ r [.., n, d] (subspace iteration from a
    seeded start, `iterations` times, as GEAR finds its low-rank residual)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(r.shape[-1], rank, generator=g).to(r.device, r.dtype).expand(*r.shape[:-2], -1, -1)
    for _ in range(max(iterations, 1)):
        p, _ = torch.linalg.qr(r @ q)
        q = r.transpose(-1, -2) @ p
    return p, q.transpose(-1, -2)


@register_codec
@dataclass(frozen=True)
class GearCodec(Codec):
    name = "gear"
    summary = "GEAR: outliers exact, the rest quantized, the quantization error as a low-rank product per block"

    bits: int = option(2, f"code width of the quantized bulk: {', '.join(map(str, GEAR_BITS))}")
    axis: str = option("channel", "bulk groups along the block's tokens of one 'channel' (keys) or one 'token'")
    value_axis: str = option("same", "the bulk groups when this codec codes values (keys keep axis): same (as "
                                     "axis), channel, or token (as KIVI and the GEAR paper)")
    group: int = option(32, "channels per group for axis=token")
    block: int = option(64, "tokens per block (a channel group spans it; the low-rank basis and outliers are per "
                            "block)")
    rank: int = option(4, "rank of the error correction per block and head (0: none)")
    outliers: float = option(0.02, "share of each block's entries kept exact as outliers (0: none)")
    iterations: int = option(2, "power iterations finding the low-rank correction")
    seed: int = option(0, "seed of the power iteration's start")

    def validate(self) -> None:
        if self.bits not in GEAR_BITS:
            raise ValueError(f"bits must be one of {GEAR_BITS}, got {self.bits!r}")
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")
        if self.value_axis not in ("same", *AXES):
            raise ValueError(f"value_axis must be one of {('same', *AXES)}, got {self.value_axis!r}")
        for name, low in (("block", 1), ("group", 1), ("rank", 0), ("iterations", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not 0 <= self.outliers < 0.5:
            raise ValueError(f"outliers must be a share in [0, 0.5), got {self.outliers}")
        if self.rank > self.block:
            raise ValueError(f"rank {self.rank} exceeds the block of {self.block} tokens")

    @property
    def tokens_per_unit(self) -> int:
        return self.block

    def for_values(self) -> "GearCodec":
        if self.value_axis in ("same", self.axis):
            return self
        return dataclasses.replace(self, axis=self.value_axis, value_axis="same")

    @property
    def bulk(self) -> GroupCodec:
        return GroupCodec(self.bits, self.block if self.axis == "channel" else self.group, self.axis)

    def kept(self, head_dim: int) -> int:
        """Outliers kept per block and head."""
        return math.ceil(self.outliers * self.block * head_dim) if self.outliers else 0

    def check_head_dim(self, head_dim: int, name: str) -> None:
        self.bulk.check_head_dim(head_dim, name)
        if self.rank > head_dim:
            raise ValueError(f"{name}: rank {self.rank} exceeds head_dim={head_dim}")
        if self.block * head_dim > 32767:
            raise ValueError(f"{name}: block x head_dim = {self.block * head_dim} does not fit the int16 outlier "
                             "positions: use a smaller block")

    def layout(self, head_dim: int) -> Layout:
        d, n = head_dim, self.block
        fields = list(self.bulk.layout(d).fields)
        if self.rank:
            fields += [Field("lowrank_a", torch.float16, (self.rank,), "lowrank"),
                       Field("lowrank_b", torch.float16, (self.rank, d), "lowrank", tokens=n)]
        k = self.kept(d)
        if k:
            fields += [Field("outlier_values", torch.float16, (k,), "outliers", tokens=n),
                       Field("outlier_index", torch.int16, (k,), "outliers", tokens=n)]
        params = (("bits", self.bits), ("axis", self.axis), ("block", n), ("rank", self.rank), ("outliers", k))
        return Layout("gear", params, tuple(fields), n)

    def describe(self) -> str:
        return f"gear {self.bits}-bit {self.axis}, rank {self.rank}/block {self.block}, {self.outliers:.0%} outliers"

    def encode(self, x: torch.Tensor, store) -> dict[str, torch.Tensor]:
        b, h, t, d = x.shape
        n = self.block
        x = x.float()
        if not torch.isfinite(x).all():
            raise ValueError("non-finite values cannot be stored")
        blocks = x.reshape(b, h, t // n, n * d)
        out: dict[str, torch.Tensor] = {}
        k = self.kept(d)
        if k:  # the largest entries of each block leave the bulk (their range no longer stretches its scales)
            index = blocks.abs().topk(k, dim=-1).indices.sort(-1).values
            values = blocks.gather(-1, index)
            if not torch.isfinite(values.half()).all():
                raise ValueError("an outlier exceeds the fp16 range (|x| > 65504)")
            out["outlier_values"], out["outlier_index"] = values.half(), index.to(torch.int16)
            blocks = blocks.scatter(-1, index, torch.zeros_like(values))
        bulk_x = blocks.reshape(b, h, t, d)
        codes, scale, zero, _ = encode_block(bulk_x, self.bulk)
        out.update(codes=codes, scale=scale, zero=zero)
        if self.rank:
            error = (bulk_x - self._dequantize(out, b, h, t, d)).reshape(b, h, t // n, n, d)
            a, basis = power_iteration(error, self.rank, self.iterations, self.seed)  # A's columns are unit vectors
            a16, b16 = a.half(), basis.half()
            if not (torch.isfinite(a16).all() and torch.isfinite(b16).all()):
                raise ValueError("the low-rank correction exceeds the fp16 range")
            out["lowrank_a"] = a16.reshape(b, h, t, self.rank)
            out["lowrank_b"] = b16
        return out

    def _dequantize(self, fields: dict[str, torch.Tensor], b: int, h: int, t: int, d: int) -> torch.Tensor:
        g = self.bulk.group if self.axis == "token" else d
        x = dequantize(fields["codes"], fields["scale"], fields["zero"], self.bits, g)
        return x.reshape(b, h, t, d)

    def decode(self, fields: dict[str, torch.Tensor], store) -> torch.Tensor:
        codes = fields["codes"]
        b, h = codes.shape[:2]
        d = store.head_dim
        t = codes.shape[2] * (self.block if self.axis == "channel" else 1)
        n = self.block
        x = self._dequantize(fields, b, h, t, d)
        if self.rank:
            a = fields["lowrank_a"].float().reshape(b, h, t // n, n, self.rank)
            x = x + (a @ fields["lowrank_b"].float()).reshape(b, h, t, d)
        if "outlier_values" in fields:
            flat = x.reshape(b, h, t // n, n * d)
            flat = flat.scatter(-1, fields["outlier_index"].long(), fields["outlier_values"].float())
            x = flat.reshape(b, h, t, d)
        return x
