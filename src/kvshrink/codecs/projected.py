"""The `projected` codec: each token of a head as its leading `rank` coefficients in a basis fitted on calibration
text (`kvshrink calibrate --method tale`: uncentred PCA per layer and KV head, keys after the rotary embedding), the
coefficients coded per coefficient over groups of `group` tokens (as KIVI codes keys: one fp16 scale and zero per
coefficient and group), so a coefficient with a wide range never stretches the scale of a narrow one.

It is the low-rank recipe of TALE/Palu at one rank and bit width per layer and head, as a codec: any token policy
composes with it, and the joint calibration (`kvshrink calibrate --method layered --key-codecs ...`) can choose it
for the layers where it is the cheapest for its quality. The basis's first `rank` columns are held once per store in
fp16 (part "bases" of the memory report: [batch, heads, head_dim, rank]) and encoding and decoding both use that
fp16 copy. Attention decodes (coefficients times the basis) and attends; the latent-space attention of `tale` and
`dynakv` stays theirs.

Which basis: the store's role (the layer names its key and value stores), or `side=key|value` to pin it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import option
from .base import BIT_WIDTHS, Codec, Field, Layout, register_codec
from .quant import GroupCodec, dequantize, encode_block

SIDES = ("auto", "key", "value")
_LOADED: dict[tuple[str, float], object] = {}


def _bases_profile(path: str):
    """The bases profile at `path`, read once per file version (bases are megabytes: every layer's codecs share it)."""
    from ..profile import load_profile, resolve_profile

    resolved = resolve_profile(path)
    key = (str(resolved), resolved.stat().st_mtime)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_profile(resolved)
    return _LOADED[key]


@register_codec
@dataclass(frozen=True)
class ProjectedCodec(Codec):
    name = "projected"
    summary = "low rank: each token's leading coefficients in a fitted per-head basis, coded per coefficient"

    bases: str = option("", "a bases profile with per-head bases (kvshrink calibrate --method tale -o FILE)")
    rank: int = option(64, "coefficients kept per token and head (<= head_dim)")
    bits: int = option(4, f"code width of the coefficients: {', '.join(map(str, BIT_WIDTHS['uniform']))} "
                          "(16 = fp16 coefficients)")
    group: int = option(32, "tokens sharing one fp16 scale and zero point per coefficient")
    side: str = option("auto", "which basis codes: 'auto' (the store's: keys or values), 'key' or 'value'")
    layer: int = option(0, "the layer whose basis codes (set by the layer that builds the codec)")

    def validate(self) -> None:
        if not self.bases:
            raise ValueError("bases= is required: a bases profile from `kvshrink calibrate --method tale -o FILE`")
        if self.bits not in BIT_WIDTHS["uniform"]:
            raise ValueError(f"bits must be one of {BIT_WIDTHS['uniform']}, got {self.bits!r}")
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {', '.join(SIDES)}, got {self.side!r}")
        for name in ("rank", "group"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")
        prof = _bases_profile(self.bases)
        if prof.method != "lowrank" or "joint" not in prof.options:
            raise ValueError(f"bases={self.bases} holds no low-rank bases (a {prof.method!r} profile): make one with "
                             "`kvshrink calibrate --method tale`")
        if prof.options["joint"]:
            raise ValueError(f"bases={self.bases} holds joint (dynakv) bases; projected codes each head in its own "
                             "basis: calibrate with --method tale")
        if prof.options.get("key_space", "post_rope") != "post_rope":
            raise ValueError(f"bases={self.bases} holds keys fitted before the rotary embedding; the cache stores "
                             "them after it: calibrate with the default --key-space")

    @property
    def inner(self) -> GroupCodec:
        """How the coefficients are coded: per-coefficient groups along tokens (fp16 values at 16 bits)."""
        return GroupCodec(self.bits, self.group, "channel")

    @property
    def tokens_per_unit(self) -> int:
        return self.inner.tokens_per_unit

    def check_head_dim(self, head_dim: int, name: str) -> None:
        if self.rank > head_dim:
            raise ValueError(f"{name}: rank {self.rank} exceeds head_dim={head_dim}")
        basis = self._basis("key")
        if basis.shape[-1] != head_dim:
            raise ValueError(f"{name}: bases={self.bases} are for head_dim {basis.shape[-1]}, the model's is "
                             f"{head_dim}")

    def layout(self, head_dim: int) -> Layout:
        fields = self.inner.layout(self.rank).fields
        fields += (Field("basis", torch.float16, (head_dim, self.rank), "bases", tokens=0),)
        params = (("bits", self.bits), ("rank", self.rank), ("group", self.group))
        return Layout("projected", params, fields, self.tokens_per_unit)

    def describe(self) -> str:
        return f"rank {self.rank} x {self.bits}-bit per coefficient (g{self.group})"

    def _basis(self, side: str) -> torch.Tensor:
        """[heads, head_dim, head_dim] of this codec's layer (columns by decreasing energy)."""
        from ..bases import layer_bases

        kb, _, vb, _ = layer_bases(_bases_profile(self.bases), self.layer, False, f"projected: bases={self.bases}")
        return kb if side == "key" else vb

    def _store_basis(self, x: torch.Tensor, store) -> torch.Tensor:
        """The fp16 basis [B, H, D, rank] of the heads `store` holds, set in its state by the first block."""
        if "basis" not in store.state:
            side = self.side if self.side != "auto" else getattr(store, "role", None)
            if side not in ("key", "value"):
                raise ValueError(f"projected: {getattr(store, 'name', 'a store')} is neither a layer's keys nor "
                                 "its values: give side=key or side=value")
            basis = self._basis(side)[:, :, :self.rank]
            shard = getattr(store, "shard", None)
            if shard is not None:
                if basis.shape[0] != shard.total:
                    raise ValueError(f"projected: bases for {basis.shape[0]} KV heads; the model has {shard.total}")
                basis = basis[shard.start:shard.stop]
            heads = getattr(store, "head_index", None)
            if heads is not None:
                basis = basis[heads]
            if basis.shape[0] != x.shape[1]:
                raise ValueError(f"projected: bases={self.bases} hold {basis.shape[0]} KV heads at layer "
                                 f"{self.layer}; the store holds {x.shape[1]}")
            store.state["basis"] = basis.half().unsqueeze(0).expand(x.shape[0], -1, -1, -1).contiguous()
        return store.state["basis"]

    def encode(self, x: torch.Tensor, store) -> dict[str, torch.Tensor]:
        x = x.float()
        if not torch.isfinite(x).all():
            raise ValueError(f"non-finite values cannot be stored (layer {self.layer})")
        coeffs = x @ self._store_basis(x, store).float()  # [B, H, T, rank]
        codes, scale, zero, _ = encode_block(coeffs, self.inner)
        return {"codes": codes} if scale is None else {"codes": codes, "scale": scale, "zero": zero}

    def decode(self, fields: dict[str, torch.Tensor], store) -> torch.Tensor:
        codes = fields["codes"]
        b, h = codes.shape[:2]
        if self.bits == 16:
            coeffs = codes.float()
        else:
            coeffs = dequantize(codes, fields["scale"], fields["zero"], self.bits, self.rank).reshape(b, h, -1,
                                                                                                      self.rank)
        return coeffs @ store.state["basis"].float().transpose(-1, -2)

