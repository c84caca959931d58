"""`POLICY + CODEC`: a token policy's method (which tokens stay: snapkv, h2o, tova, ...) composed with a storing
method (kivi, tada, turboquant: per-layer codecs) or a bare codec (`grouped:bits=4`, `rotated:bits=3`), e.g.
`snapkv:budget=0.25 + tada:profile=P`: SnapKV keeps a quarter of the tokens and the profile's codecs store them.

Sinks and window: a value given on either side is used, the same value given on both is fine, two different ones
are an error; otherwise the storing side's defaults. The exact window and sinks take the storing side's dtype. A
layer the storing side keeps uncompressed (turboquant's edge layers) stays uncompressed and keeps every token;
sliding-window layers (Gemma 3's local layers) take the storing side's own layer, without the policy.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .. import spec as specs
from ..codecs.base import CODECS
from ..layers.full import FullLayer
from ..models import text_config
from .base import Method, PolicyMethod, StoringMethod


@dataclass
class Composition(Method):
    """A policy method and a storing method, composed (built from a `POLICY + CODEC` spec)."""

    name = "composition"
    summary = "a token policy's tokens stored by a codec (POLICY + CODEC)"

    policy: Any = None
    storing: Any = None
    window: int = 32
    sinks: int = 4

    @classmethod
    def of(cls, policy: Method, policy_options: dict[str, Any], storing: Method,
           storing_options: dict[str, Any]) -> "Composition":
        """Compose `policy` with `storing` (each built from the options as given, which say what was explicit)."""
        if not isinstance(policy, PolicyMethod):
            raise ValueError(f"the POLICY side of 'POLICY + CODEC' must be a token-policy method (streamingllm, "
                             f"window, h2o, snapkv, tova, mixed, razor), got {policy.name!r}")
        if not isinstance(storing, StoringMethod):
            raise ValueError(f"the CODEC side of 'POLICY + CODEC' must store tokens (kivi, tada, turboquant, or a "
                             f"codec: {', '.join(sorted(CODECS))}), got {storing.name!r}")
        if hasattr(storing, "kernel"):  # a scored layer attends by itself: no kernel is chosen for it
            storing = dataclasses.replace(storing, kernel="torch")
        chosen = {}
        for arg in ("window", "sinks"):
            mine, theirs = policy_options.get(arg), storing_options.get(arg)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(f"{arg} is {mine} on the policy side and {theirs} on the codec side: give it once")
            chosen[arg] = mine if mine is not None else theirs if theirs is not None else getattr(storing, arg)
        return cls(policy=policy, storing=storing, **chosen)

    def validate(self) -> None:
        if self.window < 0 or self.sinks < 0:
            raise ValueError(f"window and sinks must be >= 0, got {self.window} and {self.sinks}")

    def label(self) -> str:
        return f"{self.policy.label()} + {self.storing.label()}"

    def options(self) -> dict[str, Any]:
        return {"policy": self.policy.options(), "codec": self.storing.spec(), "window": self.window,
                "sinks": self.sinks}

    def spec(self) -> str:
        """Both sides' specs, each naming the window and sinks the composition uses (so the spec builds it again)."""
        def side(text: str) -> str:
            (part,) = specs.parse(text)
            shared = {"window": self.window, "sinks": self.sinks}
            opts = [(k, specs.format_value(shared[k]) if k in shared else v) for k, v in part.options]
            return specs.format_spec([(part.name, opts)])

        return f"{side(self.policy.spec())} + {side(self.storing.spec())}"

    def prepare(self, model_or_config: Any) -> None:
        for side in (self.policy, self.storing):
            side._shard = getattr(self, "_shard", None)
            side.prepare(model_or_config)
        self._layers = text_config(model_or_config).num_hidden_layers

    def layer(self, layer_idx: int, sliding_window: int | None):
        if sliding_window is not None:
            return self.storing.layer(layer_idx, sliding_window)
        codecs = self.storing.layer_codecs(layer_idx)
        if codecs is None:
            return FullLayer(layer_idx)
        return self.policy.scored_layer(layer_idx, *codecs, self.storing.exact_torch_dtype(), self.window,
                                        self.sinks)

