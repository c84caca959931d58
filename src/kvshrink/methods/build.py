"""From a spec to a method: parsing and canonical spelling of specs against the registries, `POLICY + CODEC`
compositions, and `make_cache` (by spec, or whatever a profile file describes)."""
from __future__ import annotations

import dataclasses
from typing import Any

from .. import spec as specs
from ..cache import CompressedCache
from ..codecs.base import CODECS, make_codec
from ..options import convert, unknown_options
from ..policies.scoring import POLICIES
from ..profile import load_profile
from .base import METHODS, CodecRecipe, Method
from .composed import Composition
from .eviction import PolicyRecipe

__all__ = ["parse_spec", "canonical_spec", "with_options", "build_method", "make_cache"]


def _recipe(name: str, role: str) -> tuple[type, str]:
    """The class a spec part names (a method; on the codec side also a codec; on the policy side also a registered
    token policy) and its kind of registry."""
    if name in METHODS:
        return METHODS[name], "method"
    if role in ("codec", "method") and name in CODECS:
        return CODECS[name], "codec"
    if role == "policy" and name in POLICIES:
        return PolicyRecipe, "policy"
    others = ("token policies", POLICIES) if role == "policy" else ("codecs", CODECS)
    raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}; {others[0]}: "
                     f"{', '.join(sorted(others[1]))}")


def _typed(part: specs.Part, role: str) -> tuple[type, str, dict[str, Any]]:
    cls, kind = _recipe(part.name, role)
    options = {k: convert(CodecRecipe if kind == "codec" and k in CodecRecipe.OWN else cls, kind, k, raw)
               for k, raw in part.options}
    if kind == "policy":
        options["policy"] = part.name
    return cls, kind, options


def _codec_recipe(codec_cls: type, options: dict[str, Any]) -> CodecRecipe:
    """A bare codec spec's recipe: its own options (window, sinks, exact_dtype) and the codec's."""
    own = {k: v for k, v in options.items() if k in CodecRecipe.OWN}
    codec = make_codec(codec_cls.name, **{k: v for k, v in options.items() if k not in CodecRecipe.OWN})
    return CodecRecipe(codec=codec, **own)


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """'tada:bits=2,group=32' -> ('tada', {'bits': 2, 'group': 32}), options converted to their types. A
    composition is parsed by `build_method`; here it is an error."""
    parts = specs.parse(text)
    if len(parts) != 1:
        raise ValueError(f"method spec {text!r} is a composition (POLICY + CODEC): use build_method / make_cache")
    cls, _, options = _typed(parts[0], "method")
    return cls.name, options


def canonical_spec(text: str) -> str:
    """The canonical spelling of a spec: each part's options in the recipe's declared order, values formatted one
    way (0.25, true), spaces as in 'POLICY + CODEC'. Options given explicitly stay, even at their defaults."""
    parts = specs.parse(text)
    out = []
    for i, part in enumerate(parts):
        role = "method" if len(parts) == 1 else ("policy", "codec")[i]
        cls, kind, options = _typed(part, role)
        order = [f.name for f in dataclasses.fields(cls)] + (list(CodecRecipe.OWN) if kind == "codec" else [])
        items = sorted(((k, v) for k, v in options.items() if not (kind == "policy" and k == "policy")),
                       key=lambda kv: order.index(kv[0]))
        out.append((part.name, items))
    return specs.format_spec(out)


def with_options(spec: str, options: list[tuple[str, Any]]) -> str:
    """`spec` with more options (key, value) added to its last part (the CODEC side of a composition), canonical."""
    parts = list(specs.parse(spec))
    last = parts[-1]
    given = dict(last.options)
    for key, value in options:
        given[key] = specs.format_value(value) if not isinstance(value, str) else value
    parts[-1] = specs.Part(last.name, tuple(given.items()))
    return canonical_spec(specs.format_spec([(p.name, list(p.options)) for p in parts]))


def build_method(method: "str | Method", **options: Any) -> Method:
    """A method instance from a name, spec string or composition plus keyword options (keywords win over the spec;
    in a composition they go to the CODEC side)."""
    if isinstance(method, Method):
        return dataclasses.replace(method, **options) if options else method
    parts = specs.parse(method)
    if len(parts) == 1:
        cls, kind, spec_options = _typed(parts[0], "method")
        if kind == "codec":
            return _codec_recipe(cls, {**spec_options, **options})
        unknown_options(cls, "method", options)
        return cls(**{**spec_options, **options})
    policy_cls, _, policy_options = _typed(parts[0], "policy")
    codec_cls, kind, codec_options = _typed(parts[1], "codec")
    if kind == "codec":
        storing, stated = _codec_recipe(codec_cls, {**codec_options, **options}), {**codec_options, **options}
    else:
        unknown_options(codec_cls, kind, options)
        stated = {**codec_options, **options}
        storing = codec_cls(**stated)
    return Composition.of(policy_cls(**policy_options), policy_options, storing, stated)


def make_cache(model: Any, method: "str | Method" = "full", *, profile: str | None = None,
               **options: Any) -> CompressedCache:
    """A `CompressedCache` for `model` built by the named method (`make_cache(model, "tada", bits=2)`), a
    composition (`make_cache(model, "snapkv:budget=0.25 + tada:profile=P")`) or whatever a profile file describes
    (`make_cache(model, profile=PATH)`; with a method named, the profile is that method's option)."""
    if profile is not None:
        if method == "full":
            return build_method(load_profile(profile).method, profile=str(profile), **options).make_cache(model)
        options["profile"] = str(profile)
    return build_method(method, **options).make_cache(model)
