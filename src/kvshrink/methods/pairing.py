"""`pairing`: a `POLICY + CODEC` composition written down as one profile file, so that
`make_cache(model, profile=PATH)` builds it: the token policy's spec (e.g. `kvzip:budget=0.45`) and the codec's
(e.g. `tada`), with the codec's per-layer choices (a tada profile's bits, centring and rotation; a low-rank
profile's bases) held in the file itself, not named by a path that could move or change.

`pairing_profile` writes one from a policy spec and a codec spec (`kvshrink calibrate --method pairing --policy
SPEC --codec SPEC`); the cache it builds is the composition's, token for token and byte for byte.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

from .. import spec as specs
from ..profile import Profile, ProfileError, fingerprint, load_profile, resolve_profile
from .base import Method, option, register
from .build import build_method, canonical_spec, parse_spec
from .composed import Composition

#: the options a pairing profile holds, and nothing else
OPTIONS = ("policy", "codec")


def pairing_profile(policy: str, codec: str, model_or_config: Any = None) -> Profile:
    """A pairing profile of `policy + codec`. A codec given with `profile=P` (a tada or low-rank profile) has that
    profile's per-layer choices, options and tensors copied in, and P's model; P's file name and digest are recorded
    under `calibration`. Without P, `model_or_config` names the model."""
    build_method(f"{policy} + {codec}")  # every error of the composition itself surfaces here (one policy, one codec)
    policy_spec, codec_spec = (specs.format_spec([(p.name, list(p.options))])
                               for p in specs.parse(canonical_spec(f"{policy} + {codec}")))
    name, codec_options = parse_spec(codec_spec)
    layers, tensors, calibration = [], {}, {"policy": policy_spec}
    source = codec_options.pop("profile", "")
    if source:
        path = resolve_profile(source)  # a shipped profile's name or a path
        codec_profile = load_profile(path)
        if model_or_config is not None:
            codec_profile.check_model(model_or_config, f"profile {source}")
        if codec_profile.method != name:
            raise ProfileError(f"profile {source} builds {codec_profile.method!r}, not {name!r}")
        layers, tensors = codec_profile.layers, codec_profile.tensors
        codec_options = {**codec_profile.options, **codec_options}
        calibration["codec_profile"] = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                        "predicted_ratio": codec_profile.predicted_ratio}
    elif model_or_config is None:
        raise ValueError(f"pairing: codec {codec!r} names no profile, so the model must be given")
    codec_spec = specs.format_part(name, sorted(codec_options.items()))
    model = fingerprint(model_or_config) if model_or_config is not None else codec_profile.model
    return Profile(model, "pairing", {"policy": policy_spec, "codec": codec_spec}, layers,
                   None, calibration, tensors)


@register
@dataclass
class Pairing(Method):
    name = "pairing"
    summary = "a token policy composed with a codec, both from one profile file (POLICY + CODEC written down)"

    profile: str = option("", "a pairing profile (`kvshrink calibrate --method pairing`); required")

    def validate(self) -> None:
        if not self.profile:
            raise ValueError("pairing: needs profile=... (a pairing profile: `kvshrink calibrate --method pairing`)")
        self._profile = load_profile(self.profile)
        self._inner = self.composition(self._profile, self.profile)

    @staticmethod
    def composition(prof: Profile, where: str) -> Composition:
        """The `POLICY + CODEC` composition a pairing profile describes."""
        if prof.method != "pairing":
            raise ProfileError(f"profile {where} builds {prof.method!r}, not a pairing (policy + codec)")
        if set(prof.options) != set(OPTIONS) or not all(isinstance(prof.options[k], str) for k in OPTIONS):
            raise ProfileError(f"profile {where}: a pairing's options are {', '.join(OPTIONS)} (spec strings), got "
                               f"{prof.options!r}")
        try:
            name, codec_options = parse_spec(prof.options["codec"])
            if "profile" in codec_options:
                raise ValueError(f"the codec's choices are held in the file, not named by a path (codec "
                                 f"{prof.options['codec']!r})")
            method = build_method(f"{prof.options['policy']} + {prof.options['codec']}")
        except ValueError as e:
            raise ProfileError(f"profile {where}: {e}") from None
        if prof.layers or prof.tensors:
            if not hasattr(method.storing, "use_profile"):
                raise ProfileError(f"profile {where}: codec {name!r} takes no per-layer choices, yet the profile "
                                   "holds some")
            method.storing.use_profile(dataclasses.replace(prof, method=name, options=codec_options))
        return method

    def prepare(self, model_or_config: Any) -> None:
        self._profile.check_model(model_or_config, f"profile {self.profile}")
        self._inner._shard = getattr(self, "_shard", None)
        self._inner.prepare(model_or_config)

    def layer(self, layer_idx: int, sliding_window: int | None):
        return self._inner.layer(layer_idx, sliding_window)

    def label(self) -> str:
        return self._inner.label()
