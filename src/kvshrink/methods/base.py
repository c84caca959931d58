"""The method registry: a method is a named recipe (a dataclass of options) that builds a `CompressedCache`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from transformers.cache_utils import CacheLayerMixin, get_layer_types_and_kwargs

from ..cache import CompressedCache
from ..models import head_dim_of
from ..registry import registrar

METHODS: dict[str, type["Method"]] = {}
#: class decorator: make a method available by its `name` to `make_cache` and the CLI
register = registrar(METHODS, "method")


def option(default: Any, help: str) -> Any:
    """A method option: a dataclass field with a default and a one-line help text."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class Method:
    """Base of every recipe. Subclasses are dataclasses whose fields are the options, and build one layer each."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = _type_of(f)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            elif expected is not None and not isinstance(value, expected):
                raise TypeError(f"{self.name}: option {f.name} must be {expected.__name__}, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the option when the settings are unusable (called on construction)."""

    def layer(self, layer_idx: int, sliding_window: int | None) -> CacheLayerMixin:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def make_cache(self, model_or_config: Any) -> CompressedCache:
        """One layer per decoder layer of the model, sliding-window layers keeping their window. Under tensor
        parallelism (a model sharded by transformers) the layers hold this rank's KV heads (`self._shard`)."""
        from ..distributed import head_shard

        self._shard = head_shard(model_or_config)
        config = getattr(model_or_config, "config", model_or_config)
        text = config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
        head_dim = head_dim_of(text)
        layers = []
        for i, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
            if kind == "full_attention":
                sliding = None
            elif kind == "sliding_attention":
                sliding = kwargs["sliding_window"]
            else:
                raise ValueError(f"layer {i}: layer type {kind!r} is not supported (supported: full_attention, sliding_attention)")
            layer = self.layer(i, sliding)
            if hasattr(layer, "check_head_dim"):
                layer.check_head_dim(head_dim)
            layers.append(layer)
        from ..profile import fingerprint

        cache = CompressedCache(layers, method=self.name, options=self.options())
        cache.fingerprint = fingerprint(config)
        cache.shard = self._shard
        return cache


def _type_of(f: dataclasses.Field) -> type | None:
    t = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}.get(str(f.type))
    return t


def method_options(cls: type[Method]) -> list[dict[str, Any]]:
    """Name, type, default and help of each option of a method."""
    return [
        {"name": f.name, "type": _type_of(f).__name__ if _type_of(f) else str(f.type), "default": f.default,
         "help": f.metadata.get("help", "")}
        for f in dataclasses.fields(cls)
    ]


def _convert(cls: type[Method], key: str, raw: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        raise ValueError(f"method {cls.name!r} has no option {key!r}; its options are: {', '.join(fields) or 'none'}")
    t = _type_of(fields[key])
    try:
        if t is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return raw.lower() in ("1", "true", "yes")
        return t(raw) if t is not None else raw
    except ValueError:
        raise ValueError(f"method {cls.name!r}: option {key}={raw!r} is not a valid {t.__name__}") from None


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'tada:bits=2,group=32' -> ('tada', {'bits': 2, 'group': 32}), options converted to their types."""
    if not isinstance(spec, str):
        raise TypeError(f"a method spec is a string such as 'kivi:bits=4' or 'full', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    cls = get_method(name.strip())
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"method spec {spec!r}: option {item!r} must be written key=value")
        options[key.strip()] = _convert(cls, key.strip(), raw.strip())
    return cls.name, options


def build_method(method: str | Method, **options: Any) -> Method:
    """A method instance from a name or spec string plus keyword options (keywords win over the spec)."""
    if isinstance(method, Method):
        if options:
            return dataclasses.replace(method, **options)
        return method
    name, spec_options = parse_spec(method)
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in options:
        if key not in fields:
            raise ValueError(f"method {name!r} has no option {key!r}; its options are: {', '.join(sorted(fields)) or 'none'}")
    return cls(**{**spec_options, **options})


def make_cache(model: Any, method: str | Method = "full", **options: Any) -> CompressedCache:
    """A `CompressedCache` for `model` built by the named method: `make_cache(model, "tada", bits=2)`."""
    return build_method(method, **options).make_cache(model)
