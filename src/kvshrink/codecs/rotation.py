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

from .packing import pack, unpack
from .quant import QuantSpec, QuantStore

QUANTIZERS = ("lloydmax", "uniform", "fp8")
ROTATED_BITS = (2, 3, 4, 8, 16)
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


def rotate(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """R x = H (D x) for x [B, H, T, d] (float32) and signs s [H, d]."""
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


def lloydmax_decode(codes: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    c, _ = gaussian_codebook(bits)
    return c.to(codes.device)[codes.long()] / math.sqrt(d)


# -- the spec and the store --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RotationSpec:
    """How one tensor (keys or values) of one layer is rotated and quantized.

    bits: 2, 3, 4 (or 8 with 'uniform'/'fp8'; 16 keeps rotated fp16 values). quantizer: 'lloydmax', 'uniform'
    (per-token groups of `group` rotated channels), 'fp8'. rotate: False quantizes without the rotation (fp8 keys).
    norm: dtype of the kept norms/scales. norm_correction: keep ||x|| / ||decoded unit vector||.
    seed, layer: which rotation.
    """

    bits: int = 4
    quantizer: str = "lloydmax"
    group: int = 32
    rotate: bool = True
    norm: str = "float16"
    norm_correction: bool = True
    seed: int = 0
    layer: int = 0

    axis = "token"  # what the layer's report and block logic read (rotated stores are per token)
    center = "none"
    tokens_per_unit = 1

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.bits not in ROTATED_BITS:
            raise ValueError(f"bits must be one of {ROTATED_BITS}, got {self.bits!r}")
        if self.quantizer == "fp8" and self.bits != 8:
            raise ValueError(f"quantizer 'fp8' stores 8 bits, got bits={self.bits}")
        if self.quantizer == "lloydmax" and self.bits == 8:
            raise ValueError("quantizer 'lloydmax' takes bits 2, 3 or 4 (8 bits: use 'uniform' or 'fp8')")
        if self.norm not in NORM_DTYPES:
            raise ValueError(f"norm must be one of {', '.join(NORM_DTYPES)}, got {self.norm!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
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

    def make_store(self, name: str) -> "RotatedStore":
        return RotatedStore(self, name)

    def describe(self) -> str:
        what = {"lloydmax": "Lloyd-Max", "uniform": f"uniform g{self.group}", "fp8": "fp8"}[self.quantizer]
        return f"{'rotated ' if self.rotate else ''}{what}{' nc' if self.norm_correction else ''}"


class RotatedStore:
    """The rotated, quantized tokens of one tensor of one layer; `decode` gives them back unrotated, and
    `decode_rotated` in the rotated space (what attention without inverse rotation reads)."""

    def __init__(self, spec: RotationSpec, name: str = "tensor"):
        self.spec, self.name = spec, name
        self.tokens = 0
        self.head_dim = 0
        self.codes: torch.Tensor | None = None  # [B, H, T, packed bytes] (uniform: QuantStore holds them)
        self.norms: torch.Tensor | None = None  # [B, H, T, 1]
        # uniform codes live in a grouped store of the rotated vectors
        self.inner = QuantStore(QuantSpec(spec.bits, spec.group, "token", "none"), name) \
            if spec.quantizer == "uniform" and spec.bits != 16 else None
        self._signs: torch.Tensor | None = None
        self.shard = None  # the global KV heads held under tensor parallelism (set by the layer)

    def signs(self, heads: int, d: int) -> torch.Tensor:
        """The signs of the `heads` heads held; under tensor parallelism the rows of this rank's global heads, so
        every head is rotated as in one process."""
        if self._signs is None or self._signs.shape != (heads, d):
            shard = self.shard
            if shard is not None and heads == shard.heads:
                every = signs(self.spec.seed, self.spec.layer, shard.total, d)
                self._signs = every[shard.start:shard.stop].clone()
            else:
                self._signs = signs(self.spec.seed, self.spec.layer, heads, d)
        return self._signs

    def to_rotated(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, d] in the rotated space (float32)."""
        x = x.float()
        return rotate(x, self.signs(x.shape[1], x.shape[-1])) if self.spec.rotate else x

    def from_rotated(self, y: torch.Tensor) -> torch.Tensor:
        return unrotate(y.float(), self.signs(y.shape[1], y.shape[-1])) if self.spec.rotate else y.float()

    def append(self, x: torch.Tensor) -> None:
        """Rotate, quantize and store a block of tokens x [B, H, T, d]."""
        if x.shape[2] == 0:
            return
        spec = self.spec
        spec.check_head_dim(x.shape[-1], self.name)
        if not torch.isfinite(x).all():
            raise ValueError(f"{self.name}: non-finite values cannot be stored")
        self.head_dim = x.shape[-1]
        y = self.to_rotated(x)
        norm_dtype = NORM_DTYPES[spec.norm]
        if spec.bits == 16:
            codes, norms = y.half(), None
        elif spec.quantizer == "uniform":
            self.inner.append(y)
            self.tokens += x.shape[2]
            return
        elif spec.quantizer == "fp8":
            amax = y.abs().amax(-1, keepdim=True)
            scale = (amax / 448.0).clamp_min(1e-30).to(norm_dtype)
            codes = (y / scale.float()).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
            norms = scale
        else:
            n = y.norm(dim=-1, keepdim=True)
            u = y / n.clamp_min(1e-30)
            raw = lloydmax_encode(u, spec.bits)
            if spec.norm_correction:
                back = lloydmax_decode(raw, spec.bits, self.head_dim).norm(dim=-1, keepdim=True)
                n = n / back.clamp_min(1e-30)
            codes, norms = pack(raw, spec.bits), n.to(norm_dtype)
            if not torch.isfinite(norms).all():
                raise ValueError(f"{self.name}: a vector norm exceeds the {spec.norm} range")
        self.codes = codes if self.codes is None else torch.cat([self.codes, codes], 2)
        if norms is not None:
            self.norms = norms if self.norms is None else torch.cat([self.norms, norms], 2)
        self.tokens += x.shape[2]

    def decode_rotated(self) -> torch.Tensor | None:
        """All stored tokens in the rotated space, float32 [B, H, T, d]; None when empty."""
        if self.tokens == 0:
            return None
        spec, d = self.spec, self.head_dim
        if spec.bits == 16:
            return self.codes.float()
        if spec.quantizer == "uniform":
            return self.inner.decode(torch.float32)
        if spec.quantizer == "fp8":
            return self.codes.view(torch.float8_e4m3fn).float() * self.norms.float()
        return lloydmax_decode(unpack(self.codes, spec.bits, d), spec.bits, d) * self.norms.float()

    def decode(self, dtype: torch.dtype) -> torch.Tensor | None:
        y = self.decode_rotated()
        return None if y is None else self.from_rotated(y).to(dtype)

    def parts(self) -> dict[str, list[torch.Tensor]]:
        if self.inner is not None:
            return self.inner.parts()
        out: dict[str, list[torch.Tensor]] = {"codes": [], "scales": [], "means": []}
        if self.codes is not None:
            out["codes"].append(self.codes)
        if self.norms is not None:
            out["scales"].append(self.norms)
        return out

    def map_batch(self, fn) -> None:
        if self.inner is not None:
            self.inner.map_batch(fn)
        for attr in ("codes", "norms"):
            t = getattr(self, attr)
            if t is not None:
                setattr(self, attr, fn(t))

    def drop_front(self, n: int) -> None:
        if n <= 0:
            return
        if n > self.tokens:
            raise ValueError(f"{self.name}: cannot drop {n} of {self.tokens} tokens")
        if self.inner is not None:
            self.inner.drop_front(n)
        else:
            self.codes = self.codes[:, :, n:].clone()
            if self.norms is not None:
                self.norms = self.norms[:, :, n:].clone()
        self.tokens -= n
