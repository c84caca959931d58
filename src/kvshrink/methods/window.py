"""`window`: keep only the most recent tokens (window-only attention, no sinks): the plainest eviction baseline,
one of the five KV-Direct compares against. The same layer as `streamingllm` with `sinks=0` by default."""
from __future__ import annotations

from dataclasses import dataclass

from .base import option, register
from .eviction import EvictionMethod


@register
@dataclass
class Window(EvictionMethod):
    name = "window"
    summary = "keep only the most recent tokens up to the budget (window-only; streamingllm without sinks)"
    policy_name = "streamingllm"

    sinks: int = option(0, "first tokens never evicted (0: a pure sliding window)")
    window: int = option(0, "most recent tokens never evicted (the budget itself decides here)")
