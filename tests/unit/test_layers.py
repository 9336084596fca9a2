"""The architecture holds: a module imports only from its own layer or below (STYLE.md).

Imports are read with `ast`, so a violation fails here before it can become a cycle or drag
aiohttp or YAML into the data plane.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "proxy"

# Module (dotted, or a package prefix ending in ".") -> layer.
LAYERS: dict[str, int] = {
    "proxy.config.model": 0,  # the root; its pieces below
    "proxy.config.scalars": 0,
    "proxy.config.base": 0,
    "proxy.config.blocks": 0,
    "proxy.config.rollout": 0,
    "proxy.config.service": 0,
    "proxy.errors": 0,
    "proxy.latency_buckets": 0,
    "proxy.codec.wire": 0,
    "proxy.codec.held": 0,
    "proxy.config.loader": 1,
    "proxy.config": 1,  # the package re-exports the loader
    "proxy.metrics": 1,
    "proxy.codec.flow": 1,
    "proxy.routing.": 2,
    "proxy.upstream.": 2,
    "proxy.health": 2,
    "proxy.history": 2,  # the console's chart rings, fed from the metrics
    "proxy.http.protocol": 3,
    "proxy.http.exchange": 3,
    "proxy.http.tunnel": 3,
    "proxy.http.plane": 3,
    "proxy.http.context": 3,
    "proxy.http.response_head": 3,
    "proxy.http.linger": 3,
    "proxy.http.request_checks": 3,
    "proxy.http.request_parsing": 3,
    "proxy.http.upstream_head": 3,
    "proxy.events": 1,
    "proxy.jsonfields": 0,
    "proxy.watch": 1,
    "proxy.state": 1,
    "proxy.rollout.": 4,
    "proxy.rollout": 4,  # the package __init__ holds only its docstring
    "proxy.admin.": 4,
    "proxy.admin": 4,
    "proxy.control": 4,
    "proxy.workers.channel": 1,  # parent-worker framing and messages
    "proxy.workers.counters": 2,  # counter deltas, on the metrics
    "proxy.workers.link": 2,
    "proxy.workers.supervisor": 4,
    "proxy.workers": 0,  # the package __init__ holds only its docstring
    # Fleet mode: counts and lease are pure, store is the one Redis client, coordinator wires
    # a control plane to it; the control plane sees only proxy.fleet.backend.
    "proxy.fleet.": 4,
    "proxy.fleet": 4,  # the parent's side of worker processes (imported by admin)
    "proxy.workers.child": 5,  # a worker process's entry point
    "proxy.client": 5,
    "proxy.server": 5,
    "proxy.cli": 5,
    "proxy.demo": 5,
    "proxy.demo_fleet": 5,
    "proxy.demo_fleet_processes": 5,
    "proxy.demo_fleet_tour": 5,
    "proxy.runtime": 5,
    "proxy.__main__": 5,
    "proxy": 0,  # proxy/__init__.py holds only the version
    # These package __init__ files hold only a docstring; `from proxy.codec import wire` resolves
    # to the lowest.
    "proxy.codec": 0,
    "proxy.http": 0,
    "proxy.routing": 2,
    "proxy.upstream": 2,
}

# Third-party packages the request path must never import.
CONTROL_PLANE_ONLY = {"aiohttp", "yaml", "prometheus_client"}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    if module in LAYERS:
        return LAYERS[module]
    for prefix, layer in LAYERS.items():
        if prefix.endswith(".") and module.startswith(prefix):
            return layer
        if module.startswith(prefix + ".") and not prefix.endswith("."):
            return layer if prefix != "proxy" else None
    return None


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    missing = [module_name(p) for p in all_modules() if layer_of(module_name(p)) is None]
    assert missing == [], f"add these modules to LAYERS: {missing}"


def test_no_import_points_up() -> None:
    violations: list[str] = []
    for path in all_modules():
        importer = module_name(path)
        own = layer_of(importer)
        assert own is not None
        for imported in imports_of(path):
            if not imported.startswith("proxy"):
                continue
            theirs = layer_of(imported)
            assert theirs is not None, f"{importer} imports unknown module {imported}"
            if theirs > own:
                violations.append(f"{importer} (L{own}) imports {imported} (L{theirs})")
    assert violations == []


# The request path: these modules must never pull in aiohttp, YAML or Prometheus (health
# checks are L2 too, but they are outbound control traffic and use aiohttp by design).
REQUEST_PATH = ("proxy.http", "proxy.upstream", "proxy.routing", "proxy.metrics", "proxy.errors")


def test_request_path_never_imports_control_plane_libraries() -> None:
    violations: list[str] = []
    for path in all_modules():
        importer = module_name(path)
        if not importer.startswith(REQUEST_PATH):
            continue
        for imported in imports_of(path):
            if imported.split(".")[0] in CONTROL_PLANE_ONLY:
                violations.append(f"{importer} imports {imported}")
    assert violations == []


def module_imports(path: Path, known: set[str], root: Path) -> set[str]:
    """Every `proxy` module `path` imports, wherever the import is: at the top, under
    `TYPE_CHECKING` or inside a function. `from proxy.x import y` counts as `proxy.x.y` when that
    is a module."""
    importer = module_name(path, root)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known and name != importer}


def import_cycles(root: Path = PACKAGE) -> list[list[str]]:
    """The import graph's strongly connected components of more than one module."""
    paths = sorted(root.rglob("*.py"))
    known = {module_name(p, root) for p in paths}
    graph = {module_name(p, root): module_imports(p, known, root) for p in paths}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the graph is small
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


# Cycles still to be taken apart: none is left, and the list stays empty: a new cycle fails the
# test below.
KNOWN_CYCLES: list[list[str]] = []


def test_no_new_import_cycle() -> None:
    assert import_cycles() == KNOWN_CYCLES


def test_the_cycle_finder_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    package = tmp_path / "proxy"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from proxy import b\n")
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import X\n"
    )
    (package / "c.py").write_text("import proxy.a\n")
    assert import_cycles(package) == [["proxy.a", "proxy.b", "proxy.c"]]


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from proxy.server import Server\n")
    assert "proxy.server" in imports_of(bad)
    assert layer_of("proxy.server") == 5 > layer_of("proxy.codec.wire") == 0  # type: ignore[operator]
