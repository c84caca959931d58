"""The local model directory `kvshrink serve` hands to transformers' server.

It is the model kvshrink loads (an embedded model's converted safetensors, a GGUF file converted the same way, or a
local directory), linked file by file, plus a `custom_generate/generate.py` that builds a fresh kvshrink cache for
each call. transformers binds that function as the model's `generate` when it loads the directory with
`trust_remote_code`, so both `kvshrink serve` and a plain `transformers serve DIR --trust-remote-code` use it.
Directories live under `$KVSHRINK_CACHE/serve/`, one per model and method, and are rebuilt atomically when their
generate.py would change.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_write_text, current_umask
from ..models import ModelNotAvailable, cache_dir, resolve_model

GENERATE_FILE = Path("custom_generate") / "generate.py"
REQUIREMENTS_FILE = Path("custom_generate") / "requirements.txt"

_TEMPLATE = '''"""kvshrink: a fresh compressed KV cache for every generate() call of this model.

Written by `kvshrink serve`; transformers loads it as the model's `generate` when the directory is loaded with
trust_remote_code. Method: {spec}
"""
from kvshrink.serving.generation import configure_logging, generate_with_cache

configure_logging()  # each request's cache report on stderr, whichever server loads this
SPEC = {spec!r}
PROFILE = {profile!r}


def generate(*args, model, **kwargs):
    return generate_with_cache(model, *args, spec=SPEC, profile=PROFILE, **kwargs)
'''


class ServeError(ValueError):
    """What `kvshrink serve` cannot serve, and why."""


@dataclass(frozen=True)
class ServedModel:
    """A prepared directory: where it is, the model it links to, and the cache it builds."""

    path: Path
    source: Path
    spec: str
    profile: str | None


def generate_source(spec: str, profile: str | None = None) -> str:
    """The text of `custom_generate/generate.py` for a method spec (and the profile it names, if any)."""
    return _TEMPLATE.format(spec=spec, profile=profile)


def source_dir(model: str) -> Path:
    """The local directory kvshrink loads `model` from, converting a GGUF file first; ServeError if there is none."""
    try:
        where = resolve_model(model)
    except ModelNotAvailable as e:
        raise ServeError(f"cannot serve {model!r}: {e}") from None
    except Exception as e:  # a GGUF file transformers cannot read or convert: say which and why, not a traceback
        raise ServeError(f"cannot serve {model!r}: converting it to safetensors failed "
                         f"({type(e).__name__}: {e}); serve a model transformers can load from GGUF, or a local "
                         f"directory with config.json and safetensors") from None
    if not isinstance(where, Path):
        raise ServeError(f"cannot serve {model!r}: it is neither an embedded model nor a local path, and "
                         f"`kvshrink serve` needs a local directory (download the model first, then pass its path)")
    return where.resolve()


def _key(source: Path, text: str) -> str:
    return hashlib.sha256(f"{source}|{text}".encode()).hexdigest()[:12]


def _is_current(target: Path, source: Path, text: str) -> bool:
    gen = target / GENERATE_FILE
    if not gen.is_file() or gen.read_text(encoding="utf-8") != text:
        return False
    return all((target / entry.name).exists() for entry in source.iterdir() if entry.name != "custom_generate")


def prepare_model_dir(model: str, spec: str, profile: str | None = None, root: Path | None = None) -> ServedModel:
    """The directory to serve `model` from with a cache built by `spec`: links to the model's files plus
    `custom_generate/generate.py` (and a requirements.txt naming kvshrink). Reused when it is already current."""
    source = source_dir(model)
    text = generate_source(spec, profile)
    root = Path(root) if root is not None else cache_dir() / "serve"
    target = root / f"{source.name}-{_key(source, text)}"
    if _is_current(target, source, text):
        return ServedModel(target, source, spec, profile)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # an ordinary directory, not mkdtemp's private 0700
        for entry in source.iterdir():
            if entry.name != "custom_generate":  # a directory's own custom generate is replaced by kvshrink's
                os.symlink(entry.resolve(), tmp / entry.name)
        atomic_write_text(tmp / GENERATE_FILE, text)
        atomic_write_text(tmp / REQUIREMENTS_FILE, "kvshrink\n")
        if target.exists():  # stale (its model files moved): replace it whole
            stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=root))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, target)
    except OSError:
        if not _is_current(target, source, text):  # a concurrent `kvshrink serve` did not write it either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ServedModel(target, source, spec, profile)
