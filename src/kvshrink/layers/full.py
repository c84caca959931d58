"""`FullLayer` / `FullSlidingLayer`: transformers' own dynamic layers, unchanged, with byte accounting (the `full`
method, and the reference every other method is measured against)."""
from __future__ import annotations

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


class FullSlidingLayer(DynamicSlidingWindowLayer, _Reporting):
    """Uncompressed sliding-window layer: exactly transformers' `DynamicSlidingWindowLayer`."""

    def __init__(self, sliding_window: int, layer_idx: int = -1):
        super().__init__(sliding_window=sliding_window)
        self.layer_idx = layer_idx

    parts = FullLayer.parts
    shape = FullLayer.shape
    describe = FullLayer.describe
