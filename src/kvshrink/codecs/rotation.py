"""Rotation codecs (QuaRot / PolarQuant / TurboQuant family): rotate each head's vectors, then quantize scalars.

A randomized Walsh-Hadamard transform R = H·D (D: random ±1 signs from a seed, one row per KV head; H: the
normalised Hadamard matrix, applied in O(d log d)) spreads outlier channels over every coordinate. R is orthogonal,
so q·k = (Rq)·(Rk): queries are rotated once per step and stored keys are never rotated back; values are rotated
back once, on the attention output. Nothing is stored for R but the seed. A head dimension that is not a power of
two is rotated block-diagonally, in blocks of its largest power-of-two divisor (at least 16).

Scalar quantizers for the rotated coordinates:
- "lloydmax" (PolarQuant / TurboQuant "MSE"): each vector's norm is kept (fp16 or fp32) and its direction's
  coordinates, which follow N(0, 1/d) closely for d >= 64, are coded by the Lloyd-Max codebook of a unit Gaussian
  scaled by 1/sqrt(d). With `norm_correction` the kept norm is ||x|| / ||decoded unit vector||, so the decoded
  vector has exactly the original norm (vLLM's "_nc" presets).
- "uniform" (QuaRot-style): asymmetric per-token groups along the rotated channels (`codecs.quant`).
- bits=8 with quantizer "fp8": float8 e4m3 values with one fp32 scale per token (vLLM's fp8 keys), no rotation
  needed but allowed.
The 1-bit QJL residual sketch of TurboQuant's "prod" stage is not implemented.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..options import option
from .base import BIT_WIDTHS, Codec, Field, Layout, register_codec
from .packing import pack, packed_size, unpack
from .quant import GroupCodec, dequantize, encode_block

QUANTIZERS = ("lloydmax", "uniform", "fp8")
ROTATED_BITS = BIT_WIDTHS["uniform"]
NORM_DTYPES = {"float16": torch.float16, "float32": torch.float32}
#: mean squared error of the Lloyd-Max quantizer of a unit Gaussian (Max 1960), for tests and docs
GAUSSIAN_LLOYD_MAX_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


# -- the rotation ---------------------------------------------------------------------------------------------------
def hadamard_block(d: int) -> int:
    """The block size of the (block-diagonal) Walsh-Hadamard transform for head dim d."""
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"head_dim must be a positive integer, got {d!r}")
    block = d & -d  # largest power of two dividing d
    if block < 16:
        raise ValueError(f"head_dim={d}: a rotation needs a power-of-two block of at least 16 dividing it "
                         f"(largest is {block}); use a method without rotation for this model")
    return block


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalised (orthogonal, self-inverse) Walsh-Hadamard transform along the last dim, block-diagonal in blocks
    of `hadamard_block(d)`."""
    d = x.shape[-1]
    block = hadamard_block(d)
    lead = x.shape[:-1]
    y = x.reshape(*lead, d // block, block)
    h = 1
    while h < block:
        y = y.reshape(*lead, d // block, block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), -2)
        h *= 2
    return (y.reshape(*lead, d) * (1.0 / math.sqrt(block))).to(x.dtype)


@functools.lru_cache(maxsize=256)
def _signs(seed: int, layer: int, heads: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return (torch.randint(0, 2, (heads, d), generator=g) * 2 - 1).float()


def signs(seed: int, layer: int, heads: int, d: int) -> torch.Tensor:
    """The ±1 signs [heads, d] of a layer's rotation (a pure function of the seed: nothing is stored)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return _signs(seed, layer, heads, d)


# Native steps for rotating and encoding a few tokens on the CPU (a decode step's query, and the one token per layer
# it moves into the store): `kernels.cpu` sets them once its compiled extension is loaded. They compute the same
# float32 operations as the PyTorch steps here (the same bits; norms stay torch's), in one call instead of ~20-50.
_native = None
NATIVE_MAX_ROWS = 256  # (batch x heads x tokens) rows up to which the native steps run; larger calls use torch


def set_native_ops(ops) -> None:
    """Register the compiled `rotate_tokens` / `lloydmax_tokens` ops (None: always the PyTorch steps)."""
    global _native
    _native = ops


def _native_rows(x: torch.Tensor) -> bool:
    """Whether the native steps take x [B, H, T, d]: float32 on the CPU, few rows."""
    return (_native is not None and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x[..., 0].numel() <= NATIVE_MAX_ROWS)


def rotate(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """R x = H (D x) for x [B, H, T, d] (float32) and signs s [H, d]."""
    if _native_rows(x):
        x = x.contiguous()
        out = torch.empty_like(x)
        _native.rotate_tokens(out, x, s.to(torch.float32).contiguous(), hadamard_block(x.shape[-1]))
        return out
    return fwht(x * s[None, :, None, :].to(x.device, x.dtype))


def unrotate(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """R^-1 y = D (H y)."""
    return fwht(y) * s[None, :, None, :].to(y.device, y.dtype)


# -- Lloyd-Max codebooks ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def gaussian_codebook(bits: int, iterations: int = 2000) -> tuple[torch.Tensor, float]:
    """(centroids [2**bits] ascending, mean squared error) of the Lloyd-Max quantizer of a unit Gaussian."""
    if bits not in (1, 2, 3, 4, 5, 6, 7, 8):
        raise ValueError(f"bits must be 1..8 for a Lloyd-Max codebook, got {bits!r}")
    n = 1 << bits
    pdf = lambda t: torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda t: 0.5 * (1 + torch.erf(t / math.sqrt(2)))  # noqa: E731
    c = torch.linspace(-2.5, 2.5, n, dtype=torch.float64) * (1 + bits / 4)
    for _ in range(iterations):
        edges = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), (c[1:] + c[:-1]) / 2,
                           torch.tensor([math.inf], dtype=torch.float64)])
        mass = cdf(edges[1:]) - cdf(edges[:-1])
        new = (pdf(edges[:-1]) - pdf(edges[1:])) / mass.clamp_min(1e-300)
        if torch.allclose(new, c, rtol=0, atol=1e-13):
            c = new
            break
        c = new
    edges = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), (c[1:] + c[:-1]) / 2,
                       torch.tensor([math.inf], dtype=torch.float64)])
    mass = cdf(edges[1:]) - cdf(edges[:-1])
    mse = float(1.0 - (mass * c * c).sum())  # E[X^2] - E[Q(X)^2] at the centroid condition
    return c.float(), mse


def lloydmax_encode(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (uint8) of the coordinates of unit-norm rotated vectors u [..., d] (coordinates ~ N(0, 1/d))."""
    c, _ = gaussian_codebook(bits)
    z = u * math.sqrt(u.shape[-1])
    edges = ((c[1:] + c[:-1]) / 2).to(z.device)
    return torch.bucketize(z.contiguous(), edges).to(torch.uint8)


@functools.lru_cache(maxsize=None)
def _lloydmax_tables(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(edges, centroids) as `lloydmax_encode` / `lloydmax_decode` compute them, float32 and contiguous."""
    c, _ = gaussian_codebook(bits)
    return ((c[1:] + c[:-1]) / 2).contiguous(), c.contiguous()


def lloydmax_decode(codes: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    c, _ = gaussian_codebook(bits)
    return c.to(codes.device)[codes.long()] / math.sqrt(d)


# -- the codec ---------------------------------------------------------------------------------------------------
@register_codec
@dataclass(frozen=True)
class RotationCodec(Codec):
    """How one tensor (keys or values) of one layer is rotated and quantized.

    bits: 2, 3, 4 (or 8 with 'uniform'/'fp8'; 16 keeps rotated fp16 values). quantizer: 'lloydmax', 'uniform'
    (per-token groups of `group` rotated channels), 'fp8'. rotate: False quantizes without the rotation (fp8 keys).
    norm: dtype of the kept norms/scales. norm_correction: keep ||x|| / ||decoded unit vector||.
    seed, layer: which rotation (a layer's builder sets `layer`).
    """

    name = "rotated"
    summary = "randomized Hadamard rotation, then Lloyd-Max / uniform / fp8 codes per token (TurboQuant, PolarQuant)"
    # "rotated": PyTorch attention in the rotated space (stored tokens never turned back)
    backends = {"cpu": ("torch", "rotated", "cpu"), "cuda": ("torch", "rotated", "triton")}

    bits: int = option(4, "code width: 2, 3, 4 (lloydmax); 2-8 (uniform); 8 (fp8); 16 = rotated fp16 values")
    quantizer: str = option("lloydmax", f"scalar quantizer of the rotated coordinates: {', '.join(QUANTIZERS)}")
    group: int = option(32, "rotated channels per uniform group (quantizer=uniform)")
    rotate: bool = option(True, "rotate before coding (False: fp8 keys as vLLM stores them)")
    norm: str = option("float16", "dtype of the kept norms / scales: float16 or float32")
    norm_correction: bool = option(True, "keep ||x|| / ||decoded direction|| so decoded vectors keep their norm")
    seed: int = option(0, "seed of the rotation's random signs (nothing else is stored for it)")
    layer: int = option(0, "layer index mixed into the seed (set by the layer's builder)")

    axis = "token"  # what reports read (rotated codes are per token)
    center = "none"

    def validate(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        allowed = ROTATED_BITS if self.quantizer != "lloydmax" else (*BIT_WIDTHS["lloydmax"], 16)
        if self.bits not in ROTATED_BITS:
            raise ValueError(f"bits must be one of {ROTATED_BITS}, got {self.bits!r}")
        if self.quantizer == "fp8" and self.bits not in BIT_WIDTHS["fp8"]:
            raise ValueError(f"quantizer 'fp8' stores 8 bits, got bits={self.bits}")
        if self.bits not in allowed:
            *most, last = BIT_WIDTHS["lloydmax"]
            raise ValueError(f"quantizer 'lloydmax' takes bits {', '.join(map(str, most))} or {last} "
                             "(8 bits: use 'uniform' or 'fp8')")
        if self.norm not in NORM_DTYPES:
            raise ValueError(f"norm must be one of {', '.join(NORM_DTYPES)}, got {self.norm!r}")
        if not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"group must be a positive integer, got {self.group!r}")

    def check_head_dim(self, head_dim: int, name: str) -> None:
        if self.rotate:
            try:
                hadamard_block(head_dim)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if self.quantizer == "uniform" and self.bits != 16 and head_dim % self.group:
            raise ValueError(f"{name}: group={self.group} does not divide head_dim={head_dim}")

    def describe(self) -> str:
        what = {"lloydmax": "Lloyd-Max", "uniform": f"uniform g{self.group}", "fp8": "fp8"}[self.quantizer]
        return f"{'rotated ' if self.rotate else ''}{what}{' nc' if self.norm_correction else ''}"

    @property
    def _inner(self) -> GroupCodec:
        """The grouped codes of quantizer='uniform' (over the rotated vectors)."""
        return GroupCodec(self.bits, self.group, "token", "none")

    def layout(self, head_dim: int) -> Layout:
        d = head_dim
        norm = NORM_DTYPES[self.norm]
        if self.bits == 16:
            fields = (Field("codes", torch.float16, (d,), "codes"),)
        elif self.quantizer == "uniform":
            fields = self._inner.layout(d).fields
        elif self.quantizer == "fp8":
            fields = (Field("codes", torch.uint8, (d,), "codes"), Field("norms", norm, (1,), "scales"))
        else:
            fields = (Field("codes", torch.uint8, (packed_size(d, self.bits),), "codes"),
                      Field("norms", norm, (1,), "scales"))
        params = (("bits", self.bits), ("quantizer", self.quantizer), ("group", self.group),
                  ("rotate", self.rotate), ("seed", self.seed), ("layer", self.layer))
        return Layout("rotated", params, fields)

    # -- the rotation of a store's heads ------------------------------------------------------------------------
    def signs(self, store, heads: int, d: int) -> torch.Tensor:
        """The signs of the `heads` heads a store holds; under tensor parallelism the rows of its rank's global
        heads, so every head is rotated as in one process."""
        key = ("signs", heads, d)
        if key not in store.cache:
            shard = store.shard
            if shard is not None and heads == shard.heads:
                store.cache[key] = signs(self.seed, self.layer, shard.total, d)[shard.start:shard.stop].clone()
            else:
                store.cache[key] = signs(self.seed, self.layer, heads, d)
        return store.cache[key]

    def to_rotated(self, x: torch.Tensor, store) -> torch.Tensor:
        """x [B, H, T, d] in the rotated space (float32)."""
        x = x.float()
        return rotate(x, self.signs(store, x.shape[1], x.shape[-1])) if self.rotate else x

    def from_rotated(self, y: torch.Tensor, store) -> torch.Tensor:
        return unrotate(y.float(), self.signs(store, y.shape[1], y.shape[-1])) if self.rotate else y.float()

    # -- coding ---------------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, store) -> dict[str, torch.Tensor]:
        if not torch.isfinite(x).all():
            raise ValueError("non-finite values cannot be stored")
        d = x.shape[-1]
        y = self.to_rotated(x, store)
        native = self.quantizer == "lloydmax" and self.bits in (2, 3, 4) and d % 8 == 0 and _native_rows(y)
        norm_dtype = NORM_DTYPES[self.norm]
        if self.bits == 16:
            return {"codes": y.half()}
        if self.quantizer == "uniform":
            codes, scale, zero, _ = encode_block(y.reshape(*y.shape[:3], d), self._inner)
            return {"codes": codes, "scale": scale, "zero": zero}
        if self.quantizer == "fp8":
            amax = y.abs().amax(-1, keepdim=True)
            scale = (amax / 448.0).clamp_min(1e-30).to(norm_dtype)
            codes = (y / scale.float()).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
            return {"codes": codes, "norms": scale}
        n = y.norm(dim=-1, keepdim=True)
        if native:
            edges, book = _lloydmax_tables(self.bits)
            y = y.contiguous()
            codes = torch.empty(*y.shape[:3], d * self.bits // 8, dtype=torch.uint8)
            back = torch.empty_like(y)
            _native.lloydmax_tokens(codes, back, y, n, edges, book, math.sqrt(d), self.bits)
        else:
            raw = lloydmax_encode(y / n.clamp_min(1e-30), self.bits)
            codes = pack(raw, self.bits)
        if self.norm_correction:
            back = (back if native else lloydmax_decode(raw, self.bits, d)).norm(dim=-1, keepdim=True)
            n = n / back.clamp_min(1e-30)
        norms = n.to(norm_dtype)
        if not torch.isfinite(norms).all():
            raise ValueError(f"a vector norm exceeds the {self.norm} range")
        return {"codes": codes, "norms": norms}

    def decode_rotated(self, fields: dict[str, torch.Tensor], store) -> torch.Tensor:
        """Tokens in the rotated space, float32 [B, H, T, d]."""
        d = store.head_dim
        codes = fields["codes"]
        if self.bits == 16:
            return codes.float()
        if self.quantizer == "uniform":
            g = dequantize(codes, fields["scale"], fields["zero"], self.bits, self.group)
            return g.reshape(g.shape[0], g.shape[1], -1, d)
        if self.quantizer == "fp8":
            return codes.view(torch.float8_e4m3fn).float() * fields["norms"].float()
        return lloydmax_decode(unpack(codes, self.bits, d), self.bits, d) * fields["norms"].float()

    def decode(self, fields: dict[str, torch.Tensor], store) -> torch.Tensor:
        return self.from_rotated(self.decode_rotated(fields, store), store)


def decode_rotated(store) -> torch.Tensor | None:
    """Every token of a rotation-codec store in the rotated space (float32 [B, H, T, d]); None when empty."""
    if not store.pages:
        return None
    return store.codec.decode_rotated(store.fields(), store)


def rotated_problem(query: torch.Tensor, key_store, value_store, exact_keys: torch.Tensor,
                    exact_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor | None]:
    """A decode-attention problem moved into the stores' rotated spaces, as the kernels read rotated codes: the
    query [B, HQ, Q, D] and the exact keys turn with the keys' rotation, the exact values with the values' (each
    float32; stores whose codes are not rotated leave their side as it is). Returns (query, exact keys, exact
    values, the values' signs [HQ, D] to turn the output back with `unrotate`, or None)."""
    hq, hkv, d = query.shape[1], exact_keys.shape[1], query.shape[-1]
    rep = hq // hkv
    q, ek, ev = query.float(), exact_keys.float(), exact_values.float()
    key_signs, value_signs = (s.codec.signs(s, hkv, d) if isinstance(s.codec, RotationCodec) and s.codec.rotate
                              else None for s in (key_store, value_store))
    if key_signs is not None:
        q = rotate(q, key_signs.repeat_interleave(rep, 0))
        ek = rotate(ek, key_signs)
    if value_signs is not None:
        ev = rotate(ev, value_signs)
        value_signs = value_signs.repeat_interleave(rep, 0)
    return q, ek, ev, value_signs
