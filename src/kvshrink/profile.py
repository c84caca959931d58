"""Profiles: per-layer choices in a versioned JSON file, and the method that builds them (`method`), so that
`make_cache(model, profile=PATH)` builds whatever a profile describes.

- `tada` profiles (versions 1-3): per layer, the bits, centering and rotation of keys and values (`LayerChoice`).
  Version 2 added `key_rotate` / `value_rotate`; version-1 files, which have neither, still load (nothing rotated).
- `layered` profiles (version 3): per layer, a codec spec for the keys and one for the values (or a list of one
  per KV head), and a token policy spec or none (`LayerRecipe`): tokens and bits chosen together, per layer and head.
- low-rank profiles: fitted bases as tensors, under method `lowrank` (bases alone, `kvshrink calibrate --method
  tale|dynakv`) or under `tale` / `dynakv` / `lowrank` with that method's options too (a recipe: bases cut to the
  largest rank its levels use and held in float16, `bases.lowrank_recipe`).

A profile names the model it was calibrated for by a fingerprint (architecture, layer count, head shapes and a hash
of the config); loading it for another model is an error. Files are written atomically and read with `json` only;
a truncated or malformed file is refused before anything is built from it.
"""
from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .codecs.base import BIT_WIDTHS
from .codecs.quant import CENTERS, QUANT_BITS
from .io import atomic_write_text
from .models import head_dim_of
from .spec import parse

FORMAT = "kvshrink-profile"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
ROTATABLE_BITS = BIT_WIDTHS["lloydmax"]  # a profile's rotated layers use the Lloyd-Max codes
_CONFIG_KEYS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "hidden_size", "intermediate_size", "vocab_size", "rope_theta", "sliding_window", "layer_types",
                "rms_norm_eps", "max_position_embeddings")


class ProfileError(ValueError):
    """A profile file that cannot be used: unreadable, malformed, or for another model."""


def fingerprint(model_or_config: Any) -> dict[str, Any]:
    """What identifies a model's attention geometry: architecture, layers, heads, head dim, and a config hash."""
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config(decoder=True)
    head_dim = head_dim_of(text)
    shown = {k: getattr(text, k, None) for k in _CONFIG_KEYS}
    shown["head_dim"] = head_dim
    digest = hashlib.sha256(json.dumps(shown, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"architecture": text.model_type, "layers": text.num_hidden_layers,
            "attention_heads": text.num_attention_heads, "kv_heads": text.num_key_value_heads,
            "head_dim": head_dim, "config_hash": digest}


@dataclass(frozen=True)
class LayerChoice:
    """Bits and centering of one layer's keys and values."""

    key_bits: int
    value_bits: int
    key_mean: str = "none"
    value_mean: str = "none"
    key_rotate: bool = False
    value_rotate: bool = False

    def validate(self, where: str) -> None:
        for t in ("key", "value"):
            rotate, bits, mean = (getattr(self, f"{t}_{x}") for x in ("rotate", "bits", "mean"))
            if not isinstance(rotate, bool):
                raise ProfileError(f"{where}: {t}_rotate must be true or false, got {rotate!r}")
            if rotate and (bits not in ROTATABLE_BITS or mean != "none"):
                raise ProfileError(f"{where}: {t}_rotate needs {t}_bits in {ROTATABLE_BITS} and {t}_mean 'none', "
                                   f"got {bits} and {mean!r}")
        for name in ("key_bits", "value_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v not in QUANT_BITS:
                raise ProfileError(f"{where}: {name} must be one of {QUANT_BITS}, got {v!r}")
        for name in ("key_mean", "value_mean"):
            v = getattr(self, name)
            if v not in CENTERS:
                raise ProfileError(f"{where}: {name} must be one of {CENTERS}, got {v!r}")


@dataclass(frozen=True)
class LayerRecipe:
    """One layer of a `layered` profile: codec specs of its keys and values (a spec, or one per KV head) and the
    spec of the token policy that chooses which tokens stay (None: every token)."""

    key: str | tuple[str, ...]
    value: str | tuple[str, ...]
    policy: str | None = None

    def validate(self, where: str) -> None:
        for what in ("key", "value"):
            entry = getattr(self, what)
            specs = (entry,) if isinstance(entry, str) else entry
            if not isinstance(specs, tuple) or not specs or not all(isinstance(x, str) for x in specs):
                raise ProfileError(f"{where}: {what} must be a codec spec or a list of one per KV head, got {entry!r}")
            for x in specs:
                try:
                    if len(parse(x)) != 1:
                        raise ValueError("a codec spec has one part")
                except ValueError as e:
                    raise ProfileError(f"{where}: {what} {x!r}: {e}") from None
        if self.policy is not None and not isinstance(self.policy, str):
            raise ProfileError(f"{where}: policy must be a spec string or null, got {self.policy!r}")

    def to_json(self) -> dict[str, Any]:
        as_json = lambda e: e if isinstance(e, str) else list(e)  # noqa: E731
        return {"key": as_json(self.key), "value": as_json(self.value), "policy": self.policy}


@dataclass
class Profile:
    model: dict[str, Any]
    method: str
    options: dict[str, Any]
    layers: list[LayerChoice]
    predicted_ratio: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # bases of low-rank methods (float32 when loaded)

    def to_json(self) -> dict[str, Any]:
        out = {"format": FORMAT, "version": VERSION, "model": self.model, "method": self.method,
               "options": self.options,
               "layers": [c.to_json() if isinstance(c, LayerRecipe) else vars(c) for c in self.layers],
               "predicted_ratio": self.predicted_ratio, "calibration": self.calibration}
        if self.tensors:
            out["tensors"] = {name: _encode_tensor(t) for name, t in self.tensors.items()}
        out["sha256"] = _body_digest(out)
        return out

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")

    def check_model(self, model_or_config: Any, where: str = "profile") -> None:
        """Refuse a profile calibrated for another model, naming what differs."""
        mine = fingerprint(model_or_config)
        diff = [f"{k}: profile {self.model.get(k)!r} vs model {v!r}" for k, v in mine.items() if self.model.get(k) != v]
        if diff:
            raise ProfileError(f"{where} was calibrated for another model ({'; '.join(diff)})")

    def mean_bits(self) -> float:
        return sum(c.key_bits + c.value_bits for c in self.layers) / (2 * len(self.layers))


def _body_digest(raw: dict[str, Any]) -> str:
    """A digest of every field but the digest itself (canonical JSON): a profile edited by a flipped byte, in any
    field, no longer matches it."""
    body = {k: v for k, v in raw.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_TENSOR_DTYPES = {"float32": ("<f4", torch.float32), "float16": ("<f2", torch.float16)}


def _encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    """A tensor as base64 little-endian bytes: float16 if it is held in float16 (a recipe's bases), else float32."""
    name = "float16" if t.dtype == torch.float16 else "float32"
    code, dtype = _TENSOR_DTYPES[name]
    data = t.detach().to("cpu", dtype).contiguous().numpy().astype(code).tobytes()
    return {"dtype": name, "shape": list(t.shape), "sha256": hashlib.sha256(data).hexdigest(),
            "data": base64.b64encode(data).decode("ascii")}


def _decode_tensor(entry: Any, where: str) -> torch.Tensor:
    """The float32 tensor of an entry written by `_encode_tensor` (float16 entries are widened exactly)."""
    if not isinstance(entry, dict) or entry.get("dtype") not in _TENSOR_DTYPES or not isinstance(entry.get("shape"), list) \
            or not isinstance(entry.get("data"), str) or not isinstance(entry.get("sha256"), str):
        raise ProfileError(f"{where}: expected a tensor entry with dtype ({', '.join(_TENSOR_DTYPES)}), shape, "
                           "sha256 and data")
    code, _ = _TENSOR_DTYPES[entry["dtype"]]
    try:
        data = base64.b64decode(entry["data"], validate=True)
    except ValueError:
        raise ProfileError(f"{where}: data is not valid base64") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ProfileError(f"{where}: data does not match its sha256 (corrupted?)")
    shape = entry["shape"]
    size = np.dtype(code).itemsize
    if not all(isinstance(n, int) and n >= 0 for n in shape) or size * int(np.prod(shape)) != len(data):
        raise ProfileError(f"{where}: shape {shape} does not match {len(data)} bytes of {entry['dtype']} data")
    return torch.from_numpy(np.frombuffer(data, dtype=code).astype("<f4")).reshape(shape)


SHIPPED = Path(__file__).parent / "profiles"


def shipped_profiles() -> list[str]:
    """Names of the calibrated profiles that come with kvshrink (`<model>-<method>-<ratio>`)."""
    return sorted(p.stem for p in SHIPPED.glob("*.json"))


def resolve_profile(name_or_path: str | Path) -> Path:
    """A profile file: an existing path, or the name of a shipped profile."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SHIPPED / f"{name_or_path}.json"
    if shipped.is_file():
        return shipped
    raise ProfileError(f"profile {name_or_path}: no such file, and not a shipped profile (shipped: "
                       f"{', '.join(shipped_profiles()) or 'none'})")


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file (or a shipped profile by name); any defect raises `ProfileError` naming the
    file and the field."""
    path = resolve_profile(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProfileError(f"profile {path}: not a readable JSON file (truncated or corrupted?): {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ProfileError(f"profile {path}: not a kvshrink profile (missing \"format\": \"{FORMAT}\")")
    if raw.get("version") not in READABLE_VERSIONS:
        raise ProfileError(f"profile {path}: version {raw.get('version')!r} is not supported (this kvshrink reads "
                           f"{', '.join(map(str, READABLE_VERSIONS))})")
    if raw["version"] >= 3 and raw.get("sha256") != _body_digest(raw):  # version 3 brought the digest
        raise ProfileError(f"profile {path}: its content does not match its sha256 (edited or corrupted)")
    for key, kind in (("model", dict), ("method", str), ("options", dict), ("layers", list)):
        if not isinstance(raw.get(key), kind):
            raise ProfileError(f"profile {path}: field {key!r} is missing or not a {kind.__name__}")
    layers = []
    for i, entry in enumerate(raw["layers"]):
        where = f"profile {path}: layer {i}"
        if raw["method"] == "layered":
            if raw["version"] < 3 or not isinstance(entry, dict) or set(entry) - {"key", "value", "policy"} \
                    or not {"key", "value"} <= set(entry):
                raise ProfileError(f"{where}: a version-3 layered entry has key, value and policy, got {entry!r}")
            tup = lambda e: tuple(e) if isinstance(e, list) else e  # noqa: E731
            recipe = LayerRecipe(tup(entry["key"]), tup(entry["value"]), entry.get("policy"))
            recipe.validate(where)
            layers.append(recipe)
            continue
        allowed = {"key_bits", "value_bits", "key_mean", "value_mean"} | (
            {"key_rotate", "value_rotate"} if raw["version"] >= 2 else set())
        if not isinstance(entry, dict) or set(entry) - allowed or not {"key_bits", "value_bits"} <= set(entry):
            raise ProfileError(f"{where}: expected {', '.join(sorted(allowed))}, got {entry!r}")
        choice = LayerChoice(**entry)
        choice.validate(where)
        layers.append(choice)
    if layers and len(layers) != raw["model"].get("layers") or (not layers and raw["method"] in ("tada", "layered")):
        raise ProfileError(f"profile {path}: {len(layers)} layer entries for a model of {raw['model'].get('layers')} layers")
    ratio = raw.get("predicted_ratio")
    if ratio is not None and not isinstance(ratio, (int, float)):
        raise ProfileError(f"profile {path}: predicted_ratio must be a number, got {ratio!r}")
    raw_tensors = raw.get("tensors") or {}
    if not isinstance(raw_tensors, dict):
        raise ProfileError(f"profile {path}: field 'tensors' must be an object")
    tensors = {name: _decode_tensor(entry, f"profile {path}: tensor {name!r}") for name, entry in raw_tensors.items()}
    return Profile(raw["model"], raw["method"], raw["options"], layers, ratio, raw.get("calibration") or {}, tensors)
