"""The layout holds (issues 21, 29): a package per stage in cxr_node/ and training/, no import circle even
counting imports made inside functions, few modules flat at either top, no module over 450 lines, and
every ``python -m training...`` command the docs name runs (old names are aliases)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cxr_node", "training")
MAX_LINES = 450
FLAT_ALLOWED = {"__main__", "errors", "logs"}  # config is a package (settings, schema)
#: training/'s top: the command table (``python -m training``) and what every stage shares.
TRAINING_FLAT_ALLOWED = {"__main__", "commands", "common"}
#: Every command training/ had before it became packages (issue 29): each old name still runs.
OLD_COMMANDS = {"abnormal", "calibrate", "evaluate", "explain", "export", "frozen", "lso", "lungseg", "ood", "pack",
                "probes", "site_abnormal", "site_onboarding", "sources", "train"}


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
def test_training_is_a_package_per_stage():
    flat = {p.stem for p in (REPO / "training").glob("*.py")} - {"__init__"}
    assert flat <= TRAINING_FLAT_ALLOWED, f"move {sorted(flat - TRAINING_FLAT_ALLOWED)} into the package of its stage"
    stages = {p.name for p in (REPO / "training").iterdir() if (p / "__init__.py").exists()} - {"results"}
    assert stages == {"data", "train", "evaluate", "export", "onboarding"}


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_module_over_450_lines(pkg):
    sizes = {name: sum(1 for _ in path.open()) for name, path in _modules(pkg).items()}
    assert {n: k for n, k in sizes.items() if k > MAX_LINES} == {}


def _runnable(module: str) -> bool:
    p = REPO.joinpath(*module.split("."))
    if p.is_dir():
        return (p / "__main__.py").exists()
    return p.with_suffix(".py").exists() and '__name__ == "__main__"' in p.with_suffix(".py").read_text()


def test_every_command_in_the_table_runs_and_every_old_name_is_an_alias():
    from training.commands import ALIASES, COMMANDS

    assert [c.module for c in COMMANDS if not _runnable(c.module)] == []
    assert {f"training.{n}" for n in OLD_COMMANDS} <= set(ALIASES) | {c.module for c in COMMANDS}
    assert set(ALIASES.values()) <= {c.module for c in COMMANDS}
    # an alias never hides a real module, and every module with an entry point is in the table
    assert [a for a in ALIASES if _runnable(a)] == []
    entry_points = {m for m in _modules("training") if not m.endswith("__main__") and _runnable(m)}
    assert entry_points - {c.module for c in COMMANDS} - {"training"} == set()


def _documented_commands() -> dict[str, set[str]]:
    files = [REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("training/**/*.md"), *REPO.glob("training/*.sh"),
             *REPO.glob("training/**/*.py"), *REPO.glob("cxr_node/**/*.py"), *REPO.glob("cxr_node/models/*.md"),
             *REPO.glob("bench/*.py")]
    found: dict[str, set[str]] = {}
    for f in files:
        for m in re.finditer(r"python3? -m (training[\w.]*)", f.read_text(encoding="utf-8")):
            found.setdefault(m[1].rstrip("."), set()).add(str(f.relative_to(REPO)))
    return found


def test_every_command_the_docs_name_exists():
    from training.commands import ALIASES, COMMANDS

    known = {c.module for c in COMMANDS} | set(ALIASES) | {"training"}
    found = _documented_commands()
    assert "training.evaluate.lso" in found and "training.train" in found  # the scan reads the docs
    assert {m: sorted(f) for m, f in found.items() if m not in known} == {}


def test_an_old_name_runs_the_new_command_and_an_old_import_says_where_it_went():
    env_py = [sys.executable, "-c"]
    listing = subprocess.run([sys.executable, "-m", "training"], cwd=REPO, capture_output=True, text=True,
                             timeout=60, check=True).stdout
    assert "training.evaluate.lso" in listing and "(was training.lso)" in listing
    # --help of an old name is the new command's (cheap: the parser is built before torch is imported)
    old = subprocess.run([sys.executable, "-m", "training.sources", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert old.returncode == 0, old.stderr
    assert old.stdout.startswith("usage: python -m training.data.sources")
    imp = subprocess.run([*env_py, "import training.lso"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert imp.returncode == 1
    assert "training.lso is now training.evaluate.lso" in imp.stderr
    missing = subprocess.run([sys.executable, "-m", "training.nonesuch"], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 1 and "No module named training.nonesuch" in missing.stderr
