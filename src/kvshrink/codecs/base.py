"""What every codec is: a registered recipe (a frozen dataclass of options) that says how one tensor of a layer (its
keys or its values) is stored, declared once as a `Layout`.

A layout names the tensors a store holds for a run of tokens (`Field`: dtype, trailing shape, how many tokens one
entry covers, which part of the memory report it is) and the codec's kind and parameters, which is what the kernels
and the cache file dispatch on; nobody else spells a store's layout. A codec encodes a block of tokens into those
fields and decodes them back; `codecs.store.PagedStore` keeps the fields in fixed-size pages.

`BIT_WIDTHS` is the one table of the bit widths each way of coding a number allows.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import spec as specs
from ..options import check_types, convert, registrar, unknown_options

#: bit widths by number format (16: fp16 values, no codes); every codec, kernel and profile check reads this table
BIT_WIDTHS: dict[str, tuple[int, ...]] = {
    "uniform": (2, 3, 4, 8, 16),  # asymmetric codes with a scale and zero per group (kivi, tada, levels)
    "lloydmax": (2, 3, 4),  # rotated coordinates against a Gaussian codebook (TurboQuant / PolarQuant)
    "fp8": (8,),  # float8 e4m3 with a per-token scale
}

#: parts of the memory report, in the order it lists them
PARTS = ("codes", "scales", "means", "window", "sinks", "bases", "levels", "positions", "residuals", "lowrank",
         "outliers")

CODECS: dict[str, type["Codec"]] = {}
#: class decorator: make a codec available by its `name` (`kvshrink codecs`, `POLICY + CODEC` specs, profiles)
register_codec = registrar(CODECS, "codec")


@dataclass(frozen=True)
class Field:
    """One tensor a store holds, shaped [batch, heads (1 if `shared_heads`), entries, *shape].

    tokens: tokens one entry covers along dim 2 (1 for a per-token field, the group for a per-channel group's
    scales); 0 for a fixed field held once per store (a channel mean fixed by the first block).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    part: str
    tokens: int = 1
    shared_heads: bool = False

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ValueError(f"field {self.name}: part must be one of {PARTS}, got {self.part!r}")


@dataclass(frozen=True)
class Layout:
    """A store's byte layout: the kind kernels dispatch on, its parameters, its fields, and the unit of tokens
    appended or dropped together (a per-channel group spans `unit` tokens)."""

    kind: str
    params: tuple[tuple[str, Any], ...]
    fields: tuple[Field, ...]
    unit: int = 1

    def param(self, name: str) -> Any:
        return dict(self.params)[name]

    @property
    def growing(self) -> tuple[Field, ...]:
        """Fields with entries per token (paged)."""
        return tuple(f for f in self.fields if f.tokens)

    @property
    def fixed(self) -> tuple[Field, ...]:
        """Fields held once per store."""
        return tuple(f for f in self.fields if not f.tokens)

    def token_bytes(self, heads: int = 1) -> float:
        """Bytes one token costs in one head (fixed fields excluded); a shared-heads field counted per head, or, with
        `heads`, split among that many heads (what it costs a head when they all hold it once)."""
        return sum(_field_bytes(f, heads) / f.tokens for f in self.growing)

    def fixed_bytes(self, heads: int = 1) -> float:
        """Bytes of the fields held once per store, per head (a shared-heads one split among `heads`)."""
        return sum(_field_bytes(f, heads) for f in self.fixed)


def _field_bytes(f: Field, heads: int) -> float:
    """Bytes of one entry of a field in one head (a shared-heads field's entry split among `heads`)."""
    n = 1
    for s in f.shape:
        n *= s
    return n * torch.empty((), dtype=f.dtype).element_size() / (heads if f.shared_heads else 1)


@dataclass(frozen=True)
class Codec:
    """Base of every codec. Subclasses are frozen dataclasses whose fields are the options."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: attention backends per device type: "torch" (decode, then attend), "cpu" (the C++ kernel reading the codes),
    #: "triton" (the GPU kernels); which one a layer uses is decided when the cache is made
    backends: ClassVar[dict[str, tuple[str, ...]]] = {"cpu": ("torch",), "cuda": ("torch",)}

    def __post_init__(self) -> None:
        check_types(self, "codec")
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the option when the settings are unusable (called on construction)."""

    @property
    def tokens_per_unit(self) -> int:
        """Tokens that must be appended or dropped together."""
        return 1

    def for_values(self) -> "Codec":
        """The codec that codes values where this one is given for them (a bare codec as a method, a composition's
        CODEC, a layered profile's value codec): this one, unless an option says values are coded otherwise
        (`gear:value_axis=`)."""
        return self

    def layout(self, head_dim: int) -> Layout:
        raise NotImplementedError

    def check_head_dim(self, head_dim: int, name: str) -> None:
        """Raise a clear error now if this codec cannot store vectors of `head_dim`."""

    def encode(self, x: torch.Tensor, store: Any) -> dict[str, torch.Tensor]:
        """The fields of a block of tokens x [B, H, T, D] (T a multiple of `tokens_per_unit`) for `store` (the
        `PagedStore` that will hold them); fixed fields missing from `store.state` are set there."""
        raise NotImplementedError

    def decode(self, fields: dict[str, torch.Tensor], store: Any) -> torch.Tensor:
        """Tokens [B, H, T, D] in float32 from the growing fields of a run of them (and the store's fixed ones)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def lossless(self) -> bool:
        """Whether decoding gives back exactly what was encoded (in the store's dtype)."""
        return False


def get_codec(name: str) -> type[Codec]:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; available: {', '.join(sorted(CODECS))}")
    return CODECS[name]


def make_codec(name: str, **options: Any) -> Codec:
    """A codec by name with options (errors name the codec and the option)."""
    cls = get_codec(name)
    unknown_options(cls, "codec", options)
    try:
        return cls(**options)
    except ValueError as e:
        raise ValueError(f"codec {name}: {e}") from None


def codec_from_spec(text: str) -> Codec:
    """A codec from its spec string ('grouped:bits=2,axis=channel')."""
    parts = specs.parse(text)
    if len(parts) != 1:
        raise ValueError(f"codec spec {text!r}: a codec spec is one 'name:key=value,...'")
    cls = get_codec(parts[0].name)
    return make_codec(cls.name, **{k: convert(cls, "codec", k, raw) for k, raw in parts[0].options})
