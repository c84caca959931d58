"""The `exact` codec: tokens held as they are, in a 16- or 32-bit float dtype (the kept tokens of eviction
policies, and the reference every lossy codec is compared with)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import option
from .base import Codec, Field, Layout, register_codec

#: what `dtype` may name; "model" is resolved to the model's dtype by the layer that builds the store
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@register_codec
@dataclass(frozen=True)
class ExactCodec(Codec):
    name = "exact"
    summary = "tokens held uncompressed, in float16, bfloat16, float32 or the model's dtype"

    dtype: str = option("float16", "float16, bfloat16, float32, or 'model' (the model's own dtype)")

    def validate(self) -> None:
        if self.dtype not in (*DTYPES, "model"):
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, model; got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "model":
            raise ValueError("exact:dtype=model is resolved by the layer once it sees the model's dtype")
        return DTYPES[self.dtype]

    @property
    def lossless(self) -> bool:
        return True

    def layout(self, head_dim: int) -> Layout:
        # held tokens are reported with the exact window: both are keys and values kept as they were computed
        return Layout("exact", (("dtype", self.dtype),), (Field("values", self.torch_dtype, (head_dim,), "window"),))

    def encode(self, x: torch.Tensor, store) -> dict[str, torch.Tensor]:
        return {"values": x.to(self.torch_dtype)}

    def decode(self, fields: dict[str, torch.Tensor], store) -> torch.Tensor:
        return fields["values"].float()

    def describe(self) -> str:
        return f"exact {self.dtype}"
