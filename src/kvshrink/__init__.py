"""kvshrink: training-free KV-cache compression for Hugging Face transformers, measured in real bytes."""
from .cache import CompressedCache
from .layers import FullLayer, FullSlidingLayer, WindowedLayer
from .methods import METHODS, Method, build_method, make_cache, method_options, parse_spec, register
from .models import ModelNotAvailable, load_model
from .eval.runner import evaluate
from .persist import CacheFileError, load_cache

__version__ = "0.1.0"

__all__ = [
    "CompressedCache", "FullLayer", "FullSlidingLayer", "WindowedLayer", "METHODS", "Method", "build_method",
    "make_cache", "method_options", "parse_spec", "register", "ModelNotAvailable", "load_model", "evaluate", "load_cache", "CacheFileError",
    "__version__",
]
