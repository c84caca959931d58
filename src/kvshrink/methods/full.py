"""`full`: no compression; the same storage as transformers' DynamicCache, with byte accounting."""
from __future__ import annotations

from dataclasses import dataclass

from ..layers.full import FullLayer, FullSlidingLayer
from .base import Method, register


@register
@dataclass
class Full(Method):
    name = "full"
    summary = "no compression (the reference: identical to transformers' DynamicCache)"

    def layer(self, layer_idx, sliding_window):
        if sliding_window is None:
            return FullLayer(layer_idx)
        return FullSlidingLayer(sliding_window, layer_idx)
