# Invariant: for any bytes, load_policies() returns a LoadResult and never raises; every error is a
# PolicyError with a location (source and a line inside the text, the line of its field), every
# problem of an object is reported once; parse_endpoints() returns Endpoints or raises only
# EndpointsError; and compiling the valid policies, then looking up and evaluating a request, never
# raises (lookups, L7 evaluation of HTTP/DNS/Kafka requests, BPF entry enumeration).
"""Fuzz target for the policy loader (CNP/CCNP/NetworkPolicy YAML -> model -> compile -> evaluate)."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from membrane.parsers.events import DnsQuery, HttpRequest, KafkaRequest
    from membrane.policies import (
        EndpointsError,
        L4Proto,
        PolicyDirection,
        PolicyError,
        compile_policy,
        load_policies,
        parse_endpoints,
    )

_ENDPOINTS = parse_endpoints(
    "endpoints:\n"
    "  - {name: a, labels: {app: frontend}, ips: [10.244.0.1]}\n"
    "  - {name: b, labels: {app: backend}, ips: [10.244.0.2]}\n"
    "  - {name: c, namespace: kube-system, labels: {k8s-app: kube-dns}, ips: [10.244.0.3]}\n"
)
_REQUESTS = (
    HttpRequest(method="GET", target="/api?x=1", path="/api", query="x=1", host="a", headers=(("x-token", "t"),)),
    DnsQuery(id=1, name="www.cilium.io", normalized_name="www.cilium.io.", qtype=1),
    KafkaRequest(api_key=0, api_version=3, correlation_id=1, client_id="c", topics=("orders", "x")),
)


def check(data: bytes) -> None:
    result = load_policies(data, "fuzz.yaml")
    # Lines are counted as the loader splits documents (str.splitlines: \r, \x0b, \u2028... too).
    last_line = len(data.decode("utf-8-sig", errors="replace").splitlines()) + 1
    seen: set[tuple[object, ...]] = set()
    for err in result.errors:
        assert isinstance(err, PolicyError), type(err)
        assert err.source == "fuzz.yaml", str(err)
        assert err.line is not None, str(err)
        assert 1 <= err.line <= last_line, (err.line, last_line, str(err))
        key = (err.obj, err.path, err.message, err.line)
        assert key not in seen, str(err)
        seen.add(key)
        str(err)
    try:
        parse_endpoints(data, "eps.yaml")
    except EndpointsError as e:
        assert e.line is not None
    if not result.policies:
        return
    pmap = compile_policy(result.policies, _ENDPOINTS, {"www.cilium.io": ["192.0.2.1"]})
    peers = [pmap.endpoint_identity[k] for k in ("default/a", "default/b", "kube-system/c")] + [2, 9, pmap.ipcache.lookup("192.0.2.1")]
    for key in ("default/a", "default/b", "kube-system/c"):
        for direction in PolicyDirection:
            dp = pmap.direction(key, direction)
            for peer in peers:
                for port, proto in ((80, L4Proto.TCP), (53, L4Proto.UDP), (9092, L4Proto.TCP)):
                    v = dp.lookup(peer, port, proto)
                    if v.rules is not None:
                        for req in _REQUESTS:
                            d = v.rules.evaluate(req)
                            assert (d.reason is None) is d.allowed
    for key in ("default/a", "default/b"):
        pmap.direction(key, PolicyDirection.INGRESS).entries()


def TestOneInput(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
