"""The CNI installer (deploy/cni/install.py) and the host launcher (deploy/cni/launcher.sh), on
temporary directories laid out like a node's /opt/cni/bin and /etc/cni/net.d."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipapp
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.util import ROOT, load_script

inst = load_script("deploy/cni/install.py")
LAUNCHER = ROOT / "deploy" / "cni" / "launcher.sh"

PTP = {
    "cniVersion": "1.0.0",
    "name": "pods",
    "plugins": [
        {"type": "ptp", "ipMasq": False, "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]]}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}
BRIDGE_CONF = {"cniVersion": "0.4.0", "name": "br", "type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.244.1.0/24"}}


@pytest.fixture
def node(tmp_path: Path) -> dict[str, Path]:
    """A node's CNI dirs plus an image source dir holding the launcher and a stand-in zipapp."""
    src = tmp_path / "image"
    src.mkdir()
    (src / "launcher.sh").write_bytes(LAUNCHER.read_bytes())
    _echo_zipapp(src / "membrane-cni.pyz")
    dirs = {"src": src, "bin": tmp_path / "opt-cni-bin", "conf": tmp_path / "etc-cni-net.d"}
    dirs["conf"].mkdir()
    return dirs


def _echo_zipapp(target: Path) -> None:
    """A zipapp that answers with what it got: argv, stdin, and the CNI_* environment."""
    d = target.parent / "echo_src"
    d.mkdir()
    (d / "__main__.py").write_text(
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'stdin': sys.stdin.read(),"
        " 'env': {k: v for k, v in os.environ.items() if k.startswith('CNI_')}}))\n"
    )
    zipapp.create_archive(d, target)


def _write(path: Path, conf: dict[str, Any]) -> None:
    path.write_text(json.dumps(conf, indent=2))


def test_install_appends_membrane_cni_last_and_keeps_the_chain(node: dict[str, Path]) -> None:
    """install: the active conflist ends with {"type": "membrane-cni"}; every other plugin is unchanged."""
    _write(node["conf"] / "10-ptp.conflist", PTP)
    path = inst.install(node["src"], node["bin"], node["conf"])
    assert path == node["conf"] / "10-ptp.conflist"
    conf = json.loads(path.read_text())
    assert conf["plugins"] == [*PTP["plugins"], {"type": "membrane-cni"}]
    assert conf["name"] == "pods"
    assert os.access(node["bin"] / "membrane-cni", os.X_OK)
    assert (node["bin"] / "membrane-cni.pyz").read_bytes() == (node["src"] / "membrane-cni.pyz").read_bytes()


def test_install_is_idempotent(node: dict[str, Path]) -> None:
    """A second install (agent restart) changes nothing: one entry, same bytes, no file rewritten."""
    _write(node["conf"] / "10-ptp.conflist", PTP)
    inst.install(node["src"], node["bin"], node["conf"])
    before = (node["conf"] / "10-ptp.conflist").read_bytes()
    mtime = (node["conf"] / "10-ptp.conflist").stat().st_mtime_ns
    inst.install(node["src"], node["bin"], node["conf"])
    assert (node["conf"] / "10-ptp.conflist").read_bytes() == before
    assert (node["conf"] / "10-ptp.conflist").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in node["conf"].iterdir()) == ["10-ptp.conflist"]


def test_install_moves_an_earlier_entry_to_the_end(node: dict[str, Path]) -> None:
    """A primary CNI that appended its own plugin after ours gets ours moved back to the end."""
    conf = {**PTP, "plugins": [PTP["plugins"][0], {"type": "membrane-cni"}, PTP["plugins"][1]]}
    _write(node["conf"] / "10-ptp.conflist", conf)
    inst.patch_config(node["conf"])
    types = [p["type"] for p in json.loads((node["conf"] / "10-ptp.conflist").read_text())["plugins"]]
    assert types == ["ptp", "portmap", "membrane-cni"]


def test_the_first_file_in_lexical_order_is_patched(node: dict[str, Path]) -> None:
    """The runtime uses the first config file by name; only that one is patched (or conf_file when given)."""
    _write(node["conf"] / "20-other.conflist", PTP)
    _write(node["conf"] / "05-first.conflist", PTP)
    assert inst.patch_config(node["conf"]).name == "05-first.conflist"
    assert "membrane-cni" not in (node["conf"] / "20-other.conflist").read_text()
    assert inst.patch_config(node["conf"], "20-other.conflist").name == "20-other.conflist"


def test_a_single_plugin_conf_is_wrapped_and_restored(node: dict[str, Path]) -> None:
    """A .conf cannot chain: it is wrapped in a conflist that becomes the active file; remove restores it byte for byte."""
    original = json.dumps(BRIDGE_CONF)
    (node["conf"] / "10-bridge.conf").write_text(original)
    wrapper = inst.install(node["src"], node["bin"], node["conf"])
    assert inst.active_config(node["conf"]) == wrapper
    conf = json.loads(wrapper.read_text())
    assert conf["cniVersion"] == "0.4.0"
    assert conf["name"] == "br"
    assert [p["type"] for p in conf["plugins"]] == ["bridge", "membrane-cni"]
    assert conf["plugins"][0]["bridge"] == "cni0"
    inst.remove(node["bin"], node["conf"])
    assert sorted(p.name for p in node["conf"].iterdir()) == ["10-bridge.conf"]
    assert (node["conf"] / "10-bridge.conf").read_text() == original


def test_remove_unchains_and_deletes_the_files(node: dict[str, Path]) -> None:
    """remove: the chain is the primary CNI's again and the launcher and zipapp are gone."""
    _write(node["conf"] / "10-ptp.conflist", PTP)
    inst.install(node["src"], node["bin"], node["conf"])
    inst.remove(node["bin"], node["conf"])
    assert json.loads((node["conf"] / "10-ptp.conflist").read_text())["plugins"] == PTP["plugins"]
    assert list(node["bin"].iterdir()) == []


def test_remove_when_nothing_is_installed_is_a_no_op(node: dict[str, Path]) -> None:
    """remove runs on every agent start with chaining off: with nothing installed it changes nothing."""
    _write(node["conf"] / "10-ptp.conflist", PTP)
    before = (node["conf"] / "10-ptp.conflist").read_bytes()
    assert inst.remove(node["bin"], node["conf"]) == []
    assert (node["conf"] / "10-ptp.conflist").read_bytes() == before


def test_no_configuration_yet_is_a_clear_error(node: dict[str, Path]) -> None:
    """Before the primary CNI writes its config, install fails naming the directory (the kubelet retries)."""
    with pytest.raises(inst.InstallError, match="no CNI network configuration"):
        inst.install(node["src"], node["bin"], node["conf"])


def test_a_broken_configuration_names_the_file(node: dict[str, Path]) -> None:
    """Invalid JSON or a plugin without a type fails with the file's path; nothing is written."""
    (node["conf"] / "10-bad.conflist").write_text("{not json")
    with pytest.raises(inst.InstallError, match=r"10-bad\.conflist: not a readable JSON"):
        inst.patch_config(node["conf"])
    _write(node["conf"] / "10-bad.conflist", {"cniVersion": "1.0.0", "name": "x", "plugins": [{"ipam": {}}]})
    with pytest.raises(inst.InstallError, match=r'plugins\[0\] has no string "type"'):
        inst.patch_config(node["conf"])


def test_missing_zipapp_in_the_image_fails_install(node: dict[str, Path]) -> None:
    """An image built without the membrane-cni entry point cannot install chaining, and says which file is missing."""
    _write(node["conf"] / "10-ptp.conflist", PTP)
    (node["src"] / "membrane-cni.pyz").unlink()
    with pytest.raises(inst.InstallError, match=r"membrane-cni\.pyz: missing from the image"):
        inst.install(node["src"], node["bin"], node["conf"])
    assert "membrane-cni" not in (node["conf"] / "10-ptp.conflist").read_text()


def test_command_line_exit_codes(node: dict[str, Path]) -> None:
    """The init container's command: 0 on success, 1 with the reason on stderr."""
    args = ["--bin-dir", str(node["bin"]), "--conf-dir", str(node["conf"]), "--source-dir", str(node["src"])]
    script = str(ROOT / "deploy" / "cni" / "install.py")
    failed = subprocess.run([sys.executable, script, "install", *args], capture_output=True, text=True, check=False)
    assert failed.returncode == 1
    assert "no CNI network configuration" in failed.stderr
    _write(node["conf"] / "10-ptp.conflist", PTP)
    ok = subprocess.run([sys.executable, script, "install", *args], capture_output=True, text=True, check=False)
    assert ok.returncode == 0
    assert "chained in" in ok.stdout


def _run_launcher(node: dict[str, Path], pythons: str | None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/x",
           "CNI_IFNAME": "eth0", "CNI_PATH": str(node["bin"]), "OTHER": "dropped-by-echo"}
    if pythons is not None:
        env["MEMBRANE_CNI_PYTHONS"] = pythons
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "pods", "type": "membrane-cni", "prevResult": {"ips": []}})
    return subprocess.run([str(node["bin"] / "membrane-cni")], input=stdin, capture_output=True, text=True, env=env, timeout=30, check=False)


def test_launcher_runs_the_zipapp_with_stdin_and_cni_env(node: dict[str, Path]) -> None:
    """The installed launcher runs membrane-cni.pyz with the host's python3, passing stdin and CNI_* through."""
    _write(node["conf"] / "10-ptp.conflist", PTP)
    inst.install(node["src"], node["bin"], node["conf"])
    proc = _run_launcher(node, None)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert json.loads(got["stdin"])["prevResult"] == {"ips": []}
    assert got["env"]["CNI_COMMAND"] == "ADD"
    assert got["env"]["CNI_IFNAME"] == "eth0"


def test_launcher_without_python_answers_a_cni_error(node: dict[str, Path], tmp_path: Path) -> None:
    """No usable python3 (missing, or older than 3.11): a CNI error result naming the requirement, exit 1."""
    _write(node["conf"] / "10-ptp.conflist", PTP)
    inst.install(node["src"], node["bin"], node["conf"])
    old = tmp_path / "python3-old"
    old.write_text("#!/bin/sh\nexit 1\n")  # fails the version check, as python3.9 would
    old.chmod(0o755)
    proc = _run_launcher(node, f"/nonexistent/python3 {old}")
    assert proc.returncode == 1
    err = json.loads(proc.stdout)
    assert err["code"] == 100
    assert err["msg"] == "membrane-cni needs python3 >= 3.11 on the node"
    assert "cni.chaining.enabled=false" in err["details"]
