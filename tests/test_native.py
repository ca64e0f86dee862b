"""The two flavours of the hot path: `make setup` compiles native/modules.txt with mypyc, MEMBRANE_PURE=1 runs the sources.

`make pytest` runs the suite on the compiled modules, then the unit tests again with MEMBRANE_PURE=1
(see the Makefile): each check below runs in a fresh interpreter so it sees the flavour it asks for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXT_SUFFIX = str(sysconfig.get_config_var("EXT_SUFFIX"))


def _listed_modules() -> list[str]:
    names = []
    for line in (ROOT / "native" / "modules.txt").read_text().splitlines():
        path = line.split("#", 1)[0].strip()
        if path:
            names.append("membrane." + path.removesuffix(".py").replace("/", "."))
    return names


def _import_files(pure: str | None) -> dict[str, object]:
    """Imports every listed module in a new interpreter; returns each one's __file__ and the hook's flavour."""
    env = {k: v for k, v in os.environ.items() if k != "MEMBRANE_PURE"}
    if pure is not None:
        env["MEMBRANE_PURE"] = pure
    code = (
        "import importlib, json, sys, _membrane_native\n"
        "files = {m: importlib.import_module(m).__file__ for m in sys.argv[1:]}\n"
        "print(json.dumps({'files': files, 'flavour': _membrane_native.flavour()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *_listed_modules()], env=env, check=True,
                         capture_output=True, text=True, timeout=60)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_the_module_list_names_product_modules() -> None:
    names = _listed_modules()
    assert "membrane.parsers.http1" in names and "membrane.policies.l7" in names
    assert len(names) == len(set(names))


@pytest.mark.parametrize("pure", [None, "0", ""])
def test_setup_compiled_every_listed_module(pure: str | None) -> None:
    """Without MEMBRANE_PURE (or with "0" or ""), each listed module is the mypyc extension, not the .py."""
    result = _import_files(pure)
    assert result["flavour"] == "compiled", (
        f"flavour {result['flavour']!r}: the compiled modules are missing or older than their sources; run `make setup`")
    files = result["files"]
    assert isinstance(files, dict)
    for name, file in files.items():
        assert str(file).endswith(EXT_SUFFIX), f"{name} loaded from {file}"


def test_membrane_pure_loads_every_module_from_source() -> None:
    result = _import_files("1")
    assert result["flavour"] == "pure"
    files = result["files"]
    assert isinstance(files, dict)
    for name, file in files.items():
        assert str(file).endswith(".py"), f"{name} loaded from {file}"


def test_a_changed_source_makes_the_build_stale(tmp_path: Path) -> None:
    """The hook compares each compiled source's size and mtime with the build's stamp."""
    import _membrane_native

    src = tmp_path / "m.py"
    src.write_text("x = 1\n")
    st = src.stat()
    stamp = tmp_path / "stamp.json"
    stamp.write_text(json.dumps({"sources": {str(src): [st.st_size, st.st_mtime_ns]}}))
    assert _membrane_native.stale_sources(str(stamp)) == []
    src.write_text("x = 22\n")
    assert _membrane_native.stale_sources(str(stamp)) == [str(src)]
    src.unlink()
    assert _membrane_native.stale_sources(str(stamp)) == [str(src)]
    stamp.write_text("not json")
    assert _membrane_native.stale_sources(str(stamp)) == ["<stamp unreadable>"]
