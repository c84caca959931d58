"""What a served model's `generate()` does: a fresh kvshrink cache for the call, then transformers' own `generate`.

`kvshrink serve` writes a `custom_generate/generate.py` that calls `generate_with_cache`; transformers loads it when
the model is loaded with `trust_remote_code` and binds it as the model's `generate`. It must not call
`model.generate` (that is itself), so it calls the class's `generate`. A `cache_implementation` in the generation
config (`static` under `--compile`, or a model's default) would clash with the cache handed in, so it is cleared.
When the call ends, the cache's memory report is logged and, for a request of the kvshrink server, left in the
ledger for the response.
"""
from __future__ import annotations

import copy
import inspect
import logging
import sys
import time
from typing import Any, Callable

from .ledger import LEDGER

log = logging.getLogger("kvshrink.serve")

def configure_logging(level: str | None = None) -> None:
    """Print kvshrink's per-request reports on stderr, under `kvshrink serve` or any server that loads a served
    directory (transformers' and uvicorn's loggers have their own handlers). `level` sets the level; without it an
    unset level becomes INFO."""
    logger = logging.getLogger("kvshrink")
    if not any(getattr(h, "_kvshrink", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     kvshrink: %(message)s"))
        handler._kvshrink = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    if level is not None:
        logger.setLevel(level.upper())
    elif logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


#: the attribute of the generation config that carries the server's request id into `generate`
REQUEST_ATTR = "kvshrink_request_id"


def _make_cache_takes_profile() -> bool:
    from .. import make_cache

    return "profile" in inspect.signature(make_cache).parameters


def build_cache(model: Any, spec: str, profile: str | None = None):
    """A fresh cache for one request: `make_cache(model, profile=...)` where the library takes a profile directly,
    the method spec (which then names the profile) otherwise."""
    from .. import make_cache

    if profile is not None and _make_cache_takes_profile():
        return make_cache(model, profile=profile)
    return make_cache(model, spec)


def report_summary(spec: str, report: dict[str, Any]) -> dict[str, Any]:
    """The part of a memory report a response carries (the `kvshrink` field)."""
    return {"method": spec, "ratio": report["ratio"], "nbytes": report["nbytes"],
            "fp16_nbytes": report["fp16_nbytes"], "tokens": report["tokens"]}


class ReportingStreamer:
    """Passes tokens to the server's streamer and runs `on_end` before the stream's end: the handler writes the last
    chunk when it sees the end, so the report must be in the ledger by then."""

    def __init__(self, inner: Any, on_end: Callable[[], None]):
        self.inner = inner
        self.on_end = on_end

    def put(self, value) -> None:
        self.inner.put(value)

    def end(self) -> None:
        try:
            self.on_end()
        finally:
            self.inner.end()


def _own_config(model: Any, kwargs: dict[str, Any]) -> str | None:
    """Make the call's generation config a copy without `cache_implementation` or the request id; the id."""
    config = kwargs.get("generation_config")
    request_id = getattr(config, REQUEST_ATTR, None) if config is not None else None
    if config is None and getattr(model.generation_config, "cache_implementation", None) is not None:
        config = model.generation_config  # passing no config would bring the model's cache_implementation back
    if config is not None:
        config = copy.deepcopy(config)
        config.__dict__.pop(REQUEST_ATTR, None)
        config.cache_implementation = None
        kwargs["generation_config"] = config
    kwargs.pop("cache_implementation", None)
    return request_id


def generate_with_cache(model: Any, *args: Any, spec: str, profile: str | None = None, **kwargs: Any):
    """`type(model).generate(model, *args, **kwargs)` with a new kvshrink cache built by `spec` (or `profile`) as
    `past_key_values`, unless the caller passed a cache of its own. Logs the memory report of the call."""
    start = time.perf_counter()
    request_id = _own_config(model, kwargs)
    cache = kwargs.get("past_key_values")
    if cache is None:
        cache = kwargs["past_key_values"] = build_cache(model, spec, profile)

    def record() -> None:
        if not hasattr(cache, "memory_report"):
            log.info("request %s: the caller's own cache (%s), no report", request_id, type(cache).__name__)
            return
        summary = report_summary(spec, cache.memory_report())
        log.info("request %s: %s, %d tokens in %d bytes (%.3f of fp16), generated in %.2f s", request_id or "-",
                 spec, summary["tokens"], summary["nbytes"], summary["ratio"], time.perf_counter() - start)
        if request_id is not None:
            LEDGER.put(request_id, summary)

    if kwargs.get("streamer") is not None:
        kwargs["streamer"] = ReportingStreamer(kwargs["streamer"], record)
        return type(model).generate(model, *args, **kwargs)
    out = type(model).generate(model, *args, **kwargs)
    record()
    return out
