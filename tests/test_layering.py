"""Imports only point one way: proxy -> {policies, parsers, bpf}; policies -> parsers.events; parsers, bpf -> nothing of ours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("proxy", "parsers", "policies", "bpf")
ALLOWED: dict[str, set[str]] = {
    "proxy": {"proxy", "policies", "parsers", "bpf"},
    "policies": {"policies", "parsers.events", "parsers.errors"},
    "parsers": {"parsers"},
    "bpf": {"bpf"},
}
# parsers/ never touches I/O or clocks.
FORBIDDEN_IN_PARSERS = {"asyncio", "socket", "uvloop", "time", "logging", "selectors"}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules() -> list[Path]:
    return sorted(p for pkg in OURS for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path: Path) -> None:
    """A module imports only the packages its layer may depend on (STYLE.md §1)."""
    package = path.relative_to(ROOT).parts[0]
    allowed = ALLOWED[package]
    for name in _imports(path):
        top = name.split(".")[0]
        if top not in OURS:
            if package == "parsers":
                assert top not in FORBIDDEN_IN_PARSERS, f"{path}: parsers must not import {name}"
            continue
        if package == "policies" and top == "parsers":
            assert any(name == a or name.startswith(a + ".") for a in allowed if a.startswith("parsers")), (
                f"{path}: policies may import only parsers.events/errors, not {name}"
            )
            continue
        assert top in allowed, f"{path}: {package} must not import {name}"
