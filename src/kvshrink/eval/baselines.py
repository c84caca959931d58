"""Peers measured side by side: transformers' own `QuantizedCache` backends, named like methods.

`hf-quanto:bits=4` and `hf-hqq:bits=4` (options `bits`, `group`, `residual`) build
`transformers.QuantizedCache(backend=...)`; their memory is counted from the tensors the cache really holds (the
quantized tensors' inner data, scales and shifts, plus the residual window), the same way as ours.
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch

from ..models import head_dim_of

BASELINES = {
    "hf-quanto": ("quanto", "optimum.quanto", "optimum-quanto", (2, 4)),
    "hf-hqq": ("HQQ", "hqq", "hqq", (1, 2, 3, 4, 8)),
}
_OPTIONS = {"bits": 4, "group": 64, "residual": 128}


def is_baseline(spec: str) -> bool:
    return spec.strip().partition(":")[0].strip() in BASELINES


def parse_baseline(spec: str) -> tuple[str, dict[str, int]]:
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; available: {', '.join(BASELINES)}")
    options = dict(_OPTIONS)
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or key.strip() not in _OPTIONS:
            raise ValueError(f"baseline {spec!r}: option {item!r} must be one of {', '.join(f'{k}=<int>' for k in _OPTIONS)}")
        try:
            options[key.strip()] = int(raw)
        except ValueError:
            raise ValueError(f"baseline {spec!r}: {key.strip()}={raw!r} is not an integer") from None
    _, module, package, allowed = BASELINES[name]
    if options["bits"] not in allowed:
        raise ValueError(f"baseline {name}: bits must be one of {allowed}, got {options['bits']}")
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        raise ValueError(f"baseline {name} needs the package {package!r}: pip install {package}")
    return name, options


def make_baseline_cache(model, spec: str):
    from transformers import QuantizedCache

    name, o = parse_baseline(spec)
    return QuantizedCache(backend=BASELINES[name][0], config=model.config, nbits=o["bits"], q_group_size=o["group"],
                          residual_length=o["residual"])


def _leaves(x: Any) -> list[torch.Tensor]:
    """The plain tensors behind a (possibly subclassed, quantized) tensor."""
    if x is None:
        return []
    if isinstance(x, torch.Tensor) and type(x) is torch.Tensor or isinstance(x, torch.nn.Parameter):
        return [x]
    if hasattr(x, "__tensor_flatten__"):
        names, _ = x.__tensor_flatten__()
        return [t for n in names for t in _leaves(getattr(x, n))]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _leaves(item)]
    if isinstance(x, dict):  # HQQ keeps (tensor, meta dict)
        return [t for item in x.values() for t in _leaves(item)]
    if isinstance(x, torch.Tensor):
        return [x]
    return []


def baseline_memory(cache, config) -> dict[str, Any]:
    """nbytes / fp16_nbytes / ratio / tokens of a transformers `QuantizedCache`, from the tensors it holds."""
    text = config.get_text_config(decoder=True)
    head_dim = head_dim_of(text)
    nbytes, fp16 = 0, 0
    tokens = cache.get_seq_length()
    for layer in cache.layers:
        held = _leaves(getattr(layer, "_quantized_keys", None)) + _leaves(getattr(layer, "_quantized_values", None))
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                held.append(t)
        seen = {}
        for t in held:
            seen[(t.data_ptr(), t.numel(), t.element_size())] = t.numel() * t.element_size()
        nbytes += sum(seen.values())
        if isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.dim() == 4:
            batch, heads = layer.keys.shape[:2]
        else:
            batch, heads = 1, text.num_key_value_heads
        fp16 += 2 * 2 * batch * heads * layer.cumulative_length * head_dim
    return {"nbytes": nbytes, "fp16_nbytes": fp16, "ratio": nbytes / fp16 if fp16 else None, "tokens": tokens,
            "by_part": {}}
