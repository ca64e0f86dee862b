"""The CNI source: what a chained `membrane-cni` call tells the agent, and how a DEL survives the agent being down.

Owns the wire form of a CNI call relayed to the agent (`CniCall`), its validation, the choice of the
pod's host-side interface from the previous plugin's result, and the queue of DELs that arrived while
no agent was listening. Pure except for the queue, which is plain files in a directory.
Invariants: an ADD names exactly one host-side interface and at least one IP, or it is refused with
the CNI error code that says why; a DEL never fails because the agent is away (it is queued).
CNI spec 1.0: https://github.com/containernetworking/cni/blob/spec-v1.0.0/SPEC.md
"""

from __future__ import annotations

import enum
import ipaddress
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")


class CniCode(enum.IntEnum):
    """The CNI spec's well-known error codes (SPEC.md §"Error"); 100+ are plugin-specific."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    CONTAINER_UNKNOWN = 3
    INVALID_ENVIRONMENT = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_CONFIG = 7
    TRY_AGAIN_LATER = 11
    AGENT_REFUSED = 100  # the agent could not put the pod under policy (its message says why)


class CniError(Exception):
    """A CNI call that cannot be carried out; printed by the plugin as the spec's error object."""

    def __init__(self, code: CniCode, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str = "1.0.0") -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": int(self.code), "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


class Command(enum.Enum):
    ADD = "ADD"
    DEL = "DEL"
    CHECK = "CHECK"


@dataclass(frozen=True, slots=True, kw_only=True)
class CniCall:
    """One ADD, DEL or CHECK as the agent receives it. `pod` is "namespace/name" when the runtime said so."""

    command: Command
    container_id: str
    netns: str
    ifname: str
    pod: str | None  # from CNI_ARGS K8S_POD_NAMESPACE / K8S_POD_NAME; None outside Kubernetes
    host_interface: str | None  # the pod's host-side veth; None for a DEL without a result
    ips: tuple[str, ...]  # the pod's addresses, without prefix length

    @property
    def key(self) -> str:
        """What identifies the attachment (CNI: container ID + interface name)."""
        return f"{self.container_id}/{self.ifname}"

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "cni",
            "command": self.command.value,
            "container_id": self.container_id,
            "netns": self.netns,
            "ifname": self.ifname,
            "pod": self.pod,
            "host_interface": self.host_interface,
            "ips": list(self.ips),
        }

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> CniCall:
        """Parse what `to_wire` made. Raises CniError(DECODE_FAILURE) naming the bad field."""
        try:
            command = Command(msg.get("command"))
        except ValueError:
            raise CniError(CniCode.DECODE_FAILURE, f"command: unknown CNI command {msg.get('command')!r}") from None
        text: dict[str, str] = {}
        for name in ("container_id", "netns", "ifname"):
            value = msg.get(name)
            if not isinstance(value, str) or (name == "container_id" and not value):
                raise CniError(CniCode.DECODE_FAILURE, f"{name}: expected a non-empty string, got {value!r}")
            text[name] = value
        pod, host = msg.get("pod"), msg.get("host_interface")
        ips = msg.get("ips", [])
        if pod is not None and not isinstance(pod, str):
            raise CniError(CniCode.DECODE_FAILURE, f"pod: expected a string, got {pod!r}")
        if host is not None and not isinstance(host, str):
            raise CniError(CniCode.DECODE_FAILURE, f"host_interface: expected a string, got {host!r}")
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise CniError(CniCode.DECODE_FAILURE, f"ips: expected a list of strings, got {ips!r}")
        return cls(command=command, pod=pod, host_interface=host, ips=tuple(ips), **text)


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS: "K1=V1;K2=V2". Raises CniError(INVALID_ENVIRONMENT) on a pair without '='."""
    out: dict[str, str] = {}
    for pair in filter(None, text.split(";")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(CniCode.INVALID_ENVIRONMENT, f"CNI_ARGS: {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def pod_of(args: Mapping[str, str]) -> str | None:
    """'namespace/name' from the Kubernetes CNI_ARGS that kubelet's runtimes pass, else None."""
    name = args.get("K8S_POD_NAME")
    if not name:
        return None
    return f"{args.get('K8S_POD_NAMESPACE') or 'default'}/{name}"


def result_ips(result: Mapping[str, Any]) -> tuple[str, ...]:
    """The addresses of a CNI result's `ips` (prefix lengths dropped). Raises CniError on a malformed entry."""
    out = []
    for i, entry in enumerate(result.get("ips") or []):
        addr = entry.get("address") if isinstance(entry, Mapping) else None
        try:
            out.append(str(ipaddress.ip_interface(str(addr)).ip))
        except ValueError:
            raise CniError(CniCode.INVALID_CONFIG, f"prevResult.ips[{i}].address: not an address: {addr!r}") from None
    return tuple(out)


def host_interface(result: Mapping[str, Any], *, is_bridge: Callable[[str], bool]) -> str:
    """The pod's host-side interface in a previous result: the one outside the sandbox that is no bridge.

    ptp lists (host veth, pod eth0); bridge lists (bridge, host veth, pod eth0). Returns the name.
    Raises CniError(INVALID_CONFIG) when there is none or more than one, since the agent could not
    know which to put under policy.
    """
    interfaces = result.get("interfaces")
    if not isinstance(interfaces, list):
        raise CniError(CniCode.INVALID_CONFIG, "prevResult.interfaces: missing; membrane-cni must follow the plugin that creates the pod's veth")
    names = [
        str(i.get("name"))
        for i in interfaces
        if isinstance(i, Mapping) and i.get("name") and not i.get("sandbox")
    ]
    candidates = [n for n in names if not is_bridge(n)]
    if len(candidates) != 1:
        raise CniError(
            CniCode.INVALID_CONFIG,
            f"prevResult.interfaces: expected one host-side interface that is not a bridge, found {candidates or 'none'}",
        )
    return candidates[0]


def sysfs_is_bridge(name: str) -> bool:
    """True when `name` is a Linux bridge in this network namespace (it has /sys/class/net/NAME/bridge)."""
    return Path("/sys/class/net", name, "bridge").is_dir()


# --- DELs that arrive while no agent listens ----------------------------------------------------------


class DelQueue:
    """DEL calls kept as files until an agent takes them; one file per attachment, so a repeat DEL is idempotent."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, call: CniCall) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in call.key)
        return self.directory / f"{safe}.json"

    def put(self, call: CniCall) -> Path:
        """Queue `call` (written atomically). Raises OSError when the directory cannot be written."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(call)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(call.to_wire()))
        tmp.replace(path)
        return path

    def drain(self) -> Iterator[CniCall]:
        """Every queued DEL, oldest first; each file is removed once the caller has taken its call.

        A file that does not parse is removed too (it could never be carried out) after it is yielded
        nowhere; the caller learns about it only from the log of whoever wrote it.
        """
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                call = CniCall.from_wire(json.loads(path.read_text()))
            except (OSError, ValueError, CniError):
                path.unlink(missing_ok=True)
                continue
            yield call
            path.unlink(missing_ok=True)
