"""The package's modules import one another without a circle, function-level imports included (they would only
hide one), and the old homes of moved names are gone rather than kept as shims."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
PACKAGE = SRC / "kvshrink"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the kvshrink modules it imports anywhere in its text (a `from pkg import name` counts as pkg.name
    when that is a module, else as pkg)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("kvshrink"):
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_even_through_function_level_imports():
    assert cycles(import_graph()) == []


def test_the_check_would_see_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_every_module_imports_in_dependency_order_in_a_fresh_interpreter():
    graph = import_graph()
    order, seen = [], set()

    def add(m):
        if m in seen:
            return
        seen.add(m)
        for d in sorted(graph[m]):
            add(d)
        order.append(m)

    for m in sorted(graph):
        add(m)
    skip = {"kvshrink.kernels.triton_kernels"}  # needs Triton, an optional extra
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % [m for m in order if m not in skip]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("old", ["kvshrink.evict", "kvshrink.latent", "kvshrink.residual", "kvshrink.registry",
                                 "kvshrink.layers.windowed", "kvshrink.layers.evicting"])
def test_old_homes_of_moved_names_are_gone(old):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _kvshrink_names(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) of every kvshrink import in a script (name None for `import kvshrink.x`)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kvshrink":
            out += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.split(".")[0] == "kvshrink"]
    return out


@pytest.mark.parametrize("script", sorted(p.relative_to(BENCHMARKS).as_posix() for p in BENCHMARKS.rglob("*.py")
                                          if ".venv" not in p.parts))
def test_benchmark_scripts_name_only_what_the_package_has(script):
    """A rename in the package does not silently break a benchmark (they run rarely and by hand)."""
    missing = []
    for module, name in _kvshrink_names(BENCHMARKS / script):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{module} ({e})")
            continue
        if name is not None and name != "*" and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{module}.{name}")
    assert not missing, f"benchmarks/{script} imports names the package no longer has: {missing}"
