"""Named methods. Each module registers one recipe; importing this package makes them all available."""
from . import dynakv, full, h2o, kivi, kvdirect, lowrank, mixed, snapkv, streamingllm, tada, tale, tova, turboquant, window  # noqa: F401
from .base import METHODS, Method, build_method, get_method, make_cache, method_options, parse_spec, register

__all__ = ["METHODS", "Method", "build_method", "get_method", "make_cache", "method_options", "parse_spec", "register"]
