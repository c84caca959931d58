"""Named, optioned recipes (methods, codecs, token policies): a dataclass whose fields are the options, a registry
filed by name, and the conversions a spec string's `key=value` text needs. One implementation for the three
registries, so `kvshrink methods`, `kvshrink codecs` and spec parsing treat them alike."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

T = TypeVar("T", bound=type)
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def option(default: Any, help: str) -> Any:
    """An option: a dataclass field with a default and a one-line help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def registrar(table: dict[str, type], kind: str) -> Callable[[T], T]:
    """A class decorator adding a class to `table` by its `name`; an empty or taken name is an error."""

    def register(cls: T) -> T:
        name = getattr(cls, "name", "")
        if not name or name in table:
            raise ValueError(f"{kind} name {name!r} is empty or already registered")
        table[name] = cls
        return cls

    return register


def type_of(f: dataclasses.Field) -> type | None:
    """The Python type of an option (annotations are strings under `from __future__ import annotations`)."""
    return f.type if isinstance(f.type, type) else _TYPES.get(str(f.type))


def options_of(cls: type) -> list[dict[str, Any]]:
    """Name, type, default and help of each option of a recipe class."""
    return [{"name": f.name, "type": type_of(f).__name__ if type_of(f) else str(f.type), "default": f.default,
             "help": f.metadata.get("help", "")} for f in dataclasses.fields(cls)]


def convert(cls: type, kind: str, key: str, raw: str) -> Any:
    """The text `raw` of option `key` of recipe `cls` as the option's type; a clear error otherwise."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        raise ValueError(f"{kind} {cls.name!r} has no option {key!r}; its options are: {', '.join(fields) or 'none'}")
    t = type_of(fields[key])
    try:
        if t is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return raw.lower() in ("1", "true", "yes")
        return t(raw) if t is not None else raw
    except ValueError:
        raise ValueError(f"{kind} {cls.name!r}: option {key}={raw!r} is not a valid {t.__name__}") from None


def check_types(obj: Any, kind: str) -> None:
    """Refuse an option of the wrong type (an int given for a float option is converted)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        expected = type_of(f)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(obj, f.name, float(value))
        elif expected is not None and not isinstance(value, expected):
            raise TypeError(f"{kind} {obj.name}: option {f.name} must be {expected.__name__}, got {value!r}")


def unknown_options(cls: type, kind: str, given: dict[str, Any]) -> None:
    """Raise naming the first option of `given` that `cls` does not have."""
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in given:
        if key not in fields:
            raise ValueError(f"{kind} {cls.name!r} has no option {key!r}; its options are: "
                             f"{', '.join(fields) or 'none'}")
