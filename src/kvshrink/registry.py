"""Name registries (methods, tasks): a class decorator that files a class under its `name`."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", bound=type)


def registrar(table: dict[str, type], kind: str) -> Callable[[T], T]:
    """A decorator adding a class to `table` by its `name`; an empty or taken name is an error."""

    def register(cls: T) -> T:
        name = getattr(cls, "name", "")
        if not name or name in table:
            raise ValueError(f"{kind} name {name!r} is empty or already registered")
        table[name] = cls
        return cls

    return register
