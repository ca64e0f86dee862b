"""The folder rules: every product folder installs as `membrane.<folder>` and imports only point one way.

    parsers, bpf        -> nothing of ours
    policies            -> membrane.parsers.events / errors / names (types and name tables only)
    proxy               -> policies, parsers (the data plane; never the kernel, never the control plane)
    control             -> proxy, policies, parsers, bpf (sources -> state -> plan -> kernel and proxy)
    cli                 -> everything of the product; sandbox only for the commands that run it
    sandbox             -> everything of the product (demos and local clusters are built on it)
    nothing of ours     -> tests (product code never depends on test code)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("proxy", "parsers", "policies", "bpf", "control", "cli", "sandbox")
ALLOWED: dict[str, set[str]] = {
    "parsers": {"parsers"},
    "bpf": {"bpf"},
    "policies": {"policies", "parsers.events", "parsers.errors", "parsers.names"},
    "proxy": {"proxy", "policies", "parsers"},
    "control": {"control", "proxy", "policies", "parsers", "bpf"},
    "cli": {"cli", "control", "proxy", "policies", "parsers", "bpf", "sandbox", "examples"},
    "sandbox": {"sandbox", "cli", "control", "proxy", "policies", "parsers", "bpf", "examples"},
}
# parsers/ never touches I/O or clocks.
FORBIDDEN_IN_PARSERS = {"asyncio", "socket", "uvloop", "time", "logging", "selectors"}
# The old top-level names: importing one of them means code that works only from the repo's root.
OLD_TOP_LEVEL = {*PRODUCT, "tests", "bench", "fuzz"}


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
    return sorted(p for pkg in PRODUCT for p in (ROOT / pkg).rglob("*.py"))


def _inside(name: str, allowed: set[str]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path: Path) -> None:
    """A product module imports only `membrane.<folder>` packages its layer may depend on (STYLE.md §1)."""
    package = path.relative_to(ROOT).parts[0]
    for name in _imports(path):
        top = name.split(".")[0]
        assert top not in OLD_TOP_LEVEL, f"{path}: imports {name}; product code says membrane.<folder> and never imports tests"
        if top != "membrane":
            if package == "parsers":
                assert top not in FORBIDDEN_IN_PARSERS, f"{path}: parsers must not import {name}"
            continue
        inner = name.split(".", 1)[1] if "." in name else ""
        assert _inside(inner, ALLOWED[package]), f"{path}: {package} must not import {name}"


def test_every_product_folder_is_a_membrane_subpackage() -> None:
    """The package mapping names each product folder once, as membrane.<folder>."""
    import tomllib

    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in PRODUCT:
        assert mapping.get(f"membrane.{folder}") == folder


@pytest.mark.parametrize("folder", ["tests", "bench", "fuzz"])
def test_tools_import_the_product_by_its_installed_name(folder: str) -> None:
    """Tests, benchmarks and fuzz targets import `membrane.*`, never a product folder by its bare name."""
    for path in sorted((ROOT / folder).rglob("*.py")):
        if "corpus" in path.parts:
            continue
        for name in _imports(path):
            assert name.split(".")[0] not in PRODUCT, f"{path}: imports {name}; say membrane.{name}"


def test_every_product_package_is_installed() -> None:
    """Each folder with an __init__.py under a product folder is listed in pyproject's packages (or the wheel misses it)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for folder in PRODUCT:
        for init in (ROOT / folder).rglob("__init__.py"):
            name = ".".join(("membrane", *init.parent.relative_to(ROOT).parts))
            assert name in listed, f"{init.parent} is not in [tool.setuptools] packages"
