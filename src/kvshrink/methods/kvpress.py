"""`kvpress`: any of NVIDIA kvpress's ScorerPress scorers chooses the prompt's tokens (`policies/kvpress.py`);
kvshrink stores them, at low bits when composed with a codec: `kvpress:press=ExpectedAttentionPress,budget=0.25 +
kivi:bits=2`. Press options go in `args`, joined by '/': `kvpress:press=SnapKVPress,args=window_size=32/kernel_size=7`.
Needs the optional extra `kvshrink[kvpress]` (docs/kvpress.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import spec as specs
from ..policies import kvpress as adapter
from ..policies.scoring import Policy
from .base import option, register
from .eviction import EvictionMethod


@register
@dataclass
class KVPress(EvictionMethod):
    name = "kvpress"
    summary = "a kvpress ScorerPress (press=CLASS) scores the prompt; the best `budget` stay; prompt only (kvpress)"
    policy_name = "kvpress"

    press: str = option("", "the kvpress ScorerPress class, e.g. SnapKVPress, ExpectedAttentionPress, KnormPress")
    args: str = option("", "the press's own options, key=value joined by '/' (window_size=32/kernel_size=7)")
    sinks: int = option(0, "first tokens never evicted (0: the press alone decides, as in kvpress)")
    window: int = option(0, "most recent tokens never evicted (0: the press alone decides, as in kvpress)")

    def validate(self) -> None:
        if not self.press:
            raise ValueError(f"kvpress: name the press, e.g. 'kvpress:press=SnapKVPress'; the ScorerPress classes: "
                             f"{', '.join(sorted(adapter.scorer_presses()))}")
        super().validate()  # builds the press (make_policy): a bad press name or option fails here, not at prefill

    def make_policy(self) -> Policy:
        """One press for every layer (as kvpress runs one), built on first use."""
        if getattr(self, "_press", None) is None:
            self._press = adapter.build_press(self.press, self.args, self.budget)
        return adapter.PressPolicy(self._press)

    def prepare(self, model_or_config: Any) -> None:
        super().prepare(model_or_config)
        if not hasattr(model_or_config, "named_modules"):
            raise TypeError("kvpress: the press reads the model's attention modules: make_cache(model, ...), "
                            "not a config")
        adapter.capture(model_or_config, self._press)

    def spec(self) -> str:
        """Every option but an empty `args`, and `sinks`/`window` only where not 0: in `POLICY + CODEC` an option
        written on the policy side counts as given, and 0 against the codec's own window would conflict."""
        return specs.format_part(self.name, [(k, v) for k, v in self.options().items()
                                             if not (k in ("args", "sinks", "window") and not v)])

    def label(self) -> str:
        return f"kvpress:{self.press}"
