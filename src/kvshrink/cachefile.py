"""The saved-cache file: safetensors holding every tensor a cache's layers declare as their state, and a JSON header
(in the safetensors metadata) with the format and version, the model's fingerprint, the canonical spec that rebuilds
the cache, each layer's counts (tokens seen, page fills, dtype) and a digest of the tensors.

Tensor names come from what layers and codecs declare (`layers.3.key_store.page.0.codes`), never from walking an
object's attributes, so renaming an attribute does not change the format. Written atomically; read without pickle;
`persist.load_cache` refuses a file for another model, of another format or version, edited (digest) or truncated.
Version 1 files (written by walking attributes) are refused with their version named.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .io import ordinary_mode, temp_beside

FORMAT = "kvshrink-cache"
VERSION = 2


class CacheFileError(ValueError):
    """A saved cache that cannot be loaded: unreadable, edited, truncated, of another version, or for another model."""


def state_of(cache) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, Any]]:
    """(tensors by name, each layer's counts, shared objects' counts) of a cache: what its layers declare. An
    object several layers share (KV-Direct's prefix runner) is saved once, under `shared.<name>`."""
    tensors: dict[str, torch.Tensor] = {}
    counts: list[dict[str, Any]] = []
    shared: dict[str, Any] = {}
    for i, layer in enumerate(cache.layers):
        own, c = layer.state_dict()
        tensors.update({f"layers.{i}.{k}": t for k, t in own.items()})
        counts.append(c)
        for name, obj in getattr(layer, "shared_state", lambda: {})().items():
            if name not in shared:
                own, c = obj.state_dict()
                tensors.update({f"shared.{name}.{k}": t for k, t in own.items()})
                shared[name] = c
    return tensors, counts, shared


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def layout_of(cache) -> dict[str, Any] | None:
    """Which tensor-parallel rank and KV heads a cache holds (None: all heads, one process)."""
    shard = getattr(cache, "shard", None)
    return None if shard is None else shard.describe()


def save_cache(cache, path: str | Path) -> Path:
    """Write `cache` (a kvshrink `CompressedCache` made by `make_cache`) to `path` atomically."""
    from safetensors.torch import save_file  # safetensors' torch helpers import torch-side machinery on first use

    spec = getattr(cache, "spec", None)
    if spec is None or getattr(cache, "fingerprint", None) is None:
        raise TypeError(f"only kvshrink caches made by make_cache can be saved, not {type(cache).__name__}")
    tensors, counts, shared = state_of(cache)
    # own, contiguous CPU copies: safetensors refuses shared storage, and a slice would write its whole base
    out = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    header = {"format": FORMAT, "version": VERSION, "model": cache.fingerprint, "spec": spec,
              "layers": counts, "shared": shared, "sha256": digest(out), "tensor_parallel": layout_of(cache)}
    try:
        meta = {"kvshrink": json.dumps(header, sort_keys=True)}
    except TypeError as e:
        raise TypeError(f"the cache's state cannot be written as JSON: {e}") from None
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


def read_cache_file(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of a saved cache, checked for format, version and digest; `CacheFileError` says why not."""
    from safetensors import safe_open

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
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CacheFileError(f"{where}: format {header.get('format') if isinstance(header, dict) else None!r} is "
                             f"not {FORMAT!r}")
    if header.get("version") != VERSION:
        older = " (written by kvshrink before the paged storage; re-create the cache)" \
            if header.get("version") == 1 else ""
        raise CacheFileError(f"{where}: version {header.get('version')!r} is not supported (this kvshrink reads "
                             f"{VERSION}){older}")
    if digest(tensors) != header.get("sha256"):
        raise CacheFileError(f"{where}: its tensors do not match their sha256 (edited or corrupted)")
    for key, kind in (("spec", str), ("layers", list), ("shared", dict), ("model", dict)):
        if not isinstance(header.get(key), kind):
            raise CacheFileError(f"{where}: header field {key!r} is missing or not a {kind.__name__}")
    return header, tensors
