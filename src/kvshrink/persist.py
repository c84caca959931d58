"""Loading a saved cache (`cachefile` writes and reads the file): compress a long document or a conversation once,
resume it in another process. The cache is rebuilt from the saved spec with `make_cache(model, spec)` (so every
policy, codec and hook is made by the same code as before) and then each layer takes back its declared state.
Under tensor parallelism each rank saves its own heads (one file per rank); the header records which, and a file is
loaded only by a rank that holds the same heads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .cachefile import CacheFileError, layout_of, read_cache_file
from .layers.rows import RowSplit
from .methods import make_cache
from .profile import fingerprint


def _describe_layout(layout: dict[str, Any] | None) -> str:
    if layout is None:
        return "one process (all KV heads)"
    start, stop = layout["kv_heads"]
    return f"tensor-parallel rank {layout['rank']} of {layout['size']} (KV heads {start}-{stop - 1} of {layout['of']})"


def _under(tensors: dict[str, torch.Tensor], prefix: str, device) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: t.to(device) for k, t in tensors.items() if k.startswith(prefix)}


def load_cache(path: str | Path, model: Any, device: str | torch.device | None = None):
    """The cache saved at `path`, rebuilt for `model` (which must be the model it was saved for)."""
    where = f"saved cache {path}"
    header, tensors = read_cache_file(path)
    mine = fingerprint(model)
    diff = [f"{k}: file {header['model'].get(k)!r} vs model {v!r}" for k, v in mine.items()
            if header["model"].get(k) != v]
    if diff:
        raise CacheFileError(f"{where} was saved for another model ({'; '.join(diff)})")
    cache = make_cache(model, header["spec"])
    saved, here = header.get("tensor_parallel"), layout_of(cache)
    if saved != here:
        raise CacheFileError(f"{where} was saved by {_describe_layout(saved)}; this process is "
                             f"{_describe_layout(here)}: load each rank's file on the rank that holds its heads")
    if len(cache.layers) != len(header["layers"]):
        raise CacheFileError(f"{where}: {len(header['layers'])} layers saved, the rebuilt cache has "
                             f"{len(cache.layers)}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    try:
        done = set()
        for i, (layer, counts) in enumerate(zip(cache.layers, header["layers"])):
            if "pads" in counts:  # saved as one layer per row of a left-padded batch
                layer = cache.layers[i] = RowSplit(layer, counts["pads"])
            layer.load_state_dict(_under(tensors, f"layers.{i}.", dev), counts)
            for name, obj in getattr(layer, "shared_state", lambda: {})().items():
                if name not in done:
                    obj.load_state_dict(_under(tensors, f"shared.{name}.", dev), header["shared"][name])
                    done.add(name)
    except (KeyError, ValueError, TypeError) as e:
        raise CacheFileError(f"{where}: its state does not fit the rebuilt cache ({type(e).__name__}: {e})") from None
    return cache
