"""`streamingllm`: StreamingLLM (Xiao et al. 2024) - attention sinks plus the most recent tokens."""
from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .eviction import EvictionMethod


@register
@dataclass
class StreamingLLM(EvictionMethod):
    name = "streamingllm"
    summary = "keep the first `sinks` tokens and the most recent ones up to the budget (StreamingLLM)"
    policy_name = "streamingllm"
