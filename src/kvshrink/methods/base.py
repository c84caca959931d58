"""The method registry: a method is a named recipe (a dataclass of options) that builds a `CompressedCache`.

Two roles a recipe can play in a composition:
- a *storing* method (`StoringMethod`: kivi, tada, turboquant) says per layer which codecs store keys and values,
  and how many exact sinks and window tokens stay; a bare codec (`grouped:bits=4`, `rotated:bits=3`, `exact`)
  does the same for every layer;
- a *policy* method (`EvictionMethod`: streamingllm, window, h2o, snapkv, tova, mixed) says which tokens stay.
`snapkv:budget=0.25 + tada:profile=P` keeps SnapKV's quarter of the tokens and stores them with the profile's codecs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.cache_utils import CacheLayerMixin

from .. import spec as specs
from ..cache import CompressedCache, install_padding_hook
from ..codecs.base import Codec
from ..compat import layer_types_and_kwargs
from ..distributed import head_shard
from ..layers.composed import ComposedLayer
from ..models import head_dim_of
from ..options import check_types, option, options_of, registrar
from ..profile import fingerprint

__all__ = ["METHODS", "Method", "StoringMethod", "PolicyMethod", "CodecRecipe", "register", "option", "method_options", "get_method",
           "build_layers"]

#: dtypes an exact window and sinks may be held in ("model": the model's own)
EXACT_DTYPES = {"model": None, "float16": torch.float16, "bfloat16": torch.bfloat16}

METHODS: dict[str, type["Method"]] = {}
#: class decorator: make a method available by its `name` to `make_cache` and the CLI
register = registrar(METHODS, "method")
method_options = options_of


@dataclass
class Method:
    """Base of every recipe. Subclasses are dataclasses whose fields are the options, and build one layer each."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_types(self, "method")
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the option when the settings are unusable (called on construction)."""

    def prepare(self, model_or_config: Any) -> None:
        """Per-model set-up before the layers are built (attention switched, profiles checked, kernels chosen)."""

    def layer(self, layer_idx: int, sliding_window: int | None) -> CacheLayerMixin:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """This recipe as a canonical spec string (every option, in declared order)."""
        return specs.format_part(self.name, list(self.options().items()))

    def label(self) -> str:
        """What the memory report calls the method."""
        return self.name

    def make_cache(self, model_or_config: Any) -> CompressedCache:
        """One layer per decoder layer of the model, sliding-window layers keeping their window. Under tensor
        parallelism (a model sharded by transformers) the layers hold this rank's KV heads (`self._shard`)."""
        self._shard = head_shard(model_or_config)
        config = getattr(model_or_config, "config", model_or_config)
        self.prepare(model_or_config)
        install_padding_hook(model_or_config)  # a left-padded batch: one layer per row (layers/rows.py)
        layers = build_layers(self, config)
        cache = CompressedCache(layers, method=self.label(), options=self.options(), spec=self.spec())
        cache.fingerprint = fingerprint(config)
        cache.shard = self._shard
        return cache


def take_profile_options(method: Method, options: dict[str, Any], refused: tuple[str, ...], where: str,
                         made: str = "was calibrated with", fix: str = "recalibrate, or leave {key} out") -> None:
    """Set `method`'s options from a profile's: an option the method lacks or in `refused` is an error, and so is an
    explicit value (one not the default) that differs from the profile's."""
    defaults = {f.name: f.default for f in dataclasses.fields(method)}
    for key, value in options.items():
        if key not in defaults or key in refused:
            raise ValueError(f"{where}: option {key!r} cannot be set by a profile")
        mine = getattr(method, key)
        if mine != value and mine != defaults[key]:
            raise ValueError(f"{where} {made} {key}={value!r}; {key}={mine!r} was asked for: {fix.format(key=key)}")
        setattr(method, key, value)


def build_layers(method: Method, config: Any) -> list[CacheLayerMixin]:
    text = config.get_text_config(decoder=True)
    layer_types, layer_kwargs = layer_types_and_kwargs(text)
    head_dim = head_dim_of(text)
    layers = []
    for i, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
        if kind == "full_attention":
            sliding = None
        elif kind == "sliding_attention":
            sliding = kwargs["sliding_window"]
        else:
            raise ValueError(f"layer {i}: layer type {kind!r} is not supported (supported: full_attention, "
                             "sliding_attention)")
        layer = method.layer(i, sliding)
        if hasattr(layer, "check_head_dim"):
            layer.check_head_dim(head_dim)
        layers.append(layer)
    return layers


@dataclass
class StoringMethod(Method):
    """A recipe that stores every token leaving an exact window with codecs chosen per layer (kivi, tada,
    turboquant); it can be the CODEC side of `POLICY + CODEC`."""

    def layer_codecs(self, layer_idx: int) -> tuple[Codec, Codec] | None:
        """(key codec, value codec) of a layer; None: the layer keeps an uncompressed cache."""
        raise NotImplementedError

    def exact_torch_dtype(self):
        """The dtype of the exact window and sinks (None: the model's)."""
        return None


@dataclass
class PolicyMethod(Method):
    """A recipe that says which tokens each layer keeps (the eviction methods, razor); it can be the POLICY side of
    `POLICY + CODEC`, whose CODEC side gives the codecs the kept tokens are stored with."""

    def scored_layer(self, layer_idx: int, key_codec: Codec, value_codec: Codec, exact_dtype, window: int,
                     sinks: int) -> CacheLayerMixin:
        """Layer `layer_idx` keeping this recipe's tokens, stored by the given codecs."""
        raise NotImplementedError


@dataclass
class CodecRecipe(StoringMethod):
    """A bare codec as a method (`gear:bits=2`) or as the CODEC side of a composition: the same codec for the keys
    and values of every layer, behind exact sinks and an exact window (their options go with the codec's)."""

    name = "codec"

    codec: Any = None
    window: int = option(32, "recent tokens kept exact")
    sinks: int = option(4, "first tokens kept exact (attention sinks)")
    exact_dtype: str = option("model", "dtype of the exact window and sinks: model, float16 or bfloat16")

    #: the options that belong to the recipe, not to the codec
    OWN = ("window", "sinks", "exact_dtype")

    def validate(self) -> None:
        if self.exact_dtype not in EXACT_DTYPES:
            raise ValueError(f"{self.codec.name}: exact_dtype must be one of {', '.join(EXACT_DTYPES)}, "
                             f"got {self.exact_dtype!r}")
        for arg in ("window", "sinks"):
            if getattr(self, arg) < 0:
                raise ValueError(f"{self.codec.name}: {arg} must be >= 0, got {getattr(self, arg)}")

    def layer_codecs(self, layer_idx: int) -> tuple[Codec, Codec]:
        c = dataclasses.replace(self.codec, layer=layer_idx) if hasattr(self.codec, "layer") else self.codec
        return c, c.for_values()

    def exact_torch_dtype(self):
        return EXACT_DTYPES[self.exact_dtype]

    def label(self) -> str:
        return self.codec.name

    def options(self) -> dict[str, Any]:
        return {**self.codec.options(), **{k: getattr(self, k) for k in self.OWN}}

    def spec(self) -> str:
        return specs.format_part(self.codec.name, list(self.options().items()))

    def layer(self, layer_idx: int, sliding_window: int | None):
        return ComposedLayer(*self.layer_codecs(layer_idx), window=self.window, sinks=self.sinks,
                             exact_dtype=self.exact_torch_dtype(), layer_idx=layer_idx, sliding_window=sliding_window,
                             shard=getattr(self, "_shard", None))


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
