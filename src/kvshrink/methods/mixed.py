"""`mixed`: evict to low bits instead of dropping (MiKV, "No token left behind"): any eviction policy decides which
tokens stay exact; the rest are kept quantized per token at `bits` bits, never dropped. `budget` is the share of
fp16 bytes the keys and values may take; the share kept exact follows from what a low-bit token costs. Each
token's position (int32) and score (float32) come on top, 3% of fp16 at head dim 64, and are in the reported bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..codecs.base import BIT_WIDTHS, Codec
from ..codecs.quant import GroupCodec
from ..codecs.rotation import RotationCodec
from ..profile import LayerChoice, load_profile
from .base import option, register
from .eviction import EvictionMethod

LOW_BITS = tuple(b for b in BIT_WIDTHS["uniform"] if b != 16)


@register
@dataclass
class Mixed(EvictionMethod):
    name = "mixed"
    summary = "an eviction policy picks the exact tokens, the others stay at low bits (MiKV); budget = share of fp16 bytes"

    budget: float = option(0.5, "share of fp16 bytes the keys and values may take (exact tokens plus low-bit ones)")
    policy: str = option("h2o", "eviction policy scoring the tokens: streamingllm, h2o, snapkv, tova")
    bits: int = option(2, "code width of the low tier: 2, 3, 4 or 8")
    group: int = option(32, "channels sharing one fp16 scale and zero point in the low tier (MiKV: head_dim / 2)")
    mean: str = option("none", "subtracted from the low tier before quantizing: 'none', or 'channel' (each head's "
                               "per-channel mean of the first evicted block, TaDA's centering; removes the key "
                               "outlier channels' offset that per-token groups otherwise spend their range on)")

    codec: str = option("grouped", "low tier codes: 'grouped' (per-token groups of `group` channels, MiKV) or "
                                   "'rotated' (each token's vector rotated by a seeded Hadamard transform, its norm "
                                   "kept and its direction coded by a Lloyd-Max codebook: no group spends its range "
                                   "on an outlier channel, and it works for tokens evicted one at a time)")

    low: str = option("", "a TaDA profile (path or shipped name) whose per-layer bits and rotation code the low tier "
                          "instead of `bits`/`codec`/`mean`: a rotated choice gives rotated codes; an unrotated one "
                          "per-token groups of `group` channels, keys centred per channel (per-channel key groups "
                          "cannot take tokens evicted one at a time). `budget` is then the whole cache's: every layer "
                          "keeps the same share of tokens exact, the one that brings the mean over layers to it")

    def scoring_policy(self) -> str:
        return self.policy

    def validate(self) -> None:
        super().validate()
        if self.bits not in LOW_BITS:
            raise ValueError(f"mixed: bits must be one of {', '.join(map(str, LOW_BITS))}, got {self.bits}")
        if self.mean not in ("none", "channel"):
            raise ValueError(f"mixed: mean must be 'none' or 'channel', got {self.mean!r}")
        if self.group < 1:
            raise ValueError(f"mixed: group must be >= 1, got {self.group}")
        if self.codec not in ("grouped", "rotated"):
            raise ValueError(f"mixed: codec must be 'grouped' or 'rotated', got {self.codec!r}")
        if self.codec == "rotated" and (self.mean != "none" or self.bits == 8):
            raise ValueError("mixed: codec='rotated' takes bits 2, 3 or 4 and mean 'none'")
        self._low_profile = None
        if self.low:
            prof = load_profile(self.low)
            if prof.method != "tada" or not all(isinstance(c, LayerChoice) for c in prof.layers):
                raise ValueError(f"mixed: low={self.low!r} is a {prof.method!r} profile; the low tier takes a TaDA "
                                 "profile's per-layer bits (kvshrink calibrate --method tada)")
            self._low_profile = prof

    def prepare(self, model_or_config) -> None:
        super().prepare(model_or_config)
        if self._low_profile is not None:
            self._low_profile.check_model(model_or_config, f"mixed: low={self.low}")

    def _low_codecs(self, layer_idx: int) -> tuple[Codec, Codec]:
        """The low tier's key and value codecs of one layer: from `low`'s profile, or `bits`/`codec`/`mean`."""
        if self._low_profile is None:
            if self.codec == "rotated":
                spec = RotationCodec(self.bits, "lloydmax", layer=layer_idx)
            else:
                spec = GroupCodec(self.bits, self.group, "token", self.mean)
            return spec, spec
        layers = self._low_profile.layers
        if layer_idx >= len(layers):
            raise ValueError(f"mixed: low={self.low!r} has {len(layers)} layers; the model has layer {layer_idx}")
        c = layers[layer_idx]

        def one(bits: int, rotate: bool, centre: str) -> Codec:
            if rotate:
                return RotationCodec(bits, "lloydmax", layer=layer_idx)
            return GroupCodec(bits, self.group, "token", centre if bits < 16 else "none")

        return one(c.key_bits, c.key_rotate, "channel"), one(c.value_bits, c.value_rotate, "none")

    def low_tier(self, head_dim, layer_idx: int = 0, kept: Codec | None = None):
        key, value = self._low_codecs(layer_idx)
        for codec in (key, value):
            codec.check_head_dim(head_dim, "mixed low tier")
        # bytes of one token's keys and values in one head: exact (16-bit) unless a composition codes the kept ones
        high = 4 * head_dim if kept is None else 2 * kept.layout(head_dim).token_bytes()
        fp16 = 4 * head_dim
        if self._low_profile is None:
            low = key.layout(head_dim).token_bytes() + value.layout(head_dim).token_bytes()
            what = f"{self.bits} bits"
        else:
            # A calibrated low tier costs more on some layers than on others (the rotation-aware 0.20 profile spends
            # 0.25 of fp16 on layer 19 and 0.14 on most): the budget is the whole cache's, and every layer keeps the
            # same share of its tokens exact, the one that brings the mean over layers to the budget.
            costs = [sum(c.layout(head_dim).token_bytes() for c in self._low_codecs(i))
                     for i in range(len(self._low_profile.layers))]
            low = sum(costs) / len(costs)
            what = f"the codes of {self.low} (mean over its {len(costs)} layers)"
        share = (self.budget * fp16 - low) / (high - low) if high > low else 1.0
        if share <= 0:
            raise ValueError(f"mixed: budget {self.budget} is below the cost of keeping every token at {what} "
                             f"({low / fp16:.3f} of fp16): raise it or lower bits")
        return (key, value), min(share, 1.0)
