"""The package's layers, and no import cycle in harness/.

Every import counts, at module level, inside functions and under TYPE_CHECKING alike (an
import inside a function hides a dependency from Python, not from the reader).  A new cycle
fails here with the modules that form it; so does an import that reaches up to a higher
layer (:data:`LAYERS`, lowest first: the order of the README's layout) and a module that
belongs to no layer."""

from __future__ import annotations

import ast
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[2] / "harness"


def import_graph() -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for path in HARNESS.rglob("*.py"):
        if "_shipped" in path.parts:
            continue
        parts = path.relative_to(HARNESS.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# Lowest first; a module may import its own layer and the ones before it.  A name stands
# for the module and everything under it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("basics", ("harness", "harness.errors", "harness.paths", "harness.terms")),
    ("codecs", ("harness.varstore", "harness.signatures")),
    ("processes and channels", ("harness.guest",)),
    ("what exists", ("harness.inventory",)),
    ("images", ("harness.images",)),
    ("the spec", ("harness.spec",)),
    ("a running guest", ("harness.machine", "harness.state", "harness.tpm")),
    ("moving guests", ("harness.migration", "harness.ramcheck", "harness.snapshots", "harness.faults", "harness.matrix",
                       "harness.factory")),
    ("what must survive", ("harness.bootorder", "harness.survival", "harness.storm", "harness.secureboot")),
    ("nested guests", ("harness.nested",)),
    ("scenarios", ("harness.scenarios",)),
    ("the nightly", ("harness.nightly",)),
    ("interfaces", ("harness.plugin", "harness.cli", "harness.__main__")),
]


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (length of the matching name, layer)
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[0]):
                best = (len(name), i)
    return None if best is None else best[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        here = layer_of(module)
        for target in sorted(targets):
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                found.append(f"{module} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]})")
    return found


def test_every_module_has_a_layer() -> None:
    assert [m for m in import_graph() if layer_of(m) is None] == []


def test_no_import_reaches_up_a_layer() -> None:
    assert upward_imports(import_graph()) == []


def test_the_layer_check_finds_an_upward_import() -> None:
    assert upward_imports({"harness.inventory.builds": {"harness.machine"}, "harness.machine": set()}) == [
        "harness.inventory.builds (what exists) imports harness.machine (a running guest)"
    ]


def test_the_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_harness() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "harness.machine" in graph["harness.migration"]
    found = cycles(graph)
    detail = [{m: sorted(graph[m] & set(c)) for m in c} for c in found]
    assert found == [], f"import cycles: {detail}"
