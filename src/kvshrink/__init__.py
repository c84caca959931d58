"""kvshrink: training-free KV-cache compression for Hugging Face transformers, measured in real bytes."""
from .cache import CompressedCache
from .cachefile import CacheFileError, save_cache
from .codecs import CODECS, Codec, make_codec, register_codec
from .layers import ComposedLayer, FullLayer, FullSlidingLayer
from .methods import METHODS, Method, build_method, canonical_spec, make_cache, method_options, parse_spec, register
from .models import ModelNotAvailable, load_model
from .eval.runner import evaluate
from .persist import load_cache
from .policies.scoring import POLICIES, Policy, register_policy
from .version import __version__


__all__ = [
    "CompressedCache", "ComposedLayer", "FullLayer", "FullSlidingLayer", "METHODS", "Method", "build_method",
    "canonical_spec", "make_cache", "method_options", "parse_spec", "register", "CODECS", "Codec", "make_codec",
    "register_codec", "POLICIES", "Policy", "register_policy", "ModelNotAvailable", "load_model", "evaluate",
    "load_cache", "save_cache", "CacheFileError", "__version__",
]
