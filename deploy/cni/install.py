"""Install or remove the membrane-cni chained plugin on a node (the chart's `cni` init container).

`install` copies the launcher and the plugin's zipapp into the CNI bin dir and appends
{"type": "membrane-cni"} to the chain of the network configuration the runtime uses (the first
*.conf, *.conflist or *.json in the conf dir in lexical order, as containerd, CRI-O and the kubelet
pick it). A single-plugin .conf is wrapped in a conflist beside it and the original is renamed out of
the runtime's sight, so that `remove` can put it back byte for byte. Both commands are idempotent and
write every file atomically (temporary file + rename in the same directory): a runtime that reads the
directory mid-way sees the old file or the new one, never half of one.
Standard library only: it runs in the image's python3 with nothing else installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

PLUGIN_TYPE = "membrane-cni"
LAUNCHER_NAME = "membrane-cni"
ZIPAPP_NAME = "membrane-cni.pyz"
CONF_SUFFIXES = (".conf", ".conflist", ".json")
WRAPPER_SUFFIX = ".membrane.conflist"  # the conflist made around a single-plugin .conf
ORIGINAL_SUFFIX = ".membrane-orig"  # the single-plugin .conf, renamed out of the runtime's sight
DEFAULT_SOURCE_DIR = Path("/usr/local/lib/membrane")


class InstallError(Exception):
    """A condition the operator must fix (no CNI configuration yet, a broken file); names the file."""


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dump(conf: dict[str, Any]) -> bytes:
    return (json.dumps(conf, indent=2) + "\n").encode()


def _load(path: Path) -> dict[str, Any]:
    try:
        conf = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise InstallError(f"{path}: not a readable JSON CNI configuration: {e}") from e
    if not isinstance(conf, dict):
        raise InstallError(f"{path}: a CNI configuration must be a JSON object, got {type(conf).__name__}")
    return conf


def active_config(conf_dir: Path, conf_file: str | None = None) -> Path:
    """The configuration file the runtime uses.

    Returns: conf_dir/conf_file when given, else the first config file in lexical order.
    Raises:
        InstallError: there is none yet (the primary CNI has not written its configuration: the init
            container fails and the kubelet retries it), or the named file is missing.
    """
    if conf_file:
        path = conf_dir / conf_file
        if not path.is_file():
            raise InstallError(f"{path}: cni.confFile names a file that does not exist")
        return path
    found = sorted(p for p in conf_dir.iterdir() if p.is_file() and p.suffix in CONF_SUFFIXES)
    if not found:
        raise InstallError(
            f"{conf_dir}: no CNI network configuration (*.conf, *.conflist, *.json) yet; membrane-cni "
            "chains after the primary CNI, which has to write its configuration first"
        )
    return found[0]


def _with_entry(plugins: list[Any], path: Path) -> list[Any]:
    """The chain with exactly one membrane-cni entry, placed last (it must see the final prevResult)."""
    for i, p in enumerate(plugins):
        if not isinstance(p, dict) or not isinstance(p.get("type"), str):
            raise InstallError(f"{path}: plugins[{i}] has no string \"type\"")
    others = [p for p in plugins if p["type"] != PLUGIN_TYPE]
    mine = [p for p in plugins if p["type"] == PLUGIN_TYPE]
    return [*others, mine[0] if mine else {"type": PLUGIN_TYPE}]


def patch_config(conf_dir: Path, conf_file: str | None = None) -> Path:
    """Append membrane-cni to the active chain.

    Returns: the conflist the runtime now uses (the active file, or the wrapper of a single-plugin .conf).
    Raises:
        InstallError: no configuration yet, or the active one is not a valid CNI configuration.
    """
    path = active_config(conf_dir, conf_file)
    conf = _load(path)
    if path.name.endswith(WRAPPER_SUFFIX) or "plugins" in conf:
        plugins = conf.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise InstallError(f"{path}: \"plugins\" must be a non-empty list")
        chained = _with_entry(plugins, path)
        if chained != plugins:
            _write_atomic(path, _dump({**conf, "plugins": chained}), 0o644)
        return path
    if not isinstance(conf.get("type"), str):
        raise InstallError(f"{path}: a single-plugin configuration needs a string \"type\"")
    # A single-plugin .conf cannot chain: wrap it. The wrapper sorts right after the original's name,
    # and the original is renamed to a suffix no runtime reads, so the wrapper becomes the active file.
    wrapper = path.with_name(path.name + WRAPPER_SUFFIX)
    plugin = {k: v for k, v in conf.items() if k not in ("cniVersion", "name")}
    wrapped = {"cniVersion": conf.get("cniVersion", "1.0.0"), "name": conf.get("name", path.stem), "plugins": _with_entry([plugin], path)}
    _write_atomic(wrapper, _dump(wrapped), 0o644)
    os.replace(path, path.with_name(path.name + ORIGINAL_SUFFIX))
    return wrapper


def unpatch_configs(conf_dir: Path) -> list[Path]:
    """Remove membrane-cni from every configuration in conf_dir and restore wrapped .conf files.

    Returns: the files changed or restored (empty when there was nothing to undo).
    """
    changed: list[Path] = []
    if not conf_dir.is_dir():
        return changed
    for orig in sorted(conf_dir.glob("*" + ORIGINAL_SUFFIX)):
        restored = orig.with_name(orig.name[: -len(ORIGINAL_SUFFIX)])
        orig.with_name(restored.name + WRAPPER_SUFFIX).unlink(missing_ok=True)
        os.replace(orig, restored)
        changed.append(restored)
    for path in sorted(p for p in conf_dir.iterdir() if p.is_file() and p.suffix in CONF_SUFFIXES):
        try:
            conf = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue  # not ours to judge; the runtime reports it
        plugins = conf.get("plugins") if isinstance(conf, dict) else None
        if isinstance(plugins, list) and any(isinstance(p, dict) and p.get("type") == PLUGIN_TYPE for p in plugins):
            kept = [p for p in plugins if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
            _write_atomic(path, _dump({**conf, "plugins": kept}), 0o644)
            changed.append(path)
    return changed


def install(source_dir: Path, bin_dir: Path, conf_dir: Path, conf_file: str | None = None) -> Path:
    """Copy the launcher and the zipapp to bin_dir, then chain membrane-cni. Binaries go first, so the
    runtime never finds the entry without the plugin. Returns: the conflist patched.
    Raises: InstallError (missing zipapp in the image, no CNI configuration yet, broken configuration).
    """
    launcher = source_dir / "launcher.sh"
    zipapp = source_dir / ZIPAPP_NAME
    for src in (launcher, zipapp):
        if not src.is_file():
            raise InstallError(f"{src}: missing from the image, so CNI chaining cannot be installed")
    bin_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(bin_dir / ZIPAPP_NAME, zipapp.read_bytes(), 0o644)
    _write_atomic(bin_dir / LAUNCHER_NAME, launcher.read_bytes(), 0o755)
    return patch_config(conf_dir, conf_file)


def remove(bin_dir: Path, conf_dir: Path) -> list[Path]:
    """Unchain membrane-cni, then delete its files (the reverse order of install). Returns: files changed."""
    changed = unpatch_configs(conf_dir)
    for name in (LAUNCHER_NAME, ZIPAPP_NAME):
        if (bin_dir / name).exists():
            (bin_dir / name).unlink()
            changed.append(bin_dir / name)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cni_install", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("action", choices=("install", "remove"))
    parser.add_argument("--bin-dir", type=Path, required=True)
    parser.add_argument("--conf-dir", type=Path, required=True)
    parser.add_argument("--conf-file", default=None, help="the conflist to patch (default: the runtime's choice)")
    parser.add_argument("--source-dir", type=Path, default=DEFAULT_SOURCE_DIR, help="where launcher.sh and the zipapp are")
    args = parser.parse_args(argv)
    try:
        if args.action == "install":
            path = install(args.source_dir, args.bin_dir, args.conf_dir, args.conf_file)
            print(f"membrane-cni chained in {path}")
        else:
            changed = remove(args.bin_dir, args.conf_dir)
            print("membrane-cni removed from " + (", ".join(map(str, changed)) if changed else "nothing (not installed)"))
    except InstallError as e:
        print(f"cni_install: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
