"""The model's own rotary embedding, applied or undone at given positions (pre-RoPE low-rank keys)."""
from __future__ import annotations

import inspect
import sys
from typing import Any

import torch


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None and hasattr(inner, "language_model"):
        layers = getattr(inner.language_model, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (model.model.layers)")
    return layers


def rotary_of(model: Any) -> Any:
    inner = getattr(model, "model", model)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"cannot find the rotary embedding of {type(model).__name__} (model.model.rotary_emb)")
    return rotary


class Rope:
    """Rotate (or un-rotate) keys [B, H, T, d] of one layer as the model does, at absolute positions [T]."""

    def __init__(self, model: Any, layer_idx: int):
        attn = decoder_layers(model)[layer_idx].self_attn
        self.rotary = rotary_of(model)
        self.apply = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb")
        text = model.config.get_text_config(decoder=True)
        types = getattr(text, "layer_types", None)
        self.layer_type = types[layer_idx] if types else "full_attention"
        self.takes_type = "layer_type" in inspect.signature(self.rotary.forward).parameters

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        pos = positions.reshape(1, -1).to(x.device)
        args = (x, pos, self.layer_type) if self.takes_type else (x, pos)
        cos, sin = self.rotary(*args)
        return self.apply(x, x, cos.to(x.dtype), (-sin if inverse else sin).to(x.dtype))[1]
