"""`tada`: TaDA (AMD, ACL 2025 industry) mean-centred quantization, uniform bits (per-layer bits come with profiles).

`center="head"` is the paper's scheme: each token's mean over the KV heads is kept in fp16 and only the deviations
are quantized; it costs 16/kv_heads bits per element (5.3 on SmolLM2's 3 KV heads). `center="channel"` subtracts
each head's per-channel mean over the prefill instead, for almost no bytes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..codecs.quant import QuantSpec
from ..profile import Profile, load_profile
from .base import option, register
from .kivi import Kivi


@register
@dataclass
class Tada(Kivi):
    name = "tada"
    summary = "KIVI-style quantization of mean-centred keys and values (TaDA)"

    mean: str = option("head", "what is subtracted before quantizing: 'head' (per-token mean over KV heads), "
                               "'channel' (per-head channel mean of the prefill) or 'none'")

    profile: str = option("", "per-layer bits and centering from a profile file (`kvshrink calibrate`); "
                              "overrides bits/key_bits/value_bits/mean layer by layer")

    def center(self) -> str:
        return self.mean

    def validate(self) -> None:
        self._profile: Profile | None = load_profile(self.profile) if self.profile else None
        if self._profile is not None:
            self._apply_profile_options(self._profile)
        super().validate()

    def _apply_profile_options(self, profile: Profile) -> None:
        """Take the options the profile was calibrated with; an explicit different value is an error."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, value in profile.options.items():
            if key not in defaults or key in ("profile", "bits", "key_bits", "value_bits", "mean"):
                raise ValueError(f"profile {self.profile}: option {key!r} cannot be set by a profile")
            mine = getattr(self, key)
            if mine != value and mine != defaults[key]:
                raise ValueError(f"profile {self.profile} was calibrated with {key}={value!r}; "
                                 f"{key}={mine!r} was asked for: recalibrate, or leave {key} out")
            setattr(self, key, value)

    def specs(self, layer_idx: int | None = None) -> tuple[QuantSpec, QuantSpec]:
        if self._profile is None or layer_idx is None:
            return super().specs(layer_idx)
        c = self._profile.layers[layer_idx]
        return (QuantSpec(c.key_bits, self.key_group or self.group, self.key_axis, c.key_mean),
                QuantSpec(c.value_bits, self.value_group or self.group, self.value_axis, c.value_mean))

    def use_profile(self, profile: Profile) -> "Tada":
        """Take per-layer choices from an in-memory profile (as the `profile` option does from a file)."""
        self._apply_profile_options(profile)
        self._profile = profile
        return self

    def make_cache(self, model_or_config):
        if self._profile is not None:
            self._profile.check_model(model_or_config, f"profile {self.profile}")
        return super().make_cache(model_or_config)
