"""The wheel is one `membrane` package: every product folder under membrane/, BPF sources and examples as data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = out.glob("membrane-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def test_wheel_installs_one_top_level_package(wheel_names: list[str]) -> None:
    """Nothing lands in site-packages beside membrane/ and its dist-info (no bare proxy/, parsers/, ...)."""
    tops = {name.split("/")[0] for name in wheel_names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"membrane"}


@pytest.mark.parametrize("path", [
    "membrane/bpf/tc_steer.bpf.c",
    "membrane/bpf/sockops_sockmap.bpf.c",
    "membrane/examples/endpoints.yaml",
    "membrane/examples/policies/http.yaml",
    "membrane/cli/main.py",
    "membrane/control/agent.py",
    "membrane/parsers/py.typed",
])
def test_wheel_ships_code_and_data(wheel_names: list[str], path: str) -> None:
    """Programs are compiled from the installed C sources and the demo reads the installed examples."""
    assert path in wheel_names


def test_wheel_declares_the_membrane_command(wheel_names: list[str]) -> None:
    """The console script `membrane` points at membrane.cli.main:main."""
    assert "membrane" in _console_scripts()


def _console_scripts() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.value.startswith("membrane.")}


def test_the_membrane_command_targets_the_cli() -> None:
    """`membrane` runs membrane.cli.main:main, and the module exists under that name."""
    assert _console_scripts()["membrane"] == "membrane.cli.main:main"
