"""The house stays walkable: commands on top, a layered library below, no import circle (docs/code-map.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import mcn

ROOT = Path(mcn.__file__).parent
# the commands (`python -m mcn.X`) and their one-line-error helpers: nothing in the library imports them
COMMANDS = {
    f"mcn.{name}"
    for name in (
        "train",
        "experts",
        "pipeline",
        "evaluate",
        "components",
        "robustness",
        "sweep",
        "tune",
        "tune_worker",
        "predict",
        "export",
    )
}
COMMAND_HELPERS = {"mcn.cli", "mcn.configs"}
# the library's layers, lowest first: a module imports its own layer and those below, never one above
LAYERS = [
    {"mcn", "mcn.errors", "mcn.distributed", "mcn.schema", "mcn.shell", "mcn.terminal"},
    {"mcn.files"},
    {"mcn.data", "mcn.models"},
    {"mcn.training"},
    {"mcn.evaluation"},
    {"mcn.inference"},
    {"mcn.recipes", "mcn.cluster"},
    {"mcn.search"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(path: Path) -> set[str]:
    """Every mcn module `path` imports when it runs (inside functions too; not under `if TYPE_CHECKING`), with the
    packages each import runs on the way (importing a.b.c runs a/b/__init__.py), less its own packages."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mcn"):
            found.add(node.module)
            found |= {
                f"{node.module}.{a.name}"
                for a in node.names
                if (ROOT.parent / node.module.replace(".", "/") / f"{a.name}.py").exists()
                or (ROOT.parent / node.module.replace(".", "/") / a.name).is_dir()
            }
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mcn")}
    with_parents = set()
    for name in found:
        parts = name.split(".")
        with_parents |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    own = module_name(path).split(".")
    ancestors = {".".join(own[:i]) for i in range(1, len(own) + 1)}  # already running when this module runs
    return with_parents - ancestors


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(ROOT.rglob("*.py"))}


def layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names if n != "mcn") or module in names:
            return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS (and to docs/code-map.md)")


def test_no_library_module_imports_a_command():
    offenders = [
        f"{m} imports {d}"
        for m, deps in graph().items()
        if m not in COMMANDS | COMMAND_HELPERS
        for d in deps & (COMMANDS | COMMAND_HELPERS)
    ]
    assert offenders == []


# `mcn.load`, the public entry point, imports mcn.inference when first called (inside the function): the one import
# upward, so that `import mcn` stays light
PUBLIC_API = {("mcn", "mcn.inference"), ("mcn", "mcn.inference.model")}


def test_every_library_module_imports_only_its_layer_and_below():
    g = graph()
    library = [m for m in g if m not in COMMANDS | COMMAND_HELPERS]
    upward = [f"{m} imports {d}" for m in library for d in g[m] if layer(d) > layer(m) and (m, d) not in PUBLIC_API]
    assert upward == []


def test_there_is_no_import_circle():
    g = graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for dep in sorted(g.get(module, ())):
            if dep not in g:
                continue
            if state.get(dep) == "open":
                return [*path, module, dep]
            if dep not in state and (circle := visit(dep, [*path, module])):
                return circle
        state[module] = "closed"
        return None

    circles = [c for m in sorted(g) if m not in state and (c := visit(m, []))]
    assert circles == []


def test_the_graph_sees_real_imports():
    """The checks above read the source: make sure they see what they check (an import inside a function too)."""
    g = graph()
    assert "mcn.recipes.fusion" in g["mcn.train"]
    assert "mcn.training.loop" in g["mcn.recipes.fusion"]
    assert "mcn.evaluation.robustness.report" in g["mcn.evaluation.summary"]
    assert "mcn.training.runtime" not in g["mcn.data.prepare"]  # a type-only import
    assert layer("mcn.cluster.jobs") > layer("mcn.files.layout")
