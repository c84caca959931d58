"""Evaluation tasks: each is one module with one `Task` subclass, registered by name.

A task measures one (method, context length, seed) cell and returns its metrics plus the memory report of a cache
it used. Everything goes through `Env`, which owns the model, the text, the caches and the memoised reference
(transformers' `DynamicCache` on the same inputs), so that tasks sharing a computation (ppl and kl score the same
positions) run it once.
"""
from __future__ import annotations

import importlib
from typing import Any, ClassVar

from ...options import registrar

TASKS: dict[str, type["Task"]] = {}
#: class decorator: make a task available by its `name` to `evaluate` and the CLI
register_task = registrar(TASKS, "task")


class Task:
    """One metric family. `run` returns (metrics, memory report of a cache built by `spec`)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: metrics shown in tables: (key, column title, format, higher is better, drawn in the plot)
    columns: ClassVar[tuple[tuple[str, str, str, bool, bool], ...]] = ()

    def run(self, env: Any, spec: str, context: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        raise NotImplementedError


def get_task(name: str) -> Task:
    _load_builtin()
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


def columns() -> list[tuple[str, str, str, bool, bool]]:
    """The table columns of every registered task, in registration order (a family's shared columns, such as the
    RULER average, after its tasks' own)."""
    _load_builtin()
    own = [c for cls in TASKS.values() for c in cls.columns]
    shared = [c for cls in TASKS.values() for c in getattr(cls, "shared_columns", ())]
    seen: set[str] = set()
    return [c for c in own + shared if not (c[0] in seen or seen.add(c[0]))]


def _load_builtin() -> None:
    for module in ("ppl", "kl", "match", "passkey", "ruler", "conversation"):
        importlib.import_module(f"{__name__}.{module}")
