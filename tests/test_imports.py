"""The layers of DESIGN.md, kept in CI: which tensorcom folders each folder may import, no import cycle, no
``from tensorcom import Name`` inside the package, and no zmq or torch where numpy-only users load modules.

Every import is read with ``ast`` from every module of tensorcom/, servers/ and tools/: at module level, inside
functions, and under ``if TYPE_CHECKING:`` (a dependency for the type checker is a dependency of the layer).
``from tensorcom import codec`` means the module tensorcom.codec; ``from tensorcom.x import Name`` means tensorcom.x
(and tensorcom.x.Name too when that is a module).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path

import pytest

import tensorcom.pipeline

ROOT = Path(__file__).parent.parent
SOURCES = {
    "tensorcom": ROOT / "tensorcom",
    "tensorcom_servers": ROOT / "servers",
    "tensorcom_tools": ROOT / "tools",
}

# Imports that break the rules below today, as (importing module, imported module): each is allowed here until it
# is gone, and then test_known_violations_still_occur fails until its entry is deleted. The goal is an empty set.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()

# -- the table: which tensorcom folders each folder may import (its own folder always) -------------------------------

BOTTOM = frozenset({"errors", "codec", "urls", "protocol", "convert", "_lazy"})
INIT = "tensorcom/__init__.py"
EVERYTHING = BOTTOM | {
    "pipeline",
    "datasets",
    "monitoring",
    "_net",
    "client",
    "server",
    "loader",
    "adapters",
    "cli",
    "examples",
    "tenbin",
    "zcom",
    INIT,
}
MAY_IMPORT: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    **{name: BOTTOM for name in sorted(BOTTOM - {"errors"})},
    "pipeline": BOTTOM,
    "datasets": BOTTOM | {"pipeline"},
    "monitoring": BOTTOM | {"datasets"},  # the ImageNet mean and std, to show normalised images
    "_net": BOTTOM,
    "client": BOTTOM | {"_net"},
    "server": BOTTOM | {"_net"},
    "loader": BOTTOM | {"pipeline", "_net", "client", "server", "adapters"},  # adapters.device for to_device
    "adapters": BOTTOM | {"client", "datasets"},  # the ImageNet mean and std for normalize_images
    "tenbin": BOTTOM,  # tensorcom 0.1's tenbin over the codec
    "zcom": BOTTOM
    | {"tenbin", "_net", "client", "server"},  # tensorcom 0.1's zcom over our client and server
    "cli": EVERYTHING - {"examples"},
    "examples": EVERYTHING,
    INIT: EVERYTHING,  # it re-exports lazily
    "servers/": EVERYTHING,  # programs
    "tools/": EVERYTHING,
}
NUMPY_ONLY = BOTTOM | {
    "tenbin",
    "pipeline",
    "datasets",
    "monitoring",
}  # neither zmq nor torch at module level
HEAVY = ("zmq", "torch")


# -- reading the imports --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One import statement's meaning: ``module`` imports ``target`` (a dotted name) at ``path:line``."""

    module: str
    target: str
    path: str
    line: int
    where: str  # "module level", "in a function" or "if TYPE_CHECKING"
    names: tuple[str, ...] = ()  # for ``from tensorcom import ...``: the names that are not modules


def module_name(package: str, path: Path) -> str:
    parts = path.relative_to(SOURCES[package]).with_suffix("").parts
    return ".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])


@cache
def modules() -> dict[str, Path]:
    """Every module of tensorcom/, servers/ and tools/ by its installed name (servers/ is tensorcom_servers)."""
    return {
        module_name(package, path): path
        for package, folder in SOURCES.items()
        for path in sorted(folder.rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _found_imports(nodes: Iterable[ast.AST], where: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement among ``nodes`` and below, with where it runs: at module level (class bodies and
    try blocks included), in a function, or only for the type checker."""
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, where
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _found_imports(ast.iter_child_nodes(node), "in a function")
        elif isinstance(node, ast.If) and _is_type_checking(node):
            yield from _found_imports(node.body, "if TYPE_CHECKING")
            yield from _found_imports(node.orelse, where)
        else:
            yield from _found_imports(ast.iter_child_nodes(node), where)


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(module: str) -> list[Import]:
    """What ``module`` imports, one entry per imported module."""
    path = modules()[module]
    shown = str(path.relative_to(ROOT))
    found = []
    for node, where in _found_imports(ast.parse(path.read_text(), shown).body, "module level"):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, shown, node.lineno, where) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, path, node)
            submodules = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules()]
            others = tuple(a.name for a in node.names if f"{source}.{a.name}" not in modules())
            if others or not submodules:
                found.append(Import(module, source, shown, node.lineno, where, others))
            found += [Import(module, target, shown, node.lineno, where) for target in submodules]
    return found


def all_imports() -> list[Import]:
    return [found for module in modules() for found in imports_of(module)]


def row_of(module: str) -> str | None:
    """The table row of one of our modules (None for another distribution's module)."""
    package, _, rest = module.partition(".")
    if package == "tensorcom_servers":
        return "servers/"
    if package == "tensorcom_tools":
        return "tools/"
    if package != "tensorcom":
        return None
    return rest.split(".")[0] if rest else INIT


def describe(found: Import) -> str:
    return f"{found.path}:{found.line} ({found.where}): {found.module} imports {found.target}"


# -- the rules ------------------------------------------------------------------------------------------------------


def test_every_module_has_a_row_in_the_table() -> None:
    """A new folder or top-level module of tensorcom/ is placed in the layers (a row of MAY_IMPORT) before use."""
    missing = sorted(
        {f"{row} ({module})" for module in modules() if (row := row_of(module)) not in MAY_IMPORT}
    )
    assert missing == [], f"no row in MAY_IMPORT for: {missing}"


def layer_violations() -> dict[tuple[str, str], str]:
    """Imports of a tensorcom folder that the importer's row does not allow, by (module, target)."""
    found: dict[tuple[str, str], str] = {}
    for each in all_imports():
        row, target_row = row_of(each.module), row_of(each.target)
        if row is None or target_row is None or target_row in ("servers/", "tools/"):
            continue
        allowed = MAY_IMPORT.get(row, frozenset())
        if target_row != row and target_row not in allowed:
            rule = ", ".join(sorted(allowed)) or "no tensorcom folder"
            found.setdefault(
                (each.module, each.target),
                f"{describe(each)} (folder {target_row!r}); the row {row!r} may import only: {rule}",
            )
    return found


def test_each_folder_imports_only_the_folders_its_row_allows() -> None:
    """Lower layers never import higher ones: every import of a tensorcom module is allowed by the importer's row."""
    found = {edge: why for edge, why in layer_violations().items() if edge not in KNOWN_VIOLATIONS}
    assert not found, "imports across the layers:\n" + "\n".join(sorted(found.values()))


def test_the_package_never_imports_the_programs() -> None:
    """servers/ and tools/ are programs on top of the package: no module of tensorcom/ imports them."""
    found = [
        describe(each)
        for each in all_imports()
        if row_of(each.module) not in (None, "servers/", "tools/")
        and row_of(each.target) in ("servers/", "tools/")
    ]
    assert found == []


def _components(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components that hold a cycle (Tarjan's algorithm; the graph is small)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(edges.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per component that has one, as a path that returns to its start."""
    return [_path_around(component, edges) for component in _components(edges)]


def _path_around(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth first inside the component)."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(edges.get(node, set()) & members):
                if successor == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start]
                if successor not in came_from:
                    came_from[successor] = node
                    following.append(successor)
        frontier = following
    return component


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports. A submodule's implicit import of its own parent packages is not an
    edge (only what a statement names is); ``package/__init__.py -> package.sub`` is an ordinary edge."""
    edges: dict[str, set[str]] = {}
    for each in all_imports():
        if each.module.startswith("tensorcom.") or each.module == "tensorcom":
            if each.target in modules() and row_of(each.target) not in ("servers/", "tools/"):
                edges.setdefault(each.module, set()).add(each.target)
    return edges


def test_no_import_cycle_among_package_modules() -> None:
    """No chain of imports inside tensorcom/ leads back to where it started."""
    edges = import_graph()
    for module, target in KNOWN_VIOLATIONS:
        edges.get(module, set()).discard(target)
    cycles = _cycles(edges)
    lines = {(each.module, each.target): f"{each.path}:{each.line}, {each.where}" for each in all_imports()}
    shown = [
        " -> ".join([cycle[0], *(f"{b} ({lines[a, b]})" for a, b in pairwise(cycle))]) for cycle in cycles
    ]
    assert cycles == [], "import cycles:\n" + "\n".join(shown)


def test_package_modules_never_import_names_through_tensorcom_init() -> None:
    """Inside tensorcom/, ``from tensorcom import X`` names only modules: a class or function would load it
    through tensorcom/__init__.py (its lazy re-exports), which is for users."""
    found = [
        f"{describe(each)}: {', '.join(each.names)} (import it from its own module)"
        for each in all_imports()
        if row_of(each.module) not in (None, "servers/", "tools/")
        and each.target == "tensorcom"
        and each.names
    ]
    assert found == []


def on_a_cycle(edges: dict[str, set[str]], module: str, target: str) -> bool:
    return target in edges.get(module, set()) and any(
        module in component and target in component for component in _components(edges)
    )


def test_known_violations_still_occur() -> None:
    """Each entry of KNOWN_VIOLATIONS is an import that still breaks a rule; once it does not, it is deleted."""
    edges, layered = import_graph(), layer_violations()
    stale = [
        f"{module} -> {target}"
        for module, target in sorted(KNOWN_VIOLATIONS)
        if (module, target) not in layered and not on_a_cycle(edges, module, target)
    ]
    assert stale == [], f"no longer a violation, delete from KNOWN_VIOLATIONS: {stale}"


# -- no zmq or torch for numpy-only users -----------------------------------------------------------------------------


def numpy_only_modules() -> list[str]:
    return sorted(module for module in modules() if row_of(module) in NUMPY_ONLY)


@pytest.mark.parametrize("heavy", HEAVY)
def test_numpy_only_modules_import_neither_zmq_nor_torch_at_module_level(heavy: str) -> None:
    """codec, urls, protocol, errors, convert and every module of pipeline, datasets and monitoring: no zmq or torch
    import at module level (they may import it inside the function that needs it)."""
    found = [
        describe(each)
        for module in numpy_only_modules()
        for each in imports_of(module)
        if each.where == "module level" and each.target.split(".")[0] == heavy
    ]
    assert found == []


def _loaded_after_import(modules_to_import: list[str]) -> dict[str, list[str]]:
    """Import each module in turn in a fresh interpreter; which of HEAVY each one added to sys.modules."""
    code = (
        "import importlib, json, sys\n"
        f"heavy, found = {list(HEAVY)!r}, {{}}\n"
        f"for name in {modules_to_import!r}:\n"
        "    before = {m for m in heavy if m in sys.modules}\n"
        "    importlib.import_module(name)\n"
        "    found[name] = sorted(m for m in heavy if m in sys.modules and m not in before)\n"
        "print(json.dumps(found))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return {name: added for name, added in json.loads(out.stdout).items() if added}


def test_importing_numpy_only_modules_loads_neither_zmq_nor_torch() -> None:
    """In a fresh interpreter, importing tensorcom and every numpy-only module loads no zmq and no torch (checked
    with sys.modules, so indirect imports count too)."""
    everything = ["tensorcom", *numpy_only_modules()]
    found = _loaded_after_import(everything)
    if found:  # one interpreter per module, to name every culprit and not just the first that loaded it
        found = {name: added for name in everything for added in _loaded_after_import([name]).values()}
    assert found == {}


def test_public_api_of_pipeline_is_sorted_and_complete() -> None:
    """tensorcom.pipeline's __all__ is sorted and every name in it exists."""
    names = tensorcom.pipeline.__all__
    assert names == sorted(names)
    assert all(hasattr(tensorcom.pipeline, n) for n in names)
