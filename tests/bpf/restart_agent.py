"""A stand-in for the agent's kernel side, for restart tests: one policy written into a pinned Steering.

`write_plan()` is what the agent does on start (identities, the whole policy, endpoints, then attach);
`python -m tests.bpf.restart_agent SPEC_JSON` runs it in a process of its own, prints "attached" and
sleeps until it is killed, as an agent would.

The policy (pods a, b, c): a may send UDP and TCP to b on ALLOWED only (egress enforced); b accepts
only from a (ingress enforced); c is an endpoint without enforcement. Anything else towards b is
denied: a -> b:DENIED (a's egress) and c -> b:ALLOWED (b's ingress). With `redirect_port`, a's TCP
to b on that port is L7 (REDIRECT to the proxy's default TCP listener).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from membrane.bpf.maps import IPPROTO_TCP, IPPROTO_UDP, Endpoint, PolicyEntry, PolicyKey, Verdict
from membrane.bpf.steer import ProxyPorts, Steering

ALLOWED, DENIED = 8080, 9090
ID_A, ID_B, ID_C = 1001, 1002, 1003
EP_A, EP_B, EP_C = 1, 2, 3


@dataclass(frozen=True, slots=True, kw_only=True)
class PodRef:
    """What the plan needs of a pod: its address and host-side veth."""

    ipv4: str
    host_if: str
    host_ifindex: int


def write_plan(st: Steering, pods: dict[str, PodRef], *, redirect_port: int = 0, with_c: bool = True) -> None:
    """Write the whole policy in the agent's never-widening order, then attach every pod's veth.

    with_c=False: c is no endpoint of this agent (no identity, no endpoint, no attachment).
    """
    m = st.maps
    for name, ident in (("a", ID_A), ("b", ID_B), ("c", ID_C)):
        if name != "c" or with_c:
            m.set_identity(f"{pods[name].ipv4}/32", ident, ifindex=pods[name].host_ifindex)
    egress = {
        PolicyKey(endpoint_id=EP_A, identity=ID_B, port=ALLOWED, proto=proto): PolicyEntry(verdict=Verdict.PASS)
        for proto in (IPPROTO_TCP, IPPROTO_UDP)
    }
    if redirect_port:
        egress[PolicyKey(endpoint_id=EP_A, identity=ID_B, port=redirect_port, proto=IPPROTO_TCP)] = PolicyEntry(
            verdict=Verdict.REDIRECT
        )
    ingress = {PolicyKey(endpoint_id=EP_B, identity=ID_A): PolicyEntry(verdict=Verdict.PASS)}
    m.set_policy(ingress=ingress, egress=egress)
    m.set_endpoint(pods["a"].host_ifindex, Endpoint(endpoint_id=EP_A, identity=ID_A, enforce_egress=True))
    m.set_endpoint(pods["b"].host_ifindex, Endpoint(endpoint_id=EP_B, identity=ID_B, enforce_ingress=True))
    if with_c:
        m.set_endpoint(pods["c"].host_ifindex, Endpoint(endpoint_id=EP_C, identity=ID_C))
    for name in ("a", "b", "c") if with_c else ("a", "b"):
        st.attach(pods[name].host_if)


def spec(pin_dir: Path, pods: dict[str, PodRef], *, redirect_port: int = 0, proxy_port: int = 0) -> str:
    """The JSON argument of `main()`."""
    return json.dumps(
        {
            "pin_dir": str(pin_dir),
            "pods": {k: {"ipv4": v.ipv4, "host_if": v.host_if, "host_ifindex": v.host_ifindex} for k, v in pods.items()},
            "redirect_port": redirect_port,
            "proxy_port": proxy_port,
        }
    )


def main() -> None:
    """Load, write the plan, attach, print "attached", sleep until killed (never closes)."""
    doc = json.loads(sys.argv[1])
    pods = {k: PodRef(**v) for k, v in doc["pods"].items()}
    st = Steering(proxy_ports=ProxyPorts(tcp4=doc["proxy_port"]), pin_dir=doc["pin_dir"]).__enter__()
    write_plan(st, pods, redirect_port=doc["redirect_port"])
    st.cleanup_stale()
    print("attached", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
