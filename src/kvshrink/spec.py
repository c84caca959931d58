"""Spec strings: the one parser and formatter of `name:key=value,...` and of `POLICY + CODEC` compositions.

A spec names a recipe and its options (`kivi:bits=2,group=32`); a composition joins a token policy and a codec with
` + ` (`snapkv:budget=0.25 + tada:profile=P`). This module is the syntax only (text in, names and raw option texts
out, and back); the registries that own the names convert the texts to typed options (`methods.canonical_spec`),
so every record, plot, command line and benchmark spells a spec the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

JOIN = " + "


@dataclass(frozen=True)
class Part:
    """One recipe of a spec: its name and its options as written (key -> raw text), in the order written."""

    name: str
    options: tuple[tuple[str, str], ...] = ()


def parse(text: str) -> tuple[Part, ...]:
    """'snapkv:budget=0.25 + tada:bits=2' -> (Part('snapkv', (('budget', '0.25'),)), Part('tada', ...)).
    Whitespace around names, keys and values is ignored; an empty name, an option without '=', a repeated key or
    more than two parts is an error naming the spec."""
    if not isinstance(text, str):
        raise TypeError(f"a method spec is a string such as 'kivi:bits=4' or 'full', got {text!r}")
    chunks = [c.strip() for c in text.split("+")]
    if len(chunks) > 2:
        raise ValueError(f"method spec {text!r}: a composition is one token policy and one codec, 'POLICY + CODEC'")
    parts = []
    for chunk in chunks:
        name, _, rest = chunk.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"method spec {text!r}: a part has no name (write e.g. 'snapkv:budget=0.25 + kivi')")
        options: list[tuple[str, str]] = []
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, raw = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"method spec {text!r}: option {item!r} must be written key=value")
            if key.strip() in dict(options):
                raise ValueError(f"method spec {text!r}: option {key.strip()!r} is given twice")
            options.append((key.strip(), raw.strip()))
        parts.append(Part(name, tuple(options)))
    return tuple(parts)


def format_value(value: Any) -> str:
    """The canonical text of an option value: true/false, integers plainly, floats by `repr` (0.25, 1.0)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def format_part(name: str, options: Sequence[tuple[str, Any]]) -> str:
    if not options:
        return name
    return name + ":" + ",".join(f"{k}={format_value(v)}" for k, v in options)


def format_spec(parts: Sequence[tuple[str, Sequence[tuple[str, Any]]]]) -> str:
    """[(name, [(key, value), ...]), ...] -> 'name:key=value,... + name:...'."""
    return JOIN.join(format_part(name, opts) for name, opts in parts)


def split_specs(text: str | Sequence[str]) -> list[str]:
    """A comma-separated list of specs ('full,kivi:bits=2,group=32,snapkv:budget=0.25 + tada') as a list.

    A comma starts a new spec unless the next item is a bare key=value, which belongs to the spec before it (to its
    last part, in a composition)."""
    chunks = [text] if isinstance(text, str) else list(text)
    specs: list[str] = []
    for chunk in chunks:
        for item in filter(None, (s.strip() for s in chunk.split(","))):
            head = item.split("+")[0]
            if "=" in head and ":" not in head:
                if not specs:
                    raise ValueError(f"method list {chunk!r}: option {item!r} comes before any method name")
                last = specs[-1].split("+")[-1]
                specs[-1] += ("," if ":" in last else ":") + item
            else:
                specs.append(item)
    if not specs:
        raise ValueError("the method list is empty")
    return specs


def label(spec: str) -> str:
    """A spec as a plot label: `profile=` paths shortened to the file's stem, so that
    `tada:profile=benchmarks/profiles/m-tada-0.20.json` reads `tada:profile=m-tada-0.20`; other values stay whole
    ('/' also joins `levels` and `exact_layers`)."""
    out = []
    for chunk in spec.split(JOIN):
        name, sep, opts = chunk.partition(":")
        items = []
        for item in opts.split(",") if opts else []:
            key, eq, value = item.partition("=")
            if eq and key == "profile":
                value = Path(value).name.removesuffix(".json")
            items.append(f"{key}{eq}{value}")
        out.append(name + sep + ",".join(items))
    return JOIN.join(out)
