"""Chooses, once per process, between Membrane's compiled (mypyc) modules and their pure Python sources.

`native/build.py` copies this file into the venv's site-packages with a `.pth` line that calls
`install(STAMP)`, so it runs at interpreter start, before anything imports `membrane`. The compiled
extension modules sit beside the `.py` links of the editable install, and Python's own path finder
prefers an extension module to a source file of the same name; this finder steps in only to load the
sources instead, when

- `MEMBRANE_PURE` is set to anything but "" or "0" (the pure modules are the reference: CI runs the
  tests on both), or
- any compiled module's source changed since the build (size or mtime differs from the stamp): the
  extensions of one build share a C library and must not be mixed with a newer source, so then every
  compiled module loads from source until `make setup` rebuilds them.

It knows nothing of the modules' contents and imports nothing of Membrane's.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from importlib.machinery import SOURCE_SUFFIXES, FileFinder, ModuleSpec, SourceFileLoader
from types import ModuleType

_STATE: dict[str, object] = {}


def is_pure_requested() -> bool:
    return os.environ.get("MEMBRANE_PURE", "") not in ("", "0")


def stale_sources(stamp: str) -> list[str]:
    """The compiled modules' sources that differ from the build recorded in `stamp` (all of them if unreadable)."""
    try:
        with open(stamp, encoding="utf-8") as f:
            built: dict[str, list[int]] = json.load(f)["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        return ["<stamp unreadable>"]
    stale = []
    for path, (size, mtime_ns) in built.items():
        try:
            st = os.stat(path)
        except OSError:
            stale.append(path)
            continue
        if st.st_size != size or st.st_mtime_ns != mtime_ns:
            stale.append(path)
    return stale


def flavour() -> str:
    """"compiled", "pure" (asked for) or "pure (stale build)": what `membrane.*` imports load in this process."""
    return str(_STATE.get("flavour", "pure"))


class _SourceFirst:
    """A meta path finder that loads `membrane.*` modules from their `.py` files, never an extension."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if not name.startswith("membrane.") or path is None or not self._active():
            return None
        for entry in path:
            spec = FileFinder(entry, (SourceFileLoader, SOURCE_SUFFIXES)).find_spec(name)
            if spec is not None and spec.loader is not None:
                return spec
        return None

    def _active(self) -> bool:
        if "flavour" not in _STATE:
            stamp = str(_STATE["stamp"])
            if is_pure_requested():
                _STATE["flavour"] = "pure"
            elif not os.path.exists(stamp):
                _STATE["flavour"] = "pure"  # nothing was compiled (or the build was removed)
            elif stale_sources(stamp):
                _STATE["flavour"] = "pure (stale build)"
            else:
                _STATE["flavour"] = "compiled"
        return _STATE["flavour"] != "compiled"


def install(stamp: str) -> None:
    if "stamp" in _STATE:
        return
    _STATE["stamp"] = stamp
    sys.meta_path.insert(0, _SourceFirst())
