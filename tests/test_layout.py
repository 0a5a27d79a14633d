"""The house: wings import one way, no module imports in a circle, no module grows past 600 lines.

Read from the source (every import statement, also inside functions and under TYPE_CHECKING), so it
holds without importing anything. A wing may import its own modules, the shared records at the root and
the wings below it in `RANKS`; wings of one rank never import each other.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "prescope"
ROOT_RECORDS = {"__init__", "layout", "config", "timeline", "files", "data"}  # plain records every wing may use
ENTRY_POINTS = {"cli"}  # names jobs by module path only; nothing imports it
RANKS = {"models": 1, "hardware": 1, "routing": 2, "predict": 3, "policies": 4, "engine": 5, "sim": 5,
         "experiments": 6, "workbench": 7}
MAX_LINES = 600


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "assets" in path.parts:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of the package that `name` imports; `from pkg import x` depends on pkg's __init__ too."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            for candidate in [target] + [f"{target}.{a.name}" for a in node.names]:
                if candidate in known and candidate != name:
                    out.add(candidate)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known and alias.name != name:
                    out.add(alias.name)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def wing(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_wing_has_a_rank_and_the_root_holds_only_records():
    wings = {wing(m) for m in modules()}
    assert wings <= set(RANKS) | ROOT_RECORDS | ENTRY_POINTS, sorted(wings - set(RANKS) - ROOT_RECORDS - ENTRY_POINTS)


def test_imports_run_one_way_between_wings():
    wrong = []
    for source, targets in graph().items():
        here = wing(source)
        for target in targets:
            there = wing(target)
            if here == there or there in ROOT_RECORDS or here in ENTRY_POINTS:
                continue
            if there in ENTRY_POINTS or here in ROOT_RECORDS or RANKS[there] >= RANKS[here]:
                wrong.append(f"{source} -> {target}")
    assert not wrong, "imports against the wings' order:\n" + "\n".join(sorted(wrong))


def test_no_module_imports_in_a_circle():
    edges, circles = graph(), []
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state[nxt] == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif state[nxt] == 0:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if state[node] == 0:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_no_module_is_longer_than_600_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_checker_sees_imports_inside_functions_and_package_inits(tmp_path):
    pkg = tmp_path / "prescope"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "engine" / "__init__.py").write_text("from prescope.engine.a import x\n")
    (pkg / "engine" / "a.py").write_text("def f():\n    from prescope.engine import y\n")
    known = {"prescope.engine": pkg / "engine" / "__init__.py", "prescope.engine.a": pkg / "engine" / "a.py"}
    assert imports("prescope.engine.a", known["prescope.engine.a"], known) == {"prescope.engine"}
    assert imports("prescope.engine", known["prescope.engine"], known) == {"prescope.engine.a"}
