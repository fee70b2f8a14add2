"""The package's layering, read from its source: no circle of imports (type-only imports and a
package's own ``__init__`` included), no import from a lower layer to a higher one, no module
that only re-exports another, and the mask-update algorithm blind to where a layer lives."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sparselearn"

# From the ground up; a module imports from its own layer or the ones below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("_registry", "_io", "selection", "kernels", "checkpoint")),
    ("registered parts and data", ("budget", "criteria", "schedules", "data", "structure")),
    ("configuration", ("config",)),
    ("presets and targets", ("methods", "targets")),
    ("engine", ("engine",)),
    ("speed and accounting", ("accel", "flops")),
    ("models, files, integrations", ("models", "saving", "export", "compat", "integrations")),
    ("public API", ("",)),  # sparselearn/__init__.py
    ("tooling", ("experiments", "__main__")),
]

# Within the engine, the algorithm sits above where layers live: these modules never ask
# whether a layer is sharded (placement.py and storage.py answer for them).
PLACEMENT_BLIND = (
    "sparselearn.criteria",
    "sparselearn.schedules",
    "sparselearn.engine.calendar",
    "sparselearn.engine.engine",
    "sparselearn.engine.scoring",
    "sparselearn.engine.signals",
    "sparselearn.engine.update",
)
PLACEMENT_SPECIFIC = (
    "sparselearn.engine.sharding",
    "sparselearn.selection.sharded",
    "sparselearn.selection.collectives",
)


def _module_name(path: Path) -> str:
    parts = ["sparselearn", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _imports(path: Path, name: str) -> set[str]:
    """Every sparselearn module that ``path`` imports, wherever the import statement stands
    (module level, functions, ``TYPE_CHECKING`` blocks)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
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
    return found - {name}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p, _module_name(p)) for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, (_, tops) in enumerate(LAYERS):
        if top in tops:
            return i
    raise AssertionError(f"{module} belongs to no layer: add its folder to LAYERS")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*trail[trail.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_module_imports_itself_back_through_others() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]


def test_no_import_climbs_to_a_higher_layer() -> None:
    upward = sorted(
        f"{module} ({LAYERS[_layer(module)][0]}) imports {imported} ({LAYERS[_layer(imported)][0]})"
        for module, imports in _graph().items()
        for imported in imports
        if _layer(imported) > _layer(module)
    )
    assert upward == []


def test_the_graph_sees_the_imports_it_checks() -> None:
    graph = _graph()
    assert "sparselearn.engine.update" in graph["sparselearn.engine.engine"]
    assert "sparselearn.data.base" in graph["sparselearn.data.imagenet"]
    # imports inside functions and under TYPE_CHECKING count
    assert "sparselearn.experiments.train" in graph["sparselearn.experiments.cli"]
    assert "sparselearn.targets" in graph["sparselearn.engine.storage"]
    assert _layer("sparselearn.engine.update") > _layer("sparselearn.schedules.base")


def _is_shim(path: Path) -> bool:
    """A module that holds nothing of its own: imports (and ``__all__``) only."""
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    own = [
        node
        for node in body
        if not isinstance(node, (ast.Import, ast.ImportFrom))
        and not (
            isinstance(node, (ast.Assign, ast.AnnAssign))
            and "__all__"
            in ast.unparse(node.targets[0] if isinstance(node, ast.Assign) else node.target)
        )
    ]
    return bool(body) and not own


def test_no_module_only_re_exports_another() -> None:
    shims = sorted(
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" and _is_shim(p)
    )
    assert shims == []


def test_the_shim_check_finds_one(tmp_path: Path) -> None:
    shim = tmp_path / "moved.py"
    shim.write_text('"""Moved."""\nfrom .elsewhere import thing\n\n__all__ = ["thing"]\n')
    assert _is_shim(shim)
    real = tmp_path / "real.py"
    real.write_text("from .elsewhere import thing\n\n\ndef use():\n    return thing\n")
    assert not _is_shim(real)


def _names(path: Path) -> set[str]:
    """The identifiers a module's code uses (not its strings and comments)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.arg)):
            out.add(node.name if not isinstance(node, ast.arg) else node.arg)
        elif isinstance(node, ast.alias):
            out.add(node.asname or node.name)
    return out


def test_the_algorithm_never_asks_where_a_layer_lives() -> None:
    graph = _graph()
    found = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        if not module.startswith(PLACEMENT_BLIND):
            continue
        imports = sorted(i for i in graph[module] if i.startswith(PLACEMENT_SPECIFIC))
        names = sorted(n for n in _names(path) if "shard" in n.lower() or "dtensor" in n.lower())
        if imports or names or "torch.distributed" in path.read_text():
            found[module] = (imports, names)
    assert found == {}


def test_criterion_registration_takes_no_placement_parameters() -> None:
    import inspect

    import sparselearn as sl

    for register in (sl.register_prune, sl.register_growth, sl.register_redistribution):
        params = set(inspect.signature(register).parameters)
        allowed = {"name", "needs", "scope", "elementwise", "active_only"}
        assert params <= allowed, (register.__name__, params)


def test_the_tooling_loads_a_run_s_data_in_one_place() -> None:
    # training and analysis read the same data for a run (its image size, split, mirror)
    callers = sorted(
        str(p.relative_to(PACKAGE))
        for p in (PACKAGE / "experiments").rglob("*.py")
        if "load_dataset(" in p.read_text()
    )
    assert callers == ["experiments/train.py"]


def test_the_tests_mirror_the_package() -> None:
    # the test of a feature is found where its code is: tests/<folder>/ for each package folder
    tests = PACKAGE.parents[1] / "tests"
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    test_folders = {p.parent.name for p in tests.glob("*/test_*.py")}
    assert folders == test_folders
