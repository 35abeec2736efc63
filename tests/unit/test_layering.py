"""The package's layers: nothing imports upward or in a circle; commands stay apart."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ossfs_resume"

#: Lower layers first; a module may import only from its own layer or below.
LAYERS: list[set[str]] = [
    {
        "errors",
        "parts",
        "checksum",
        "durable",
        "signing",
        "progress",
        "mountopts",
        "config",
        "logs",
        "metrics",
        "transport",
    },
    {"client", "objectstore"},
    {"credentials"},
    {"cache", "shared"},
    {"engine"},
    {"reader", "prefetch", "download", "namespace"},
    {"core"},
    {"fuse_ops"},
    {"cli"},
]


def _module_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]


def _imports(path: Path) -> set[str]:
    """Top-level modules of the package that `path` imports (relative or absolute)."""
    tree = ast.parse(path.read_text())
    inside_package_dir = path.parent != PACKAGE
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                # "from . import x" / "from .x import y" / "from ..x import y" in cache/
                up = node.level - (1 if inside_package_dir else 0)
                if up > 1 or (inside_package_dir and node.level == 1):
                    continue  # within the same subpackage
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("ossfs_resume."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ossfs_resume."):
                    found.add(alias.name.split(".")[1])
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        module = _module_of(path)
        graph.setdefault(module, set()).update(_imports(path) - {module, "__init__"})
    return graph


def _layer(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if module in layer:
            return i
    raise AssertionError(f"module {module} is in no layer: add it to LAYERS")


def test_nothing_imports_upward() -> None:
    upward = [
        f"{module} -> {dep}"
        for module, deps in _graph().items()
        for dep in deps
        if dep in {m for layer in LAYERS for m in layer} | set(_graph())
        and _layer(dep) > _layer(module)
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, node, dep]))
            if state.get(dep) is None:
                visit(dep, [*trail, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_library_has_no_command_line_code() -> None:
    for path in PACKAGE.rglob("*.py"):
        if _module_of(path) == "cli":
            continue
        text = path.read_text()
        assert "import argparse" not in text, path
        assert "print(" not in text, path
