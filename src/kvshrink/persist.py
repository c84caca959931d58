"""Saving a compressed cache to disk and loading it back: compress a long document or a conversation once, resume
it in another process.

The file is safetensors: every tensor the cache's layers hold, plus a JSON header (in the safetensors metadata)
with the format and version, the model's fingerprint, the method and its options, and each layer's scalar state.
Loading rebuilds the cache with `make_cache(model, method, **options)` (so every policy, spec and hook is made by
the same code as before) and then puts the saved state back. Written atomically; read without pickle; a file for
another model, of another format or version, edited (tensor digest) or truncated is refused with the reason.
Under tensor parallelism each rank saves its own heads (one file per rank); the header records which, and a file is
loaded only by a rank that holds the same heads.

What is state is found by walking each layer: tensors, numbers, strings, dtypes and the store objects that hold
them (kvshrink's own classes, not modules, specs or policies, which the rebuild makes).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .io import ordinary_mode, temp_beside

FORMAT = "kvshrink-cache"
VERSION = 1
_SCALARS = (bool, int, float, str, type(None))


class CacheFileError(ValueError):
    """A saved cache that cannot be loaded: unreadable, edited, truncated, or for another model."""


def _is_store(value: Any) -> bool:
    """An object whose attributes are state: one of kvshrink's own classes that is not a module, spec or policy."""
    cls = type(value)
    return (cls.__module__.startswith("kvshrink.") and hasattr(value, "__dict__")
            and not isinstance(value, torch.nn.Module) and not dataclasses.is_dataclass(value)
            and not callable(value) and not cls.__module__.startswith("kvshrink.policies"))


def _walk(obj: Any, prefix: str, tensors: dict[str, torch.Tensor], scalars: dict[str, Any],
          visited: set[int]) -> None:
    if id(obj) in visited:  # an object shared by several layers (kvdirect's prefix runner) is saved once
        return
    visited.add(id(obj))
    for name, value in vars(obj).items():
        path = f"{prefix}.{name}"
        if isinstance(value, torch.Tensor):
            tensors[path] = value
        elif isinstance(value, torch.dtype):
            scalars[path] = {"dtype": str(value).removeprefix("torch.")}
        elif isinstance(value, torch.device):
            scalars[path] = {"device": str(value)}
        elif isinstance(value, _SCALARS):
            scalars[path] = {"value": value}
        elif isinstance(value, list) and any(v is not None for v in value) and all(
                v is None or isinstance(v, torch.Tensor) or _is_store(v) for v in value):
            for i, item in enumerate(value):  # a None (a low-rank level that stores nothing) is rebuilt as None
                if isinstance(item, torch.Tensor):
                    tensors[f"{path}.{i}"] = item
                elif item is not None:
                    _walk(item, f"{path}.{i}", tensors, scalars, visited)
        elif _is_store(value):
            _walk(value, path, tensors, scalars, visited)


def state_of(cache) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, scalars) of every layer, by dotted path ('layers.3.key_store.codes')."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    visited: set[int] = set()
    for i, layer in enumerate(cache.layers):
        _walk(layer, f"layers.{i}", tensors, scalars, visited)
    return tensors, scalars


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_cache(cache, path: str | Path) -> Path:
    """Write `cache` (a kvshrink `CompressedCache` made by `make_cache`) to `path` atomically."""
    from safetensors.torch import save_file

    method, options = getattr(cache, "method", None), getattr(cache, "options", None)
    if method is None or options is None or getattr(cache, "fingerprint", None) is None:
        raise TypeError(f"only kvshrink caches made by make_cache can be saved, not {type(cache).__name__}")
    tensors, scalars = state_of(cache)
    # own, contiguous CPU copies: safetensors refuses shared storage, and a slice would write its whole base
    out = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    header = {"format": FORMAT, "version": VERSION, "model": cache.fingerprint, "method": method,
              "options": options, "layers": len(cache.layers), "scalars": scalars, "sha256": _digest(out),
              "tensor_parallel": _layout(cache)}
    try:
        meta = {"kvshrink": json.dumps(header, sort_keys=True)}
    except TypeError as e:
        raise TypeError(f"the cache's options cannot be written as JSON: {e}") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        save_file(out, tmp, metadata=meta)  # it writes a new file of its own (mode 0600): give it the usual mode
        os.chmod(tmp, ordinary_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _layout(cache) -> dict[str, Any] | None:
    """Which tensor-parallel rank and KV heads a cache holds (None: all heads, one process)."""
    shard = getattr(cache, "shard", None)
    return None if shard is None else shard.describe()


def _describe_layout(layout: dict[str, Any] | None) -> str:
    if layout is None:
        return "one process (all KV heads)"
    start, stop = layout["kv_heads"]
    return f"tensor-parallel rank {layout['rank']} of {layout['size']} (KV heads {start}-{stop - 1} of {layout['of']})"


def _set(root: Any, path: str, value: Any, where: str) -> None:
    parts = path.split(".")
    obj = root
    for part in parts[:-1]:
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part, None)
        if obj is None:
            raise CacheFileError(f"{where}: {path} has no place in the rebuilt cache (saved by another kvshrink?)")
    last = parts[-1]
    if isinstance(obj, list):
        obj[int(last)] = value
    else:
        setattr(obj, last, value)


def load_cache(path: str | Path, model: Any, device: str | torch.device | None = None):
    """The cache saved at `path`, rebuilt for `model` (which must be the model it was saved for)."""
    from safetensors import safe_open

    from .methods import make_cache
    from .profile import fingerprint

    path = Path(path)
    where = f"saved cache {path}"
    if not path.is_file():
        raise CacheFileError(f"{where}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or malformed files
        raise CacheFileError(f"{where}: not a readable safetensors file (truncated or corrupted?): {e}") from None
    try:
        header = json.loads(meta["kvshrink"])
    except (KeyError, json.JSONDecodeError):
        raise CacheFileError(f"{where}: not a kvshrink cache (no kvshrink header)") from None
    if header.get("format") != FORMAT:
        raise CacheFileError(f"{where}: format {header.get('format')!r} is not {FORMAT!r}")
    if header.get("version") != VERSION:
        raise CacheFileError(f"{where}: version {header.get('version')!r} is not supported (this kvshrink reads "
                             f"{VERSION})")
    mine = fingerprint(model)
    diff = [f"{k}: file {header['model'].get(k)!r} vs model {v!r}" for k, v in mine.items()
            if header["model"].get(k) != v]
    if diff:
        raise CacheFileError(f"{where} was saved for another model ({'; '.join(diff)})")
    if _digest(tensors) != header.get("sha256"):
        raise CacheFileError(f"{where}: its tensors do not match their sha256 (edited or corrupted)")
    cache = make_cache(model, header["method"], **header["options"])
    saved, here = header.get("tensor_parallel"), _layout(cache)
    if saved != here:
        raise CacheFileError(f"{where} was saved by {_describe_layout(saved)}; this process is "
                             f"{_describe_layout(here)}: load each rank's file on the rank that holds its heads")
    if len(cache.layers) != header["layers"]:
        raise CacheFileError(f"{where}: {header['layers']} layers saved, the rebuilt cache has {len(cache.layers)}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    # stores first (parents before children): paths sorted by depth
    for name, spec in sorted(header["scalars"].items(), key=lambda kv: kv[0].count(".")):
        if "dtype" in spec:
            value = getattr(torch, spec["dtype"], None)
            if not isinstance(value, torch.dtype):
                raise CacheFileError(f"{where}: {name} names an unknown dtype {spec['dtype']!r}")
        elif "device" in spec:
            value = dev
        else:
            value = spec["value"]
        _set(cache, name, value, where)
    for name in sorted(tensors, key=lambda n: n.count(".")):
        _set(cache, name, tensors[name].to(dev), where)
    return cache
