"""Policy engine benchmark (issue 2): compile time and peak memory for 1,000 policies x 10 rules over
1,000 endpoints, and per-request evaluation cost on a port with 100 HTTP rules.

Run: .venv/bin/python bench/policy_bench.py [--requests N]
Prints numbers only; never asserts (timings are not tests). Aims: compile < 2 s, evaluation < 20 us median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from membrane.parsers.events import HttpRequest
from membrane.policies import (
    L4Proto,
    PolicyDirection,
    compile_policy,
    evaluate_request,
    load_policies,
    parse_endpoints,
)

NAMESPACES = 10
APPS = 200
ENDPOINTS = 1000
POLICIES = 1000
RULES_PER_POLICY = 10


def endpoints_yaml() -> str:
    lines = ["namespaces:"]
    lines += [f"  - {{name: ns{n}, labels: {{team: t{n % 3}}}}}" for n in range(NAMESPACES)]
    lines.append("endpoints:")
    for i in range(ENDPOINTS):
        app = i % APPS
        ns = app % NAMESPACES
        ip = f"10.244.{i // 250}.{i % 250 + 1}"
        lines.append(f"  - {{name: pod{i}, namespace: ns{ns}, labels: {{app: app{app}, tier: t{i % 4}}}, ips: [{ip}]}}")
    return "\n".join(lines) + "\n"


def rule(p: int, r: int) -> str:
    """Ten rule shapes: L3-only, L4, HTTP, ranges, CIDR, entities, expressions, deny, Kafka, DNS egress."""
    peer = f"app{(p * 7 + r) % APPS}"
    port = 8000 + (p + r) % 50
    match r:
        case 0:
            return f"  - fromEndpoints: [{{matchLabels: {{app: {peer}}}}}]"
        case 1:
            return f"  - fromEndpoints: [{{matchLabels: {{app: {peer}}}}}]\n    toPorts: [{{ports: [{{port: '{port}', protocol: TCP}}]}}]"
        case 2:
            return (f"  - fromEndpoints: [{{matchLabels: {{app: {peer}}}}}]\n    toPorts: [{{ports: [{{port: '80', protocol: TCP}}], "
                    f"rules: {{http: [{{method: GET, path: '/api/v{r}/.*'}}, {{method: POST, path: '/api/items'}}]}}}}]")
        case 3:
            return f"  - fromEndpoints: [{{matchLabels: {{tier: t{p % 4}}}}}]\n    toPorts: [{{ports: [{{port: '9000', endPort: 9100, protocol: TCP}}]}}]"
        case 4:
            return f"  - fromCIDRSet: [{{cidr: 172.{p % 16 + 16}.0.0/16, except: [172.{p % 16 + 16}.1.0/24]}}]"
        case 5:
            return "  - fromEntities: [host, remote-node]"
        case 6:
            return f"  - fromEndpoints: [{{matchExpressions: [{{key: app, operator: In, values: [{peer}, app{(p + 1) % APPS}]}}]}}]"
        case 7:
            return f"  - fromEndpoints: [{{matchLabels: {{'k8s:io.cilium.k8s.namespace.labels.team': t{p % 3}}}}}]\n    toPorts: [{{ports: [{{port: '443', protocol: TCP}}]}}]"
        case 8:
            return (f"  - fromEndpoints: [{{matchLabels: {{app: {peer}}}}}]\n    toPorts: [{{ports: [{{port: '9092', protocol: TCP}}], "
                    f"rules: {{kafka: [{{role: consume, topic: topic{p}}}]}}}}]")
        case _:
            return f"  - toPorts: [{{ports: [{{port: '{port}', protocol: UDP}}]}}]"


def policies_yaml() -> str:
    docs = []
    for p in range(POLICIES):
        app = p % APPS
        ns = app % NAMESPACES
        body = "\n".join(rule(p, r) for r in range(RULES_PER_POLICY))
        docs.append(
            f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: pol{p}, namespace: ns{ns}}}\n"
            f"spec:\n  endpointSelector: {{matchLabels: {{app: app{app}}}}}\n  ingress:\n{body}\n"
        )
    return "---\n".join(docs)


def _docs(text: str) -> list[object]:
    """The same documents decoded, to re-emit them as JSON (kubectl -o json style input)."""
    return list(yaml.load_all(text, Loader=yaml.CSafeLoader))


def bench_compile() -> None:
    eps_text, pol_text = endpoints_yaml(), policies_yaml()
    t0 = time.perf_counter()
    loaded = load_policies(pol_text, "bench.yaml")
    endpoints = parse_endpoints(eps_text, "endpoints.yaml")
    t1 = time.perf_counter()
    assert not loaded.errors, loaded.errors[:3]
    tracemalloc.start()
    t2 = time.perf_counter()
    pmap = compile_policy(loaded.policies, endpoints)
    t3 = time.perf_counter()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Compile time without tracemalloc's overhead.
    t4 = time.perf_counter()
    pmap = compile_policy(loaded.policies, endpoints)
    t5 = time.perf_counter()
    enforced = sum(pmap.direction(e.key, PolicyDirection.INGRESS).enforced for e in endpoints.endpoints)
    t6 = time.perf_counter()
    first = endpoints.endpoints[0].key
    n_entries = len(pmap.direction(first, PolicyDirection.INGRESS).entries())
    t7 = time.perf_counter()
    as_json = "\n---\n".join(json.dumps(d) for d in _docs(pol_text))
    t8 = time.perf_counter()
    json_loaded = load_policies(as_json, "bench.json")
    t9 = time.perf_counter()
    assert len(json_loaded.policies) == len(loaded.policies) and not json_loaded.errors
    tracemalloc.start()
    load_policies(pol_text, "bench.yaml")
    _, load_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"policies: {len(loaded.policies)} x {RULES_PER_POLICY} rules, endpoints: {len(endpoints.endpoints)}, "
          f"identities: {len(pmap.identities)}, endpoints enforced on ingress: {enforced}")
    print(f"load (YAML + validation):       {t1 - t0:8.3f} s  (peak {load_peak / 2**20:.1f} MiB traced)")
    print(f"load (same as JSON documents):  {t9 - t8:8.3f} s")
    print(f"compile:                        {t5 - t4:8.3f} s")
    print(f"compile peak memory (traced):   {peak / 2**20:8.1f} MiB  (compile under tracemalloc: {t3 - t2:.3f} s)")
    print(f"entries() for one endpoint:     {t7 - t6:8.3f} s  ({n_entries} resolved BPF entries)")


def bench_evaluate(n: int) -> None:
    paths = "\n".join(f"              - {{method: GET, path: '/svc{i}/items/[0-9]+'}}" for i in range(100))
    pol = (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: many}\nspec:\n"
        "  endpointSelector: {matchLabels: {app: api}}\n  ingress:\n    - fromEndpoints: [{matchLabels: {app: client}}]\n"
        "      toPorts:\n        - ports: [{port: '80', protocol: TCP}]\n          rules:\n            http:\n" + paths + "\n"
    )
    eps = parse_endpoints("endpoints:\n  - {name: api, labels: {app: api}, ips: [10.244.0.1]}\n  - {name: client, labels: {app: client}, ips: [10.244.0.2]}\n")
    loaded = load_policies(pol, "many.yaml")
    assert not loaded.errors
    pmap = compile_policy(loaded.policies, eps)
    client = pmap.endpoint_identity["default/client"]
    t0 = time.perf_counter_ns()
    lookups = 2000
    for _ in range(lookups):
        pmap.direction("default/api", PolicyDirection.INGRESS)._cache.clear()
        verdict = pmap.lookup("default/api", PolicyDirection.INGRESS, client, 80, L4Proto.TCP)
    lookup_ns = (time.perf_counter_ns() - t0) / lookups
    assert verdict.rules is not None
    rules = verdict.rules

    def req(target: str, method: str = "GET") -> HttpRequest:
        path, _, query = target.partition("?")
        return HttpRequest(method=method, target=target, path=path, query=query, host="api", headers=(("user-agent", "bench"),))

    cases = {
        "first rule matches": req("/svc0/items/42"),
        "last rule matches": req("/svc99/items/42"),
        "no rule matches (path)": req("/other/items/42"),
        "no rule matches (method)": req("/svc50/items/42", "DELETE"),
    }
    print(f"\nport with 100 HTTP rules; {n} requests per case (ns per call: median / p99)")
    print(f"  L3/L4 lookup, uncached (once per connection):       {lookup_ns / 1000:7.2f} us")
    for name, r in cases.items():
        samples = []
        evaluate = rules.evaluate
        for _ in range(n):
            t = time.perf_counter_ns()
            evaluate(r)
            samples.append(time.perf_counter_ns() - t)
        samples.sort()
        med = statistics.median(samples) / 1000
        p99 = samples[int(len(samples) * 0.99)] / 1000
        print(f"  L7RuleSet.evaluate, {name:28s}  {med:7.2f} us / {p99:7.2f} us")
    samples = []
    r = cases["last rule matches"]
    for _ in range(n):
        t = time.perf_counter_ns()
        evaluate_request(None, verdict, r, dst_endpoint="default/api")
        samples.append(time.perf_counter_ns() - t)
    samples.sort()
    print(f"  evaluate_request (both sides, last rule matches)     {statistics.median(samples) / 1000:7.2f} us / {samples[int(len(samples) * 0.99)] / 1000:7.2f} us")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    bench_compile()
    bench_evaluate(args.requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
