"""`turboquant`: rotation codecs (TurboQuant / PolarQuant "MSE" stage, QuaRot-style uniform codes), with presets
whose per-token byte layouts follow vLLM's TurboQuant attention backend.

Each KV head's keys (after RoPE) and values are rotated by a seeded randomized Walsh-Hadamard transform, then coded
per token: by default each vector's norm plus Lloyd-Max codes of its direction (see `codecs/rotation.py`). Decoding
steps attend without rotating stored tokens back: through a kernel that reads the codes and their norms directly
(`attention=auto`, the default: the C++ kernel (`cpu`) for a model on the CPU, the Triton kernel (`triton`) on
CUDA), or in PyTorch (`attention=rotated`);
`attention=decode` rotates them back and uses SDPA instead (the reference the tests compare against).

Presets (`preset=`), after vLLM's `--kv-cache-dtype` values: every token coded (no exact window or sinks), the
first and last two layers kept exact, fp32 norms (vLLM's per-token layout):
- `turboquant_k8v4`: fp8 (e4m3) keys, 4-bit Lloyd-Max values (vLLM: 2.6x smaller than fp16)
- `turboquant_4bit_nc`: 4-bit keys and values with norm correction (3.8x)
- `turboquant_k3v4_nc`: 3-bit keys, 4-bit values, norm correction (4.3x)
- `turboquant_3bit_nc`: 3-bit keys and values, norm correction (4.9x)
kvshrink's fp8 keys carry one fp32 scale per token and head (vLLM's use one scale per tensor): 4 more bytes per
token and head, kept because Qwen2-style key outliers overflow e4m3 without a scale.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .. import attention as kv_attention
from .. import kernels
from ..kernels import cpu
from ..codecs.rotation import QUANTIZERS, RotationCodec
from ..layers.composed import ComposedLayer
from ..layers.full import FullLayer, FullSlidingLayer
from ..models import head_dim_of, text_config
from .base import StoringMethod, option, register
from .kivi import _EXACT_DTYPES

PRESETS: dict[str, dict[str, Any]] = {
    "turboquant_k8v4": dict(key_bits=8, key_quantizer="fp8", rotate_keys=False, value_bits=4, norm_correction=False),
    "turboquant_4bit_nc": dict(key_bits=4, value_bits=4),
    "turboquant_k3v4_nc": dict(key_bits=3, value_bits=4),
    "turboquant_3bit_nc": dict(key_bits=3, value_bits=3),
}
_PRESET_COMMON = dict(window=0, sinks=0, edge_layers=2, norm="float32")
_ATTENTION = ("auto", "cpu", "triton", "rotated", "decode")


@register
@dataclass
class TurboQuant(StoringMethod):
    name = "turboquant"
    summary = "randomized Hadamard rotation + Lloyd-Max (or uniform / fp8) codes per token; vLLM-style presets"

    preset: str = option("", f"a vLLM-style preset: {', '.join(PRESETS)}; it sets window=0, sinks=0, "
                                 "edge_layers=2, norm=float32 and its bits (other values of those are an error)")
    bits: int = option(4, "code width for keys and values: 2, 3, 4 (8: uniform or fp8; 16: rotated fp16)")
    key_bits: int = option(0, "code width for keys alone (0 = use `bits`)")
    value_bits: int = option(0, "code width for values alone (0 = use `bits`)")
    quantizer: str = option("lloydmax", f"scalar quantizer of the rotated coordinates: {', '.join(QUANTIZERS)}")
    key_quantizer: str = option("", "quantizer for keys alone ('' = use `quantizer`)")
    value_quantizer: str = option("", "quantizer for values alone ('' = use `quantizer`)")
    group: int = option(32, "rotated channels per uniform group (quantizer=uniform)")
    rotate_keys: bool = option(True, "rotate keys before coding them")
    rotate_values: bool = option(True, "rotate values before coding them")
    norm: str = option("float16", "dtype of the kept norms / scales: float16 or float32")
    norm_correction: bool = option(True, "keep ||x|| / ||decoded direction|| so decoded vectors keep their norm")
    seed: int = option(0, "seed of the random signs of the rotations (nothing else is stored for them)")
    window: int = option(32, "recent tokens kept exact")
    sinks: int = option(4, "first tokens kept exact (attention sinks)")
    edge_layers: int = option(0, "this many first and last layers keep an uncompressed cache (vLLM keeps 2)")
    exact_dtype: str = option("model", "dtype of the exact window, sinks and edge layers: model, float16, bfloat16")
    attention: str = option("auto", "decode attention: 'auto' (the CPU kernel for a model on the CPU, the Triton "
                                    "kernel on CUDA, else 'rotated'), 'cpu' (the C++ kernel reading the codes), "
                                    "'triton' (the GPU kernel reading the codes), 'rotated' (PyTorch: query rotated "
                                    "once, stored tokens never rotated back) or 'decode' (rotate the store back, "
                                    "then SDPA)")

    def __post_init__(self) -> None:
        if self.preset:
            if self.preset not in PRESETS:
                raise ValueError(f"turboquant: preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
            defaults = {f: type(self).__dataclass_fields__[f].default for f in type(self).__dataclass_fields__}
            for key, value in {**_PRESET_COMMON, **PRESETS[self.preset]}.items():
                mine = getattr(self, key)
                if mine != defaults[key] and mine != value:
                    raise ValueError(f"turboquant: preset {self.preset} sets {key}={value!r}; {key}={mine!r} was "
                                     "asked for: leave it out, or spell the options out without preset=")
                setattr(self, key, value)
        super().__post_init__()

    def specs(self, layer_idx: int = 0) -> tuple[RotationCodec, RotationCodec]:
        common = dict(group=self.group, norm=self.norm, norm_correction=self.norm_correction, seed=self.seed,
                      layer=layer_idx)
        return (RotationCodec(self.key_bits or self.bits, self.key_quantizer or self.quantizer,
                              rotate=self.rotate_keys, **common),
                RotationCodec(self.value_bits or self.bits, self.value_quantizer or self.quantizer,
                              rotate=self.rotate_values, **common))

    def layer_codecs(self, layer_idx: int):
        n = getattr(self, "_layers", None)
        if self.edge_layers and n is not None and (layer_idx < self.edge_layers or layer_idx >= n - self.edge_layers):
            return None
        return self.specs(layer_idx)

    def exact_torch_dtype(self):
        return _EXACT_DTYPES[self.exact_dtype]

    def validate(self) -> None:
        try:
            self.specs()
        except ValueError as e:
            raise ValueError(f"turboquant: {e}") from None
        if self.exact_dtype not in _EXACT_DTYPES:
            raise ValueError(f"turboquant: exact_dtype must be one of {', '.join(_EXACT_DTYPES)}, "
                             f"got {self.exact_dtype!r}")
        if self.attention not in _ATTENTION:
            raise ValueError(f"turboquant: attention must be one of {', '.join(_ATTENTION)}, got {self.attention!r}")
        for arg in ("window", "sinks", "edge_layers"):
            if getattr(self, arg) < 0:
                raise ValueError(f"turboquant: {arg} must be >= 0, got {getattr(self, arg)}")

    def prepare(self, model_or_config):
        self._layers = text_config(model_or_config).num_hidden_layers
        self._backend = "torch" if self.attention == "decode" else self._resolve(model_or_config)
        if self._backend != "torch":
            if not hasattr(model_or_config, "set_attn_implementation"):
                raise TypeError(f"turboquant with attention={self.attention} needs the model (its attention is "
                                "switched to kvshrink's): make_cache(model, ...), or attention=decode for a config")
            kv_attention.enable(model_or_config)

    def _resolve(self, model_or_config) -> str:
        """'cpu' (the C++ kernel), 'triton' (the GPU kernel) or 'rotated' (PyTorch) for attention auto / cpu /
        triton / rotated: 'auto' takes the kernel for the model's device when it can be used and says why not when
        it cannot; 'cpu' and 'triton' insist."""
        if self.attention == "rotated":
            return "rotated"
        param = next(model_or_config.parameters(), None) if hasattr(model_or_config, "parameters") else None
        device = param.device if param is not None else torch.device("cpu")
        want = self.attention if self.attention != "auto" else "cpu" if device.type == "cpu" else "triton"
        if want == "cpu":
            why = cpu.unavailable() if device.type == "cpu" else f"the model is on {device}"
        else:
            why = kernels.unusable(device, list(zip(("keys", "values"), self.specs())),
                                   head_dim_of(text_config(model_or_config)), insisted=self.attention == "triton")
        if why is None:
            return want
        if self.attention != "auto":
            raise ValueError(f"turboquant: attention={self.attention!r} cannot be used: {why}")
        if device.type == "cpu":
            cpu.warn_unavailable(why, stacklevel=5)
        else:
            warnings.warn(f"turboquant: decoding with the PyTorch path (attention='auto'): {why}", stacklevel=5)
        return "rotated"

    def layer(self, layer_idx, sliding_window):
        codecs = self.layer_codecs(layer_idx)
        if codecs is None:
            return FullLayer(layer_idx) if sliding_window is None else FullSlidingLayer(sliding_window, layer_idx)
        return ComposedLayer(*codecs, window=self.window, sinks=self.sinks,
                             exact_dtype=_EXACT_DTYPES[self.exact_dtype],
                             backend=getattr(self, "_backend", "torch"), layer_idx=layer_idx,
                             sliding_window=sliding_window, shard=getattr(self, "_shard", None))


__all__ = ["TurboQuant", "PRESETS"]
