"""The import direction of the code, read from the code itself (every import statement, also
those inside functions and under ``TYPE_CHECKING``, since a deferred import still couples).

The rules are those of ``docs/architecture.md``: parts import only downward, ``embedding_server``'s
sub-packages too, and no module is part of an import cycle.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("protos", "embedding_server", "trainer", "handler", "archiver", "ctrserve", "persia")
#: Each part may import the parts listed for it (besides itself).
ALLOWED = {
    "protos": set(),
    "embedding_server": {"protos"},
    "trainer": {"protos", "embedding_server"},
    "handler": {"protos", "embedding_server"},
    "archiver": {"protos", "embedding_server", "handler"},
    "ctrserve": {"protos", "embedding_server", "trainer", "handler", "archiver"},
    "persia": {"protos", "embedding_server", "trainer", "handler", "archiver", "ctrserve"},
}
#: embedding_server's layers, lowest first (its package docstring documents the same order).
LAYERS = ("storage", "core", "store", "modelroot", "rpc", "cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def source_files() -> dict[str, Path]:
    """Every module of the project's packages, benchmarks and tests, by dotted name."""
    files = {}
    for top in (*PACKAGES, "benchmarks", "tests"):
        for path in sorted((REPO / top).rglob("*.py")):
            if "_generated" not in path.parts:
                files[module_name(path)] = path
    return files


def script_dir_modules() -> dict[str, str]:
    """Modules of tests/ and benchmarks/ that a bare ``import name`` reaches from there."""
    return {
        name.split(".", 1)[1]: name
        for name in source_files()
        if top(name) in ("tests", "benchmarks") and "." in name and name.split(".", 1)[1] != "conftest"
    }


def imports_of(path: Path) -> set[str]:
    """Dotted names of the project's modules that ``path`` imports (the deepest one named)."""
    known = source_files()
    SCRIPT_DIR_MODULES = script_dir_modules()  # noqa: N806
    here = module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = here.split(".")[: len(here.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(package + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            if name.split(".")[0] in SCRIPT_DIR_MODULES:  # tests/ and benchmarks/ put themselves on sys.path
                name = SCRIPT_DIR_MODULES[name.split(".")[0]]
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != here:
                found.add(name)
                break
    return found


@cache
def graph() -> dict[str, set[str]]:
    return {name: imports_of(path) for name, path in source_files().items()}


def top(module: str) -> str:
    return module.split(".")[0]


def layer(module: str) -> str:
    """``embedding_server.rpc.remote`` -> ``rpc``; ``embedding_server.cli`` -> ``cli``."""
    return module.split(".")[1]


def test_parts_import_only_the_parts_below_them():
    wrong = [
        f"{src} imports {dst}"
        for src, dsts in graph().items()
        if top(src) in ALLOWED
        for dst in dsts
        if top(dst) != top(src) and top(dst) not in ALLOWED[top(src)]
    ]
    assert not wrong, "\n".join(wrong)


def test_embedding_server_layers_import_only_downward():
    wrong = []
    for src, dsts in graph().items():
        if top(src) != "embedding_server" or src == "embedding_server":
            continue
        for dst in dsts:
            if top(dst) == "embedding_server" and dst != "embedding_server":
                if LAYERS.index(layer(dst)) > LAYERS.index(layer(src)):
                    wrong.append(f"{src} ({layer(src)}) imports {dst} ({layer(dst)})")
    assert not wrong, "\n".join(wrong)


def test_every_embedding_server_module_sits_in_a_documented_layer():
    modules = [m for m in source_files() if top(m) == "embedding_server" and m != "embedding_server"]
    assert {layer(m) for m in modules} == set(LAYERS)
    docstring = ast.get_docstring(ast.parse((REPO / "embedding_server" / "__init__.py").read_text()))
    positions = [docstring.index(f"``{name}``") for name in LAYERS]
    assert positions == sorted(positions), "the package docstring lists the layers in another order"


def test_no_import_cycles():
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_benchmarks_and_tests_import_no_test_modules():
    wrong = [
        f"{src} imports {dst}"
        for src, dsts in graph().items()
        if top(src) in ("benchmarks", "tests")
        for dst in dsts
        if top(dst) == "tests"
    ]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_deferred_and_aliased_imports():
    """The rules above would pass vacuously if imports were missed: check the reader itself."""
    sample = REPO / "embedding_server" / "rpc" / "remote.py"
    found = imports_of(sample)
    assert "embedding_server.modelroot.checkpoint" in found  # ``from embedding_server.modelroot import checkpoint``
    assert "embedding_server.rpc.wire" in found
    assert "protos.embedding" in found
    urls = imports_of(REPO / "embedding_server" / "storage" / "urls.py")
    assert "embedding_server.storage.remote" in urls  # imported inside open_storage
