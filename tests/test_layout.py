"""The package's layering: no two modules import each other (directly or through others, at
module level or inside functions), and the library does not depend on the experiment tooling.
Imports under ``TYPE_CHECKING`` never run and are left out."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sparselearn"
# old import paths of modules that moved into experiments/ (they re-export, nothing more)
MOVED = ("cli", "train", "study", "report", "analyze", "demo", "plots")
SHIMS = {f"sparselearn.{name}" for name in MOVED}
ENTRY = {"sparselearn.__main__"}  # the command: runs the tooling


def _module_name(path: Path) -> str:
    parts = ["sparselearn", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _imports(path: Path, name: str) -> set[str]:
    """sparselearn modules that ``path`` imports, when imported or when its functions run."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.With, ast.For)
            ):
                visit(node.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("sparselearn"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")
                    base = base if is_package else base[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if not module.startswith("sparselearn"):
                    continue
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    found.add(sub if _exists(sub) else module)

    visit(tree.body)
    return found - {name}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        graph[name] = _imports(path, name)
    return graph


def test_no_module_imports_itself_back_through_others() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            # a package's __init__ importing its own submodules is the usual layout
            if state.get(nxt) == 1 and not node.startswith(nxt + "."):
                cycles.append([*trail[trail.index(nxt) :], nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_library_does_not_import_the_experiment_tooling() -> None:
    graph = _graph()
    offenders = {
        module: sorted(i for i in imports if i.startswith("sparselearn.experiments"))
        for module, imports in graph.items()
        if not module.startswith("sparselearn.experiments") and module not in SHIMS | ENTRY
    }
    assert {m: i for m, i in offenders.items() if i} == {}
    # and the data layer stands on its own
    data = {m: i for m, i in graph.items() if m.startswith("sparselearn.data")}
    assert all(
        i.startswith(("sparselearn.data", "sparselearn._registry", "sparselearn._io"))
        for imports in data.values()
        for i in imports
    ), data


def test_the_graph_sees_the_imports_it_checks() -> None:
    graph = _graph()
    assert "sparselearn.engine.update" in graph["sparselearn.engine.engine"]
    assert "sparselearn.data.base" in graph["sparselearn.data.imagenet"]
    assert "sparselearn.experiments.cli" in graph["sparselearn.cli"]
    assert "sparselearn.engine.update" not in graph["sparselearn.schedules.base"]  # TYPE_CHECKING
