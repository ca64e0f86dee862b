"""deploy/cni/make_zipapp.py: the plugin's zipapp is built from the `membrane-cni` console script of an
installed distribution and runs on a bare python3 (no venv, no site-packages), namespace package included.
A stand-in distribution is used: the real entry point comes with the CNI plugin."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.util import load_script

mz = load_script("deploy/cni/make_zipapp.py")


@pytest.fixture
def fake_dist(tmp_path: Path) -> Iterator[str]:
    """An installed distribution `mbrfake` with a namespace package `mbrns` (no __init__.py, like
    membrane) whose console script `membrane-cni` answers with its stdin and CNI_COMMAND."""
    site = tmp_path / "site"
    (site / "mbrns" / "control").mkdir(parents=True)
    (site / "mbrns" / "control" / "__init__.py").write_text("")
    (site / "mbrns" / "control" / "cniplugin.py").write_text(
        "import json, os, sys\n"
        "from mbrns.control import helper\n"
        "def main() -> int:\n"
        "    print(json.dumps({'stdin': sys.stdin.read(), 'cmd': os.environ.get('CNI_COMMAND'), 'helper': helper.NAME}))\n"
        "    return 0\n"
    )
    (site / "mbrns" / "control" / "helper.py").write_text("NAME = 'from-the-zip'\n")
    info = site / "mbrfake-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mbrfake\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[console_scripts]\nmembrane-cni = mbrns.control.cniplugin:main\n")
    files = ["mbrns/control/__init__.py", "mbrns/control/cniplugin.py", "mbrns/control/helper.py",
             "mbrfake-0.1.dist-info/METADATA", "mbrfake-0.1.dist-info/entry_points.txt", "mbrfake-0.1.dist-info/RECORD"]
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))
    sys.path.insert(0, str(site))
    try:
        yield "mbrfake"
    finally:
        sys.path.remove(str(site))


def test_zipapp_runs_the_entry_point_on_a_bare_python(fake_dist: str, tmp_path: Path) -> None:
    """The archive holds the package's modules and a __main__ calling the entry point; `python3 -I -S`
    (isolated, no site-packages) runs it with stdin and the CNI environment."""
    target = tmp_path / "membrane-cni.pyz"
    assert mz.build(target, dist=fake_dist, package="mbrns") is True
    proc = subprocess.run([sys.executable, "-I", "-S", str(target)], input='{"cniVersion": "1.0.0"}', capture_output=True,
                          text=True, env={"CNI_COMMAND": "CHECK"}, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"stdin": '{"cniVersion": "1.0.0"}', "cmd": "CHECK", "helper": "from-the-zip"}


def test_no_entry_point_builds_nothing(tmp_path: Path) -> None:
    """A distribution without the console script: build() writes nothing and main() exits 3 (the image
    build goes on without chaining)."""
    assert mz.entry_point("pytest") is None
    assert mz.build(tmp_path / "x.pyz", dist="pytest") is False
    assert not (tmp_path / "x.pyz").exists()
