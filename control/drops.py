"""Kernel drop events as flow records: what the steering program dropped at L3/L4, in Hubble's terms.

Owns the translation of one `bpf.maps.DropEvent` into a `DropFlow` (an `L3_L4` record with Hubble's
`drop_reason_desc` and the kernel's own reason). Pure: the agent reads the events and emits the flows.
"""

from __future__ import annotations

from dataclasses import dataclass

from membrane.bpf import maps as bm
from membrane.policies import PolicyMap
from membrane.policies.compile import Peer as PolicyPeer
from membrane.proxy.flows import DROPPED, EGRESS, INGRESS, REQUEST, FlowContext, L3L4Flow
from membrane.proxy.session import wall_clock_ns
from membrane.proxy.wiring import flow_peer


# Not slots=True: an interpreted slotted dataclass cannot subclass the mypyc-compiled L3L4Flow (native/modules.txt).
@dataclass(kw_only=True)
class DropFlow(L3L4Flow):
    """A packet the kernel dropped at L3/L4: Hubble's `Type: L3_L4` record, `drop_reason_desc: POLICY_DENIED`
    (Hubble's name for a policy drop either way; the way is `traffic_direction`), the kernel's own
    reason (`ingress_denied`, `egress_denied`) in `membrane_reason`."""


# Hubble's drop_reason_desc for the kernel's reasons (flow.proto DropReason); others keep their own name.
_HUBBLE_DROP_REASON = {
    bm.DropReason.EGRESS_DENIED: "policy_denied",
    bm.DropReason.INGRESS_DENIED: "policy_denied",
    bm.DropReason.SPOOFED: "invalid_source_ip",
    bm.DropReason.FRAG_NOT_FOUND: "frag_not_found",  # Cilium's DROP_FRAG_NOT_FOUND (175)
    bm.DropReason.UNPARSEABLE: "invalid_packet_dropped",
}


def drop_flow(pmap: PolicyMap, event: bm.DropEvent) -> DropFlow:
    """The flow record of one kernel drop event."""
    src, dst = str(event.src), str(event.dst)
    sp, dp = pmap.peer_from_ip(src), pmap.peer_from_ip(dst)
    src_peer = flow_peer(pmap, PolicyPeer(event.src_identity, sp.endpoint, src), (src, event.sport))
    dst_peer = flow_peer(pmap, PolicyPeer(event.dst_identity, dp.endpoint, dst), (dst, event.dport))
    transport = {
        bm.IPPROTO_TCP: "TCP",
        bm.IPPROTO_UDP: "UDP",
        bm.IPPROTO_SCTP: "SCTP",
        bm.IPPROTO_ICMP: "ICMPv4",
        bm.IPPROTO_ICMPV6: "ICMPv6",
    }.get(event.proto, str(event.proto))
    direction = INGRESS if event.reason is bm.DropReason.INGRESS_DENIED else EGRESS
    kernel_reason = event.reason.name.lower()
    return DropFlow(
        context=FlowContext(source=src_peer, destination=dst_peer, traffic_direction=direction, transport=transport),
        verdict=DROPPED,
        l7_type=REQUEST,
        l7={},
        summary=f"{transport} {src}:{event.sport} -> {dst}:{event.dport} dropped ({kernel_reason})",
        time_ns=wall_clock_ns(),
        reason=_HUBBLE_DROP_REASON.get(event.reason, kernel_reason),
        membrane_reason=kernel_reason,
    )
