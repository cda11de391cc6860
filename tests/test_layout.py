"""The layout says who runs the code: imports flow down, never up or sideways."""

from __future__ import annotations

import ast
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "client", "server", "simulations")
# What each top-level package may import from the project: shared is below everything, client and server
# use only shared (never each other), simulations use all three.
ALLOWED = {
    "shared": {"shared"},
    "client": {"shared", "client"},
    "server": {"shared", "server"},
    "simulations": {"shared", "client", "server", "simulations"},
}


def project_imports(path: Path) -> set[str]:
    """Top-level project packages that ``path`` imports, anywhere in the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names if name.split(".")[0] in PACKAGES}
    return found


def test_imports_flow_down_from_simulations_to_client_and_server_to_shared() -> None:
    wrong = []
    for package in PACKAGES:
        for path in sorted((PROJECT / package).rglob("*.py")):
            for imported in sorted(project_imports(path) - ALLOWED[package]):
                wrong.append(f"{path.relative_to(PROJECT)} imports {imported}")
    assert not wrong, "imports against the layout:\n" + "\n".join(wrong)
