"""`tada`: TaDA (AMD, ACL 2025 industry) mean-centred quantization, uniform bits (per-layer bits come with profiles).

`center="head"` is the paper's scheme: each token's mean over the KV heads is kept in fp16 and only the deviations
are quantized; it costs 16/kv_heads bits per element (5.3 on SmolLM2's 3 KV heads). `center="channel"` subtracts
each head's per-channel mean over the prefill instead, for almost no bytes.

Under tensor parallelism a rank holds only its KV heads; `mean_heads="all"` (default) gathers the other ranks'
heads of each block as it is compressed, so the mean (and every code) is the one a single process stores, and
`mean_heads="rank"` averages the rank's own heads without communicating (a different codec). Either way every
rank keeps the head mean of its heads, so the mean costs 16/(KV heads per rank) bits per element.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..codecs.quant import MEAN_HEADS, GroupCodec
from ..codecs.rotation import RotationCodec
from ..profile import ROTATABLE_BITS, Profile, load_profile
from .base import option, register, take_profile_options
from .kivi import Kivi


ROTATE_CHOICES = ("none", "keys", "values", "both")


@register
@dataclass
class Tada(Kivi):
    name = "tada"
    summary = "KIVI-style quantization of mean-centred keys and values (TaDA)"

    mean: str = option("head", "what is subtracted before quantizing: 'head' (per-token mean over KV heads), "
                               "'channel' (per-head channel mean of the prefill) or 'none'")

    profile: str = option("", "per-layer bits, centering and rotation from a profile file (`kvshrink calibrate`);"
                              " overrides bits/key_bits/value_bits/mean/rotate layer by layer")
    rotate: str = option("none", "rotation codec (randomized Hadamard + Lloyd-Max codes, `turboquant`'s) instead of "
                                 "grouped codes for: 'none', 'keys', 'values' or 'both' (bits 2-4, mean 'none')")
    rotation_seed: int = option(0, "seed of the rotations' random signs")
    mean_heads: str = option("all", "under tensor parallelism, the heads mean=head averages: 'all' KV heads "
                                    "(gathered from every rank, as one process) or 'rank' (this rank's heads only, "
                                    "no communication)")

    def center(self) -> str:
        return self.mean

    def validate(self) -> None:
        if self.mean_heads not in MEAN_HEADS:
            raise ValueError(f"{self.name}: mean_heads must be one of {', '.join(MEAN_HEADS)}, "
                             f"got {self.mean_heads!r}")
        if self.rotate not in ROTATE_CHOICES:
            raise ValueError(f"{self.name}: rotate must be one of {', '.join(ROTATE_CHOICES)}, got {self.rotate!r}")
        self._profile: Profile | None = load_profile(self.profile) if self.profile else None
        if self._profile is not None:
            self._apply_profile_options(self._profile)
        super().validate()

    def _apply_profile_options(self, profile: Profile) -> None:
        """Take the options the profile was calibrated with; an explicit different value is an error."""
        take_profile_options(self, profile.options, ("profile", "bits", "key_bits", "value_bits", "mean", "rotate"),
                             f"profile {self.profile}")

    def specs(self, layer_idx: int | None = None) -> tuple[GroupCodec | RotationCodec, GroupCodec | RotationCodec]:
        if self._profile is None or layer_idx is None:
            k, v = (dataclasses.replace(s, mean_heads=self.mean_heads) for s in super().specs(layer_idx))
            rot = (self.rotate in ("keys", "both"), self.rotate in ("values", "both"))
        else:
            c = self._profile.layers[layer_idx]
            k = GroupCodec(c.key_bits, self.key_group or self.group, self.key_axis, c.key_mean, self.mean_heads)
            v = GroupCodec(c.value_bits, self.value_group or self.group, self.value_axis, c.value_mean,
                           self.mean_heads)
            rot = (c.key_rotate, c.value_rotate)
        return tuple(self._rotated(spec, layer_idx or 0) if r else spec for spec, r in zip((k, v), rot))

    def _rotated(self, spec: GroupCodec, layer_idx: int) -> RotationCodec:
        if spec.bits not in ROTATABLE_BITS or spec.center != "none":
            raise ValueError(f"{self.name}: rotation needs bits in {ROTATABLE_BITS} and mean 'none', got "
                             f"bits={spec.bits}, mean={spec.center!r}")
        return RotationCodec(spec.bits, "lloydmax", seed=self.rotation_seed, layer=layer_idx)

    def use_profile(self, profile: Profile) -> "Tada":
        """Take per-layer choices from an in-memory profile (as the `profile` option does from a file)."""
        self._apply_profile_options(profile)
        self._profile = profile
        return self

    def prepare(self, model_or_config):
        if self._profile is not None:
            self._profile.check_model(model_or_config, f"profile {self.profile}")
        super().prepare(model_or_config)
