"""Named methods. Each module registers one recipe; importing this package makes them all available."""
from . import dynakv, full, h2o, kivi, kvcrush, kvdirect, kvpress, kvzip, layered, lowrank, mixed, pairing, razor, snapkv, streamingllm, tada, tale, tova, turboquant, window  # noqa: F401
from .base import METHODS, Method, StoringMethod, get_method, method_options, register
from .build import build_method, canonical_spec, make_cache, parse_spec, with_options
from .composed import Composition

__all__ = ["METHODS", "Method", "StoringMethod", "Composition", "build_method", "canonical_spec", "get_method",
           "make_cache", "method_options", "parse_spec", "register", "with_options"]
