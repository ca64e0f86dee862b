"""Compiles the modules named in native/modules.txt with mypyc, beside the editable install's `.py` links.

Run by `make setup` after the editable install (`.venv/bin/python native/build.py`). The editable
install is strict: build/__editable__.membrane-*/membrane/<folder>/<file>.py are links to the sources,
and that folder is on sys.path through a .pth file. mypyc compiles the listed modules from there (so
they get their `membrane.` names) into one C library, `membrane_native__mypyc`, plus one small
extension per module; both are copied into that tree, where the path finder prefers an extension to a
`.py` of the same name. Generated C and objects stay in build/native/, outside the tree that a
reinstall removes, so unchanged C is not compiled again.

It also installs `_membrane_native.py` and a `.pth` line into site-packages: at interpreter start they
make `membrane.*` load from the sources instead when MEMBRANE_PURE is set (to anything but "" or "0")
or when a compiled module's source changed after this build (see that file). The stamp,
build/native/stamp.json, records each compiled source's size and mtime.

`native/build.py --pure` removes the compiled modules and the stamp (nothing is compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES_FILE = ROOT / "native" / "modules.txt"
HOOK = ROOT / "native" / "_membrane_native.py"
WORK = ROOT / "build" / "native"
STAMP = WORK / "stamp.json"
GROUP = "membrane_native"


def listed_sources() -> list[str]:
    """The source paths of modules.txt, relative to the repository root, in order."""
    out = []
    for line in MODULES_FILE.read_text(encoding="utf-8").splitlines():
        path = line.split("#", 1)[0].strip()
        if path:
            if not (ROOT / path).is_file() or not path.endswith(".py"):
                raise SystemExit(f"native/modules.txt: {path} is not a .py file of this repository")
            out.append(path)
    return out


def editable_tree() -> Path:
    trees = sorted((ROOT / "build").glob("__editable__.membrane-*"))
    if len(trees) != 1:
        raise SystemExit(f"expected one build/__editable__.membrane-* tree (run `make setup`), found {len(trees)}")
    return trees[0]


def remove_compiled(tree: Path) -> int:
    """Deletes every extension module in the editable tree (compiled by an earlier run); returns how many."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    found = [*tree.glob(f"*{suffix}"), *tree.glob(f"membrane/**/*{suffix}")]
    for path in found:
        path.unlink()
    return len(found)


def install_hook() -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    shutil.copyfile(HOOK, site / HOOK.name)
    (site / "_membrane_native.pth").write_text(
        f"import _membrane_native; _membrane_native.install({str(STAMP)!r})\n", encoding="utf-8")


def compile_modules(tree: Path, sources: list[str]) -> None:
    # Imported here: `--pure` needs neither mypy nor a C compiler.
    from mypyc.build import mypycify
    from setuptools import setup  # type: ignore[import-untyped]

    links = []
    for src in sources:
        folder, _, rest = src.partition("/")
        link = Path("membrane") / folder / rest
        if not (tree / link).exists():
            raise SystemExit(f"{src}: no {link} in {tree} (is {folder}/ a product folder? run `make setup`)")
        links.append(str(link))
    os.chdir(tree)  # mypy names each module from its path under this folder: membrane/parsers/http1.py
    extensions = mypycify(
        ["--config-file", str(ROOT / "pyproject.toml"), "--explicit-package-bases", *links],
        opt_level="3", group_name=GROUP, target_dir=str(WORK / "c"),
    )
    setup(
        name="membrane-native", ext_modules=extensions,
        script_args=["-q", "build_ext", "--build-temp", str(WORK / "tmp"), "--build-lib", str(WORK / "lib"),
                     "--parallel", str(min(4, os.cpu_count() or 1))],
    )
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for ext in extensions:
        rel = Path(*ext.name.split(".")).with_name(ext.name.rsplit(".", 1)[-1] + suffix)
        shutil.copyfile(WORK / "lib" / rel, tree / rel)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pure", action="store_true", help="remove the compiled modules instead of building them")
    args = parser.parse_args()
    tree = editable_tree()
    STAMP.unlink(missing_ok=True)
    remove_compiled(tree)
    install_hook()
    if args.pure:
        print("native: pure Python modules only (no compiled modules installed)")
        return 0
    sources = listed_sources()
    started = time.monotonic()
    # Sizes and mtimes are read before compiling: a source edited during the build is then stale.
    stats = {str(ROOT / s): [(ROOT / s).stat().st_size, (ROOT / s).stat().st_mtime_ns] for s in sources}
    compile_modules(tree, sources)
    WORK.mkdir(parents=True, exist_ok=True)
    STAMP.write_text(json.dumps({"group": GROUP, "sources": stats}, indent=1) + "\n", encoding="utf-8")
    print(f"native: compiled {len(sources)} modules with mypyc in {time.monotonic() - started:.0f} s "
          f"(MEMBRANE_PURE=1 runs the pure ones)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
