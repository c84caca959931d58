"""`FullLayer` / `FullSlidingLayer`: transformers' own dynamic layers, unchanged, with byte accounting (the `full`
method, and the reference every other method is measured against)."""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .base import _Reporting


class FullLayer(DynamicLayer, _Reporting):
    """Uncompressed layer: exactly transformers' `DynamicLayer`."""

    def __init__(self, layer_idx: int = -1):
        super().__init__()
        self.layer_idx = layer_idx

    def parts(self) -> dict[str, list[torch.Tensor]]:
        if not self.is_initialized or self.keys.numel() == 0:
            return {"window": []}
        return {"window": [self.keys, self.values]}

    def shape(self):
        if not self.is_initialized or self.keys.dim() != 4:
            return None
        return self.keys.shape[0], self.keys.shape[1], self.keys.shape[3]

    def describe(self):
        return {"bits": "full"}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The held keys and values, and the tokens a sliding layer has seen."""
        if not self.is_initialized:
            return {}, {"initialized": False}
        return {"keys": self.keys, "values": self.values}, {
            "initialized": True, "cumulative_length": getattr(self, "cumulative_length", None)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], counts: dict[str, Any]) -> None:
        if not counts.get("initialized"):
            return
        self.lazy_initialization(tensors["keys"], tensors["values"])
        self.keys, self.values = tensors["keys"], tensors["values"]
        if counts.get("cumulative_length") is not None:
            self.cumulative_length = counts["cumulative_length"]


class FullSlidingLayer(DynamicSlidingWindowLayer, _Reporting):
    """Uncompressed sliding-window layer: exactly transformers' `DynamicSlidingWindowLayer`."""

    def __init__(self, sliding_window: int, layer_idx: int = -1):
        super().__init__(sliding_window=sliding_window)
        self.layer_idx = layer_idx

    parts = FullLayer.parts
    shape = FullLayer.shape
    describe = FullLayer.describe
    state_dict = FullLayer.state_dict
    load_state_dict = FullLayer.load_state_dict
