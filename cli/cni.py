"""`membrane-cni`: the chained CNI plugin (spec 1.0) that puts a new pod under policy before it starts.

A container runtime runs it after the plugin that made the pod's veth (ptp, bridge, ...), with the
network config and that plugin's `prevResult` on stdin and `CNI_*` in the environment. It relays
the call to the node agent over its local socket and returns only when the agent has attached the
pod's programs, so the pod's first packet is already judged. It prints `prevResult` unchanged.
ADD and CHECK fail (code 11, "try again later") while no agent listens; DEL never fails for that:
it is queued and carried out by the next agent. Imports stay light: this runs once per pod.

Config keys (all optional) beside the standard ones: `agentSocket` (default
/var/run/membrane/agent.sock), `queueDir` (default /var/run/membrane/cni-queue), `timeoutSeconds`
(how long ADD waits for the agent, default 30).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from membrane.control.cni import (
    SUPPORTED_VERSIONS,
    CniCall,
    CniCode,
    CniError,
    Command,
    DelQueue,
    host_interface,
    parse_cni_args,
    pod_of,
    result_ips,
    sysfs_is_bridge,
)

DEFAULT_SOCKET = "/var/run/membrane/agent.sock"
DEFAULT_QUEUE = "/var/run/membrane/cni-queue"
DEFAULT_TIMEOUT_S = 30.0


def _env(environ: Mapping[str, str], name: str, *, required: bool = True) -> str:
    value = environ.get(name, "")
    if required and not value:
        raise CniError(CniCode.INVALID_ENVIRONMENT, f"{name} is not set")
    return value


def _config(stdin: IO[str]) -> dict[str, Any]:
    text = stdin.read()
    try:
        config = json.loads(text)
    except ValueError as e:
        raise CniError(CniCode.DECODE_FAILURE, f"network config on stdin is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise CniError(CniCode.DECODE_FAILURE, "network config on stdin is not a JSON object")
    version = config.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(CniCode.INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not one of {', '.join(SUPPORTED_VERSIONS)}")
    return config


def build_call(command: Command, config: Mapping[str, Any], environ: Mapping[str, str]) -> CniCall:
    """The agent's view of this call. Raises CniError naming the missing variable or malformed field."""
    container_id = _env(environ, "CNI_CONTAINERID")
    ifname = _env(environ, "CNI_IFNAME")
    netns = _env(environ, "CNI_NETNS", required=command is not Command.DEL)  # DEL may come after the netns is gone
    pod = pod_of(parse_cni_args(environ.get("CNI_ARGS", "")))
    prev = config.get("prevResult")
    if command is Command.DEL and not isinstance(prev, Mapping):
        return CniCall(command=command, container_id=container_id, netns=netns, ifname=ifname, pod=pod, host_interface=None, ips=())
    if not isinstance(prev, Mapping):
        raise CniError(CniCode.INVALID_CONFIG, "prevResult: missing; membrane-cni is a chained plugin and must follow the plugin that creates the pod's interface")
    return CniCall(
        command=command,
        container_id=container_id,
        netns=netns,
        ifname=ifname,
        pod=pod,
        host_interface=host_interface(prev, is_bridge=sysfs_is_bridge),
        ips=result_ips(prev),
    )


def ask_agent(call: CniCall, socket_path: str, timeout_s: float) -> None:
    """Send `call` to the agent and wait for its answer. Raises CniError: TRY_AGAIN_LATER when no agent
    listens, IO_FAILURE when it does not answer in time, the agent's own code when it refuses."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(socket_path)
            s.sendall(json.dumps(call.to_wire()).encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise CniError(CniCode.TRY_AGAIN_LATER, f"no membrane agent at {socket_path}: {e.strerror}") from None
    except TimeoutError:
        raise CniError(CniCode.IO_FAILURE, f"the membrane agent at {socket_path} did not answer in {timeout_s:g} s") from None
    except OSError as e:
        raise CniError(CniCode.IO_FAILURE, f"membrane agent at {socket_path}: {e}") from None
    try:
        reply = json.loads(answer)
    except ValueError:
        raise CniError(CniCode.IO_FAILURE, f"the membrane agent closed the connection without an answer ({len(answer)} bytes)") from None
    if not reply.get("ok"):
        code = reply.get("code", CniCode.AGENT_REFUSED)
        raise CniError(CniCode(code) if code in CniCode._value2member_map_ else CniCode.AGENT_REFUSED, str(reply.get("msg", "refused")))


def run(stdin: IO[str], stdout: IO[str], environ: Mapping[str, str]) -> int:
    """One plugin invocation. Returns the exit status; the result or the error object goes to `stdout`."""
    version = "1.0.0"
    try:
        command_text = _env(environ, "CNI_COMMAND")
        if command_text == "VERSION":
            json.dump({"cniVersion": "1.0.0", "supportedVersions": list(SUPPORTED_VERSIONS)}, stdout)
            return 0
        try:
            command = Command(command_text)
        except ValueError:
            raise CniError(CniCode.INVALID_ENVIRONMENT, f"CNI_COMMAND {command_text!r} is not ADD, DEL, CHECK or VERSION") from None
        config = _config(stdin)
        version = str(config["cniVersion"])
        call = build_call(command, config, environ)
        socket_path = str(config.get("agentSocket") or environ.get("MEMBRANE_AGENT_SOCKET") or DEFAULT_SOCKET)
        timeout_s = float(config.get("timeoutSeconds") or DEFAULT_TIMEOUT_S)
        if command is Command.DEL:
            try:
                ask_agent(call, socket_path, timeout_s)
            except CniError as e:
                if e.code not in (CniCode.TRY_AGAIN_LATER, CniCode.IO_FAILURE):
                    raise
                try:  # the agent is away: the next one carries it out (DEL must succeed, SPEC.md §DEL)
                    DelQueue(Path(str(config.get("queueDir") or DEFAULT_QUEUE))).put(call)
                except OSError as q:
                    raise CniError(CniCode.IO_FAILURE, f"agent unreachable ({e.msg}) and the DEL cannot be queued: {q}") from None
            return 0
        ask_agent(call, socket_path, timeout_s)
        result = dict(config["prevResult"])
        result["cniVersion"] = version  # prevResult passes through unchanged, in the caller's version
        json.dump(result, stdout)
        return 0
    except CniError as e:
        json.dump(e.to_json(version), stdout)
        return 1


def main() -> int:
    return run(sys.stdin, sys.stdout, os.environ)


if __name__ == "__main__":
    sys.exit(main())
