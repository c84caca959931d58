"""`PerHead`: a layer's keys (or values) coded by a codec of each KV head's own, as a calibration may choose them
(one head at 4 bits, another at 2, a third rotated). Not a registered name: profiles build it from one codec spec per
head; `store.HeadSplitStore` holds it as one paged store per distinct codec."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .base import Codec


@dataclass(frozen=True)
class PerHead(Codec):
    """One codec per KV head, in head order."""

    name = "per-head"
    summary = "a codec for each KV head"

    codecs: tuple = ()

    def validate(self) -> None:
        if not self.codecs or not all(isinstance(c, Codec) for c in self.codecs):
            raise ValueError(f"per-head codecs must be one codec per KV head, got {self.codecs!r}")

    @property
    def tokens_per_unit(self) -> int:
        return math.lcm(*(c.tokens_per_unit for c in self.codecs))

    @property
    def lossless(self) -> bool:
        return all(c.lossless for c in self.codecs)

    @property
    def bits(self) -> str:
        return "/".join(str(getattr(c, "bits", 16)) for c in self.codecs)

    def check_head_dim(self, head_dim: int, name: str) -> None:
        for h, c in enumerate(self.codecs):
            c.check_head_dim(head_dim, f"{name} head {h}")

    def describe(self) -> str:
        return " | ".join(c.describe() for c in self.codecs)
