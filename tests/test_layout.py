"""The layout holds (issue 21): a package per stage, no import circle even counting imports made
inside functions, at most four modules flat at cxr_node's top, and no module over 450 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cxr_node", "training")
MAX_LINES = 450
FLAT_ALLOWED = {"__main__", "errors", "logs"}  # config is a package (settings, schema)


def _modules(pkg: str) -> dict[str, Path]:
    out = {}
    for p in (REPO / pkg).rglob("*.py"):
        name = ".".join(p.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def import_graph(packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in its body (functions included)."""
    mods = {k: v for pkg in packages for k, v in _modules(pkg).items()}

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = m.split(".") if is_pkg else m.split(".")[:-1]
                    mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                r = resolve(t) if t.split(".")[0] in packages else None
                if r and r != m:
                    graph[m].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_even_inside_functions():
    assert cycles(import_graph(("cxr_node", "training"))) == []


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_at_most_four_modules_flat_at_the_top():
    flat = {p.stem for p in (REPO / "cxr_node").glob("*.py")} - {"__init__"}
    assert flat <= FLAT_ALLOWED, f"move {sorted(flat - FLAT_ALLOWED)} into the package of its stage"
def test_no_module_over_450_lines():
    sizes = {name: sum(1 for _ in path.open()) for name, path in _modules("cxr_node").items()}
    assert {n: k for n, k in sizes.items() if k > MAX_LINES} == {}
