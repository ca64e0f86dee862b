"""A container runtime's CNI side, as libcni does it: run a conflist's plugins in order for ADD and CHECK,
in reverse for DEL, each with the previous plugin's result as `prevResult`, and keep the result for DEL.

Used by the sandbox's kubelet and by the tests that execute Debian's real plugins (ptp, bridge,
host-local) followed by `membrane-cni`. Plugins are found by `type` in `cni_path`.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEBIAN_CNI_PATH = Path("/usr/lib/cni")


class CniPluginError(Exception):
    """A plugin failed; `error` is the CNI error object it printed (or one made from its stderr)."""

    def __init__(self, plugin: str, command: str, error: Mapping[str, Any]) -> None:
        super().__init__(f"{plugin} {command}: {error.get('msg', error)} (code {error.get('code')})")
        self.plugin = plugin
        self.command = command
        self.error = dict(error)


@dataclass(frozen=True, slots=True)
class NetworkList:
    """A parsed conflist: `name`, `cniVersion` and the plugin configs in chain order."""

    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]

    @classmethod
    def parse(cls, doc: Mapping[str, Any]) -> NetworkList:
        plugins = doc.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise ValueError("conflist: plugins must be a non-empty list")
        return cls(name=str(doc["name"]), cni_version=str(doc["cniVersion"]), plugins=tuple(dict(p) for p in plugins))


class CniRuntime:
    """Executes plugin chains. `cache_dir` keeps each attachment's final result for its DEL and CHECK."""

    def __init__(self, cni_path: Sequence[Path], cache_dir: Path, *, timeout_s: float = 60.0) -> None:
        self.cni_path = tuple(cni_path)
        self.cache_dir = cache_dir
        self.timeout_s = timeout_s

    def _binary(self, plugin_type: str) -> Path:
        for d in self.cni_path:
            candidate = d / plugin_type
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        raise FileNotFoundError(f"CNI plugin {plugin_type!r} not found in {':'.join(map(str, self.cni_path))}")

    def _cache(self, net: NetworkList, container_id: str, ifname: str) -> Path:
        return self.cache_dir / f"{net.name}-{container_id}-{ifname}.json"

    def _exec(self, net: NetworkList, plugin: Mapping[str, Any], command: str, env: Mapping[str, str],
              prev: Mapping[str, Any] | None) -> dict[str, Any] | None:
        conf: dict[str, Any] = {**plugin, "name": net.name, "cniVersion": net.cni_version}
        if prev is not None:
            conf["prevResult"] = prev
        binary = self._binary(str(plugin["type"]))
        proc = subprocess.run(
            [str(binary)], input=json.dumps(conf), capture_output=True, text=True, timeout=self.timeout_s,
            env={**os.environ, **env, "CNI_COMMAND": command, "CNI_PATH": ":".join(map(str, self.cni_path))},
        )
        if proc.returncode != 0:
            try:
                error = json.loads(proc.stdout)
            except ValueError:
                error = {"code": 999, "msg": (proc.stderr or proc.stdout).strip()}
            raise CniPluginError(str(plugin["type"]), command, error)
        if command == "ADD":
            result: dict[str, Any] = json.loads(proc.stdout)
            return result
        return None

    def _env(self, container_id: str, netns: str, ifname: str, args: Mapping[str, str]) -> dict[str, str]:
        # ptp and bridge reject CNI_ARGS keys they do not know unless IgnoreUnknown=1 is among them.
        cni_args = ";".join(f"{k}={v}" for k, v in {"IgnoreUnknown": "1", **args}.items())
        return {"CNI_CONTAINERID": container_id, "CNI_NETNS": netns, "CNI_IFNAME": ifname, "CNI_ARGS": cni_args}

    def add(self, net: NetworkList, container_id: str, netns: str, ifname: str = "eth0",
            args: Mapping[str, str] | None = None) -> dict[str, Any]:
        """ADD through the chain. Returns the last plugin's result. On failure, DELs what was added and raises."""
        env = self._env(container_id, netns, ifname, args or {})
        prev: dict[str, Any] | None = None
        try:
            for plugin in net.plugins:
                prev = self._exec(net, plugin, "ADD", env, prev)
        except BaseException:
            self._del_chain(net, env, prev)
            raise
        assert prev is not None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._cache(net, container_id, ifname).write_text(json.dumps(prev))
        return prev

    def check(self, net: NetworkList, container_id: str, netns: str, ifname: str = "eth0",
              args: Mapping[str, str] | None = None) -> None:
        """CHECK through the chain with the cached result. Raises CniPluginError on the first plugin that fails."""
        prev = json.loads(self._cache(net, container_id, ifname).read_text())
        env = self._env(container_id, netns, ifname, args or {})
        for plugin in net.plugins:
            self._exec(net, plugin, "CHECK", env, prev)

    def delete(self, net: NetworkList, container_id: str, netns: str, ifname: str = "eth0",
               args: Mapping[str, str] | None = None) -> None:
        """DEL through the chain in reverse. Idempotent: a second DEL finds nothing and succeeds."""
        cache = self._cache(net, container_id, ifname)
        prev = json.loads(cache.read_text()) if cache.exists() else None
        self._del_chain(net, self._env(container_id, netns, ifname, args or {}), prev)
        cache.unlink(missing_ok=True)

    def _del_chain(self, net: NetworkList, env: Mapping[str, str], prev: Mapping[str, Any] | None) -> None:
        errors: list[CniPluginError] = []
        for plugin in reversed(net.plugins):
            try:
                self._exec(net, plugin, "DEL", env, prev)
            except CniPluginError as e:  # go on: the other plugins must still release what they hold
                errors.append(e)
        if errors:
            raise errors[0]
