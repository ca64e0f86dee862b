"""Black-box acceptance: `membrane policy trace -o json` / `validate` on Cilium-documented scenarios.

Each case runs the installed CLI as a subprocess on the scenario files in `tests/policies/acceptance/`
and asserts the verdict Cilium's documentation gives for it. Doc sections are named per case:
language.rst = Documentation/security/policy/language.rst, deny.rst = .../policy/deny.rst,
kafka = Documentation/security/kafka.rst ("Securing a Kafka Cluster"), matchpattern = pkg/fqdn/matchpattern,
k8s-np = kubernetes.io "Network Policies" as Cilium translates it (pkg/k8s/network_policy.go).

| scenario dir | what it covers                                                                 |
|--------------|--------------------------------------------------------------------------------|
| policies/    | L3 labels, entities, CIDR/except, endPort, HTTP, deny, DNS + toFQDNs, Kafka    |
| scoping/     | CCNP vs CNP scoping, namespace label, namespace labels, NotIn, enableDefaultDeny |
| l7/          | headerMatches, L7 wildcarding, `http: [{}]`, `**.` patterns, port 0, gRPC      |
| edges/       | `ingress: [{}]`, `fromEndpoints: []` vs `[{}]`, CCNP `{}`, 0.0.0.0/0           |
| visibility/  | enableDefaultDeny false + DNS rules (visibility only), matchName case, toFQDNs |
| netpol/      | Kubernetes NetworkPolicy: podSelector, namespaceSelector, ipBlock, endPort    |
| mixed/       | deny vs L7 allow, both sides, egress L7 to world, service accounts, apiVersion |
| invalid/     | every validation error of issue 2, one line per object, exit 1                 |
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent / "acceptance"
MEMBRANE = ROOT / ".venv" / "bin" / "membrane"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    exe = [str(MEMBRANE)] if MEMBRANE.exists() else [sys.executable, "-m", "membrane.cli"]
    return subprocess.run([*exe, *args], capture_output=True, text=True, cwd=HERE, timeout=60)


@dataclass(frozen=True)
class Case:
    doc: str  # the Cilium doc section the expectation comes from
    scenario: str
    args: tuple[str, ...]
    verdict: str
    egress: str | None = None  # expected side verdicts (None = not asserted)
    ingress: str | None = None
    matched: str | None = None  # a `matched` string expected on the deciding side
    response: dict[str, Any] | None = None
    l7: str | None = None


def c(doc: str, scenario: str, cmd: str, verdict: str, **kw: Any) -> Case:
    return Case(doc, scenario, tuple(shlex.split(cmd)), verdict, **kw)


HQ = "--src empire/empire-hq --dst empire/kafka --dport 9092/TCP"
OUTPOST = "--src empire/empire-outpost --dst empire/kafka --dport 9092/TCP"
BACKUP = "--src empire/empire-backup --dst empire/kafka --dport 9092/TCP"
SVC = "--src default/prodclient --dst default/service --dport 80/TCP"
HM = "--src default/frontend --dst default/service --dport 80/TCP --http-method GET"
DNS = "--src default/crawler --dst kube-system/coredns --dport 53/UDP --dns-name"

CASES = [
    # --- policies/ -----------------------------------------------------------------------------
    c("language.rst Endpoints Based: role=frontend may reach role=backend", "policies",
      "--src default/frontend --dst default/backend --dport 80/TCP", "ALLOWED", ingress="ALLOWED", matched="default/l3-rule: ingress[0]"),
    c("language.rst Endpoints Based: any other pod is dropped (default deny)", "policies",
      "--src default/other --dst default/backend --dport 80/TCP", "DROPPED", ingress="DROPPED"),
    c("language.rst allow-all-to-victim: fromEndpoints [{}] is every pod of the policy's namespace", "policies",
      "--src prod/client --dst prod/api --dport 80/TCP", "ALLOWED", ingress="ALLOWED"),
    c("language.rst allow-all-to-victim: {} in a CNP does not reach other namespaces", "policies",
      "--src dev/client --dst prod/api --dport 80/TCP", "DROPPED", ingress="DROPPED"),
    c("language.rst Entities Based (world): an IP of no endpoint is world", "policies",
      "--src-ip 1.2.3.4 --dst dev/api --dport 80/TCP", "ALLOWED", ingress="ALLOWED", matched="dev/from-world: ingress[0]"),
    c("language.rst Entities Based (world): a pod is not world", "policies",
      "--src default/frontend --dst dev/api --dport 80/TCP", "DROPPED", ingress="DROPPED"),
    c("language.rst Entities Based (cluster): any pod on 8080", "policies",
      "--src dev/client --dst-ip 10.244.4.40 --dport 8080/TCP", "ALLOWED", egress="ALLOWED"),
    c("language.rst Entities Based (cluster): world is not cluster", "policies",
      "--src dev/client --dst-ip 8.8.8.8 --dport 8080/TCP", "DROPPED", egress="DROPPED"),
    c("language.rst IP/CIDR based: toCIDR 20.1.1.1/32", "policies",
      "--src default/myservice --dst-ip 20.1.1.1 --dport 443/TCP", "ALLOWED", egress="ALLOWED", matched="default/cidr-rule: egress[0]"),
    c("language.rst IP/CIDR based: 20.1.1.2 is outside every CIDR", "policies",
      "--src default/myservice --dst-ip 20.1.1.2 --dport 443/TCP", "DROPPED", egress="DROPPED"),
    c("language.rst IP/CIDR based: toCIDRSet 10.0.0.0/8, any port and protocol", "policies",
      "--src default/myservice --dst-ip 10.1.2.3 --dport 5432/UDP", "ALLOWED", egress="ALLOWED", matched="default/cidr-rule: egress[1]"),
    c("language.rst IP/CIDR based: the except 10.96.0.0/12 is not allowed", "policies",
      "--src default/myservice --dst-ip 10.96.0.1 --dport 443/TCP", "DROPPED", egress="DROPPED"),
    c("language.rst IP/CIDR based: CIDR rules never select cluster endpoints", "policies",
      "--src default/myservice --dst-ip 10.244.1.20 --dport 443/TCP", "DROPPED", egress="DROPPED"),
    c("language.rst Layer 4 Examples (port ranges): endPort 444 is inclusive", "policies",
      "--src default/frontend --dst-ip 1.1.1.1 --dport 444/TCP", "ALLOWED", egress="ALLOWED"),
    c("language.rst Layer 4 Examples (port ranges): 445 is outside the range", "policies",
      "--src default/frontend --dst-ip 1.1.1.1 --dport 445/TCP", "DROPPED", egress="DROPPED"),
    c("language.rst Layer 4 Examples: protocol TCP does not allow UDP", "policies",
      "--src default/frontend --dst-ip 1.1.1.1 --dport 80/UDP", "DROPPED", egress="DROPPED"),
    c("language.rst Layer 4 Examples: protocol TCP does not allow SCTP", "policies",
      "--src default/frontend --dst-ip 1.1.1.1 --dport 80/SCTP", "DROPPED", egress="DROPPED"),
    c("language.rst HTTP: GET /path1 from env=prod", "policies", f"{SVC} --http-method GET --http-path /path1", "ALLOWED",
      ingress="ALLOWED", l7="http", matched="default/rule1: ingress[0].toPorts[0].rules.http[0]"),
    c("language.rst HTTP: path is a full-match regex, /path1/ does not match /path1$", "policies",
      f"{SVC} --http-method GET --http-path /path1/", "L7_DENIED", ingress="L7_DENIED", response={"http_status": 403}),
    c("language.rst HTTP: PUT /path2 needs the X-My-Header: true header", "policies",
      f"{SVC} --http-method PUT --http-path /path2", "L7_DENIED", response={"http_status": 403}),
    c("language.rst HTTP: PUT /path2 with X-My-Header: true", "policies",
      f"{SVC} --http-method PUT --http-path /path2 --http-header 'X-My-Header: true'", "ALLOWED",
      matched="default/rule1: ingress[0].toPorts[0].rules.http[1]"),
    c("language.rst HTTP: header value must match", "policies",
      f"{SVC} --http-method PUT --http-path /path2 --http-header 'X-My-Header: false'", "L7_DENIED", response={"http_status": 403}),
    c("language.rst HTTP: host is a regex on the Host header", "policies",
      f"{SVC} --http-method GET --http-path /public/a --http-host api.example.com", "ALLOWED",
      matched="default/rule1: ingress[0].toPorts[0].rules.http[2]"),
    c("language.rst HTTP: another host is denied", "policies",
      f"{SVC} --http-method GET --http-path /public/a --http-host evil.com", "L7_DENIED", response={"http_status": 403}),
    c("language.rst HTTP: a gRPC call on an HTTP port is denied with gRPC status 7", "policies",
      f"{SVC} --grpc /pkg.Svc/M", "L7_DENIED", response={"grpc_status": 7}),
    c("language.rst HTTP: without a request the connection goes to the proxy and is allowed", "policies",
      SVC, "ALLOWED", ingress="ALLOWED", l7="http"),
    c("deny.rst: ingressDeny wins over fromEntities all", "policies",
      "--src default/frontend --dst default/other --dport 8080/TCP", "DROPPED", ingress="DROPPED",
      matched="default/deny-frontend-8080: ingressDeny[0].toPorts[0]"),
    c("deny.rst: the deny covers only its port", "policies",
      "--src default/backend --dst default/other --dport 8081/TCP", "ALLOWED", ingress="ALLOWED"),
    c("deny.rst: the deny covers only its peer", "policies",
      "--src default/backend --dst default/other --dport 8080/TCP", "ALLOWED", ingress="ALLOWED"),
    c("language.rst DNS based: matchPattern *.cilium.io", "policies", f"{DNS} www.cilium.io", "ALLOWED", egress="ALLOWED", l7="dns",
      matched="default/fqdn: egress[0].toPorts[0].rules.dns[0]"),
    c("matchpattern: matching is case-insensitive", "policies", f"{DNS} WWW.Cilium.IO", "ALLOWED"),
    c("matchpattern: *. does not match the apex; matchName cilium.io does (trailing dot ignored)", "policies",
      f"{DNS} cilium.io.", "ALLOWED", matched="default/fqdn: egress[0].toPorts[0].rules.dns[1]"),
    c("matchpattern: * in *.cilium.io is one label", "policies", f"{DNS} a.b.cilium.io", "L7_DENIED", egress="L7_DENIED",
      response={"dns_rcode": "REFUSED"}),
    c("language.rst DNS based: other names are refused", "policies",
      "--src default/crawler --dst kube-system/coredns --dport 53/TCP --dns-name example.com", "L7_DENIED",
      response={"dns_rcode": "REFUSED"}),
    c("language.rst toFQDNs: an IP learned for www.cilium.io is allowed on 443", "policies",
      "--src default/crawler --dst-ip 104.198.14.52 --dport 443/TCP --learned-dns www.cilium.io=104.198.14.52", "ALLOWED",
      egress="ALLOWED", matched="default/fqdn: egress[1].toPorts[0]"),
    c("language.rst toFQDNs: an IP never seen in a DNS answer is dropped", "policies",
      "--src default/crawler --dst-ip 104.198.14.52 --dport 443/TCP", "DROPPED"),
    c("language.rst toFQDNs: an IP learned for another name is dropped", "policies",
      "--src default/crawler --dst-ip 104.198.14.52 --dport 443/TCP --learned-dns example.com=104.198.14.52", "DROPPED"),
    c("language.rst toFQDNs: only the listed port", "policies",
      "--src default/crawler --dst-ip 104.198.14.52 --dport 80/TCP --learned-dns www.cilium.io=104.198.14.52", "DROPPED"),
    c("kafka: empire-hq may produce to empire-announce (api key by name)", "policies",
      f"{HQ} --kafka-api-key produce --kafka-topic empire-announce", "ALLOWED", l7="kafka",
      matched="empire/secure-empire-kafka: ingress[0].toPorts[0].rules.kafka[1]"),
    c("kafka: api key by number (0 = produce)", "policies", f"{HQ} --kafka-api-key 0 --kafka-topic deathstar-plans", "ALLOWED"),
    c("kafka: a multi-topic produce passes when every topic is covered", "policies",
      f"{HQ} --kafka-api-key produce --kafka-topic deathstar-plans --kafka-topic empire-announce", "ALLOWED"),
    c("kafka: one uncovered topic denies the request (error 29)", "policies",
      f"{HQ} --kafka-api-key produce --kafka-topic deathstar-plans --kafka-topic other", "L7_DENIED",
      response={"kafka_error_code": 29}),
    c("kafka: role produce does not include fetch", "policies", f"{HQ} --kafka-api-key fetch --kafka-topic empire-announce",
      "L7_DENIED", response={"kafka_error_code": 29}),
    c("kafka: role produce includes metadata", "policies", f"{HQ} --kafka-api-key metadata --kafka-topic empire-announce", "ALLOWED"),
    c("kafka: role consume includes fetch", "policies", f"{OUTPOST} --kafka-api-key fetch --kafka-topic empire-announce", "ALLOWED",
      matched="empire/secure-empire-kafka: ingress[1].toPorts[0].rules.kafka[0]"),
    c("kafka: consume of another topic is denied", "policies", f"{OUTPOST} --kafka-api-key fetch --kafka-topic deathstar-plans",
      "L7_DENIED", response={"kafka_error_code": 29}),
    c("kafka: role consume does not include produce", "policies", f"{OUTPOST} --kafka-api-key produce --kafka-topic empire-announce",
      "L7_DENIED"),
    c("kafka: role consume includes offsetcommit and joingroup (10 = findcoordinator)", "policies",
      f"{OUTPOST} --kafka-api-key 10", "ALLOWED"),
    c("kafka: apiKey + clientID match", "policies", f"{BACKUP} --kafka-api-key fetch --kafka-client-id backup-1 --kafka-topic x",
      "ALLOWED"),
    c("kafka: clientID must match", "policies", f"{BACKUP} --kafka-api-key fetch --kafka-client-id backup-2 --kafka-topic x",
      "L7_DENIED", response={"kafka_error_code": 29}),
    # --- scoping/ ------------------------------------------------------------------------------
    c("language.rst CiliumClusterwideNetworkPolicy: a CCNP peer selector matches pods of every namespace", "scoping",
      "--src dev/client --dst prod/api --dport 8080/TCP", "ALLOWED", matched="api-from-clients: ingress[0].toPorts[0]"),
    c("language.rst Namespaces: a CNP peer selector matches only its own namespace", "scoping",
      "--src dev/client --dst prod/api --dport 9090/TCP", "DROPPED", ingress="DROPPED"),
    c("language.rst Namespaces: same namespace", "scoping", "--src prod/client --dst prod/api --dport 9090/TCP", "ALLOWED"),
    c("language.rst Namespaces: k8s:io.kubernetes.pod.namespace selects another namespace", "scoping",
      "--src dev/client --dst prod/api --dport 7070/TCP", "ALLOWED", matched="prod/api-from-dev-ns: ingress[0].toPorts[0]"),
    c("language.rst Namespaces: ... and only that namespace", "scoping",
      "--src prod/client --dst prod/api --dport 7070/TCP", "DROPPED"),
    c("language.rst Namespaces: namespace labels (no source prefix = any:) select across namespaces", "scoping",
      "--src prod/client --dst dev/api --dport 6060/TCP", "ALLOWED",
      matched="dev/api-from-prod-labelled-ns: ingress[0].toPorts[0]"),
    c("language.rst Namespaces: a namespace without the label is not selected", "scoping",
      "--src dev/client --dst dev/api --dport 6060/TCP", "DROPPED"),
    c("language.rst matchExpressions NotIn: app=client is excluded", "scoping",
      "--src dev/client --dst dev/api --dport 5050/TCP", "DROPPED"),
    c("language.rst enableDefaultDeny ingress false: the allow applies", "scoping",
      "--src-ip 5.5.5.5 --dst default/backend --dport 8443/TCP", "ALLOWED", ingress="ALLOWED"),
    c("language.rst enableDefaultDeny ingress false: the rest is not default-denied", "scoping",
      "--src-ip 5.5.5.5 --dst default/backend --dport 22/TCP", "ALLOWED", ingress="ALLOWED"),
    c("deny.rst: egressDeny toCIDRSet wins over toEntities all", "scoping",
      "--src default/frontend --dst-ip 10.96.0.10 --dport 53/UDP", "DROPPED", egress="DROPPED",
      matched="default/frontend-egress: egressDeny[0]"),
    c("deny.rst: outside the denied CIDR toEntities all allows", "scoping",
      "--src default/frontend --dst-ip 10.95.0.10 --dport 53/UDP", "ALLOWED"),
    # --- l7/ -----------------------------------------------------------------------------------
    c("language.rst headerMatches: the value must match", "l7", f"{HM} --http-path /secure --http-header 'X-Token: s3cr3t'", "ALLOWED",
      matched="default/header-match: ingress[0].toPorts[0].rules.http[0]"),
    c("language.rst headerMatches: mismatch without action denies", "l7", f"{HM} --http-path /secure --http-header 'X-Token: nope'",
      "L7_DENIED", response={"http_status": 403}),
    c("language.rst headerMatches: a missing header denies", "l7", f"{HM} --http-path /secure", "L7_DENIED"),
    c("language.rst headerMatches: mismatch LOG allows", "l7", f"{HM} --http-path /logged --http-header 'X-Token: nope'", "ALLOWED"),
    c("language.rst headerMatches: mismatch REPLACE allows", "l7", f"{HM} --http-path /replaced", "ALLOWED"),
    c("language.rst Layer 7 (wildcarding): an L4-only allow for the same peer voids the HTTP rules", "l7",
      "--src default/backend --dst default/service --dport 80/TCP --http-method POST --http-path /anything", "ALLOWED"),
    c("language.rst HTTP: http: [{}] allows every request", "l7",
      "--src default/other --dst default/service --dport 80/TCP --http-method DELETE --http-path /x", "ALLOWED", l7="http"),
    c("matchpattern: **. matches any depth", "l7", f"{DNS} a.b.example.com", "ALLOWED"),
    c("matchpattern: **. does not match the apex", "l7", f"{DNS} example.com", "L7_DENIED", response={"dns_rcode": "REFUSED"}),
    c("matchpattern: mid-label * (api-*.corp.io)", "l7", f"{DNS} api-v1.corp.io", "ALLOWED"),
    c("matchpattern: mid-label * stays inside one label", "l7", f"{DNS} api-v1.x.corp.io", "L7_DENIED"),
    c("matchpattern: *.example.com is anchored (no suffix match)", "l7", f"{DNS} evilexample.com", "L7_DENIED"),
    c("language.rst DNS: the DNS rule's port is UDP only here", "l7",
      "--src default/crawler --dst kube-system/coredns --dport 53/TCP --dns-name www.example.com", "DROPPED"),
    c("language.rst toFQDNs with **.example.com", "l7",
      "--src default/crawler --dst-ip 93.184.216.34 --dport 8443/TCP --learned-dns a.b.example.com=93.184.216.34", "ALLOWED"),
    c("language.rst Layer 4 Examples: port 0 protocol ANY allows every port and protocol", "l7",
      "--src default/crawler --dst-ip 192.0.2.7 --dport 9999/SCTP", "ALLOWED"),
    c("language.rst Layer 4 Examples: a port without protocol means ANY (UDP too)", "l7",
      "--src default/myservice --dst-ip 1.1.1.1 --dport 53/UDP", "ALLOWED"),
    c("gRPC GSG: POST /package.Service/Method matched as HTTP/2", "l7",
      "--src default/frontend --dst default/service --dport 50051/TCP --grpc /cilium.test.Greeter/SayHello", "ALLOWED"),
    c("gRPC GSG: another method is denied with grpc-status 7", "l7",
      "--src default/frontend --dst default/service --dport 50051/TCP --grpc /cilium.test.Greeter/Other", "L7_DENIED",
      response={"grpc_status": 7}),
    c("gRPC: --grpc carries content-type application/grpc", "l7",
      "--src default/frontend --dst default/service --dport 50051/TCP --grpc /cilium.test.Admin/Reset", "ALLOWED"),
    c("gRPC: plain HTTP POST lacks content-type application/grpc", "l7",
      "--src default/frontend --dst default/service --dport 50051/TCP --http-method POST --http-path /cilium.test.Admin/Reset",
      "L7_DENIED", response={"http_status": 403}),
    c("kafka: --kafka-api-key accepts Kafka's own request name ListOffsets (= Cilium's offsets, in consume)", "policies",
      f"{OUTPOST} --kafka-api-key ListOffsets --kafka-topic empire-announce", "ALLOWED"),
    c("kafka: --kafka-api-key by number (2 = offsets)", "policies", f"{OUTPOST} --kafka-api-key 2 --kafka-topic empire-announce",
      "ALLOWED"),
    # --- mixed/ --------------------------------------------------------------------------------
    c("deny.rst: an ingressDeny fromCIDR on port 80 beats the L7 allow on that port", "mixed",
      "--src-ip 6.6.6.6 --dst prod/api --dport 80/TCP --http-method GET --http-path /", "DROPPED", ingress="DROPPED",
      matched="prod/api-ingress: ingressDeny[0].toPorts[0]"),
    c("language.rst HTTP: fromEntities all + method GET allows GET from world", "mixed",
      "--src-ip 7.7.7.7 --dst prod/api --dport 80/TCP --http-method GET --http-path /", "ALLOWED", l7="http"),
    c("language.rst HTTP: method is a full match, HEAD is not GET", "mixed",
      "--src-ip 7.7.7.7 --dst prod/api --dport 80/TCP --http-method HEAD --http-path /", "L7_DENIED", response={"http_status": 403}),
    c("language.rst Ingress and egress: egress L3 allow, ingress L7 denies", "mixed",
      "--src prod/client --dst prod/api --dport 80/TCP --http-method POST --http-path /v1/x", "L7_DENIED",
      egress="ALLOWED", ingress="L7_DENIED"),
    c("language.rst HTTP on egress to world: path regex /v1/.*", "mixed",
      "--src prod/client --dst-ip 8.8.8.8 --dport 80/TCP --http-method GET --http-path /v1/x", "ALLOWED", egress="ALLOWED",
      l7="http", matched="prod/client-egress: egress[0].toPorts[0].rules.http[0]"),
    c("language.rst HTTP on egress to world: other paths are denied", "mixed",
      "--src prod/client --dst-ip 8.8.8.8 --dport 80/TCP --http-method GET --http-path /v2/x", "L7_DENIED", egress="L7_DENIED",
      response={"http_status": 403}),
    c("language.rst Service Accounts: io.cilium.k8s.policy.serviceaccount selects the pod; Kafka apiVersion matches", "mixed",
      "--src prod/robot --dst prod/api --dport 9092/TCP --kafka-api-key produce --kafka-api-version 2 --kafka-topic logs", "ALLOWED"),
    c("kafka: apiVersion is an exact match", "mixed",
      "--src prod/robot --dst prod/api --dport 9092/TCP --kafka-api-key produce --kafka-api-version 3 --kafka-topic logs",
      "L7_DENIED", response={"kafka_error_code": 29}),
    c("language.rst Service Accounts: another service account is not selected", "mixed",
      "--src prod/client --dst prod/api --dport 9092/TCP --kafka-api-key produce --kafka-api-version 2 --kafka-topic logs",
      "DROPPED", ingress="DROPPED"),
    c("kafka: apiKey produce does not allow metadata (3)", "mixed",
      "--src prod/robot --dst prod/api --dport 9092/TCP --kafka-api-key 3 --kafka-topic logs", "L7_DENIED"),
    # --- visibility/ ---------------------------------------------------------------------------
    c("language.rst enableDefaultDeny egress false: a query the DNS rules allow", "visibility",
      "--src default/frontend --dst kube-system/coredns --dport 53/UDP --dns-name www.cilium.io", "ALLOWED",
      egress="ALLOWED", l7="dns"),
    c("pkg/policy/l4.go ensureWildcard (PR #38841): with default deny off and no rule enforcing egress, the DNS rules "
      "are visibility only: a query they do not match is allowed (and recorded), not refused", "visibility",
      "--src default/frontend --dst kube-system/coredns --dport 53/UDP --dns-name example.com", "ALLOWED",
      egress="ALLOWED", l7="dns", matched="default/dns-visibility: egress[0].toPorts[0] (visibility: enableDefaultDeny.egress is false)"),
    c("l4.go ensureWildcard: ... but when another rule selecting the endpoint enforces egress, the same DNS rules judge",
      "visibility", "--src default/crawler --dst kube-system/coredns --dport 53/UDP --dns-name example.com", "L7_DENIED",
      egress="L7_DENIED", response={"dns_rcode": "REFUSED"}),
    c("language.rst enableDefaultDeny egress false: other egress is not default-denied", "visibility",
      "--src default/frontend --dst-ip 1.1.1.1 --dport 443/TCP", "ALLOWED"),
    c("matchpattern: matchName is case- and trailing-dot-insensitive", "visibility",
      "--src default/crawler --dst kube-system/coredns --dport 53/UDP --dns-name cilium.io", "ALLOWED"),
    c("language.rst toFQDNs matchPattern '*': any learned IP (comma list, repeated flag)", "visibility",
      "--src default/crawler --dst-ip 2.2.2.2 --dport 443/TCP --learned-dns a.com=1.1.1.1,9.9.9.9 --learned-dns b.org=2.2.2.2",
      "ALLOWED", matched="default/crawler-fqdn-any: egress[1].toPorts[0]"),
    c("language.rst toFQDNs matchPattern '*': an IP never learned is dropped", "visibility",
      "--src default/crawler --dst-ip 3.3.3.3 --dport 443/TCP --learned-dns a.com=1.1.1.1", "DROPPED"),
    c("language.rst toFQDNs: never selects a cluster endpoint even if a DNS answer named its IP", "visibility",
      "--src default/crawler --dst kube-system/coredns --dport 443/TCP --learned-dns a.com=10.244.0.10", "DROPPED"),
    # --- edges/ --------------------------------------------------------------------------------
    c("language.rst Ingress/Egress Default Deny: ingress: [{}] denies all ingress", "edges",
      "--src default/frontend --dst default/backend --dport 80/TCP", "DROPPED", ingress="DROPPED"),
    c("language.rst: fromEndpoints: [] selects nothing", "edges",
      "--src default/frontend --dst default/service --dport 1111/TCP", "DROPPED"),
    c("language.rst: fromEndpoints: [{}] selects every pod of the namespace", "edges",
      "--src default/frontend --dst default/service --dport 2222/TCP", "ALLOWED"),
    c("language.rst: ... but not world", "edges", "--src-ip 7.7.7.7 --dst default/service --dport 2222/TCP", "DROPPED"),
    c("language.rst CCNP: fromEndpoints [{}] selects pods of every namespace", "edges",
      "--src default/frontend --dst dev/api --dport 80/TCP", "ALLOWED"),
    c("language.rst CCNP: fromEndpoints [{}] does not select world", "edges",
      "--src-ip 7.7.7.7 --dst dev/api --dport 80/TCP", "DROPPED"),
    c("language.rst IP/CIDR: toCIDR 0.0.0.0/0 covers any IPv4 outside the cluster", "edges",
      "--src default/myservice --dst-ip 7.7.7.7 --dport 80/TCP", "ALLOWED"),
    c("language.rst IP/CIDR: toCIDR 0.0.0.0/0 does not cover IPv6", "edges",
      "--src default/myservice --dst-ip 2001:db8::1 --dport 80/TCP", "DROPPED"),
    # --- netpol/ (Kubernetes NetworkPolicy) -----------------------------------------------------------
    c("k8s-np: podSelector peer in the policy's namespace, port without protocol = TCP", "netpol",
      "--src shop/web --dst shop/db --dport 5432/TCP", "ALLOWED", ingress="ALLOWED", egress="ALLOWED",
      matched="shop/db: ingress[0].ports[0]"),
    c("k8s-np: protocol absent means TCP only", "netpol", "--src shop/web --dst shop/db --dport 5432/UDP", "DROPPED"),
    c("k8s-np: a pod the peer does not select is dropped (default deny of the selected pod)", "netpol",
      "--src shop/batch --dst shop/db --dport 5432/TCP", "DROPPED", ingress="DROPPED"),
    c("k8s-np: a podSelector peer never selects another namespace", "netpol",
      "--src prod/client --dst shop/db --dport 5432/TCP", "DROPPED", ingress="DROPPED"),
    c("k8s-np: namespaceSelector AND podSelector in one peer", "netpol",
      "--src monitoring/prometheus --dst shop/db --dport 9187/TCP", "ALLOWED", matched="shop/db: ingress[1].ports[0]"),
    c("k8s-np: ... another pod of that namespace is not selected", "netpol",
      "--src monitoring/grafana --dst shop/db --dport 9187/TCP", "DROPPED"),
    c("k8s-np: ... and the peer's ports only", "netpol",
      "--src monitoring/prometheus --dst shop/db --dport 5432/TCP", "DROPPED"),
    c("k8s-np: ipBlock with endPort (inclusive range)", "netpol",
      "--src-ip 172.17.0.5 --dst shop/db --dport 30010/TCP", "ALLOWED", matched="shop/db: ingress[2].ports[0]"),
    c("k8s-np: ipBlock: a port past endPort", "netpol", "--src-ip 172.17.0.5 --dst shop/db --dport 30011/TCP", "DROPPED"),
    c("k8s-np: ipBlock except", "netpol", "--src-ip 172.17.1.5 --dst shop/db --dport 30005/TCP", "DROPPED"),
    c("k8s-np: podSelector {} + policyTypes [Ingress] denies all ingress of the namespace", "netpol",
      "--src shop/db --dst shop/web --dport 80/TCP", "DROPPED", ingress="DROPPED"),
    c("k8s-np: `ingress: [{}]` (no from) allows every source, world included", "netpol",
      "--src-ip 1.2.3.4 --dst shop/batch --dport 9999/UDP", "ALLOWED", ingress="ALLOWED", matched="shop/batch-allow-all: ingress[0]"),
    c("k8s-np: egress rule without `to` allows every destination on its ports", "netpol",
      "--src shop/web --dst-ip 8.8.8.8 --dport 53/UDP", "ALLOWED", egress="ALLOWED"),
    c("k8s-np: policyTypes [Egress] with rules: other egress is denied", "netpol",
      "--src shop/web --dst-ip 8.8.8.8 --dport 443/TCP", "DROPPED", egress="DROPPED"),
    c("k8s-np: a pod no egress policy selects is not egress-enforced", "netpol",
      "--src shop/db --dst-ip 8.8.8.8 --dport 443/TCP", "ALLOWED", egress="ALLOWED"),
    c("k8s-np: an empty namespaceSelector selects pods of every namespace", "netpol",
      "--src shop/batch --dst monitoring/grafana --dport 3000/TCP", "ALLOWED"),
    c("k8s-np: ... but not world", "netpol", "--src-ip 1.2.3.4 --dst monitoring/grafana --dport 3000/TCP", "DROPPED"),
    c("k8s-np: traced by labels without an endpoint (cilium policy trace -s)", "netpol",
      "--src-labels k8s:app=web,k8s:io.kubernetes.pod.namespace=shop --dst shop/db --dport 5432/TCP", "ALLOWED"),
    c("k8s-np: ... labels of another namespace", "netpol",
      "--src-labels k8s:app=web -s k8s:io.kubernetes.pod.namespace=dev --dst shop/db --dport 5432/TCP", "DROPPED"),
]


def trace_args(case: Case) -> tuple[str, ...]:
    return ("policy", "trace", "--policies", case.scenario, "--endpoints", "endpoints.yaml", *case.args, "-o", "json")


@pytest.fixture(scope="module")
def traced() -> dict[int, subprocess.CompletedProcess[str]]:
    """Every case's CLI run (keyed by id(case)), started side by side once; each is a separate process."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(map(id, CASES), pool.map(lambda k: run(*trace_args(k)), CASES), strict=True))


def test_visibility_only_reason() -> None:
    """The trace says why a request no rule matches was allowed: the L7 rules are visibility only."""
    proc = run(*trace_args(c("", "visibility", "--src default/frontend --dst kube-system/coredns --dport 53/UDP --dns-name example.com", "ALLOWED")))
    out = json.loads(proc.stdout)
    assert out["egress"]["reason"] == "no dns rule matches; allowed: visibility only (enableDefaultDeny is false)"


@pytest.mark.parametrize("case", CASES, ids=[f"{i:02d}-{c.scenario}" for i, c in enumerate(CASES)])
def test_trace_matches_cilium(case: Case, traced: dict[int, subprocess.CompletedProcess[str]]) -> None:
    """The CLI's verdict for each scenario is the one Cilium's documentation gives (doc named in the case)."""
    proc = traced[id(case)]
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"verdict", "egress", "ingress", "response", "header_actions", "reason", "identities"} <= set(out)
    assert out["verdict"] == case.verdict, (case.doc, out)
    if case.egress is not None:
        assert out["egress"]["verdict"] == case.egress, (case.doc, out)
    if case.ingress is not None:
        assert out["ingress"]["verdict"] == case.ingress, (case.doc, out)
    if case.matched is not None:
        assert case.matched in out["egress"]["matched"] + out["ingress"]["matched"], (case.doc, out)
    if case.l7 is not None:
        assert case.l7 in (out["egress"]["l7"], out["ingress"]["l7"]), (case.doc, out)
    if case.verdict == "L7_DENIED":
        assert len(out["response"]) == 1
        if case.response is not None:
            assert out["response"] == case.response
    else:
        assert out["response"] == {}


INVALID = {
    "notcp": "spec.ingress[0].toPorts[0]: L7 rules require protocol TCP",
    "badpattern": "spec.egress[0].toFQDNs[0].matchPattern:",
    "badentity": "spec.egress[0].toEntities[0]:",
    "denyl7": 'spec.ingressDeny[0].toPorts[0].rules: unknown field "rules"',
    "badexcept": "spec.egress[0].toCIDRSet[0].except[0]:",
    "badop": "spec.endpointSelector.matchExpressions[0].operator:",
    "badmismatch": "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].mismatch:",
    "badrole": "spec.ingress[0].toPorts[0].rules.kafka[0].role:",
    "badproto": "spec.ingress[0].toPorts[0].ports[0].protocol:",
    "badport": "spec.ingress[0].toPorts[0].ports[0].port:",
    "typo": 'spec.ingress[0].toPort: unknown field "toPort"',
    "lookahead": "spec.ingress[0].toPorts[0].rules.http[0].path: invalid regex",
    "port0": "spec.ingress[0].toPorts[0].ports[0]: L7 rules cannot be used when a port is 0",
    "twokinds": "spec.ingress[0].toPorts[0].rules: multiple L7 protocol rule types",
    "dnsingress": "spec.ingress[0].toPorts[0].rules.dns: DNS rules are not allowed on ingress",
    "roleapikey": "spec.ingress[0].toPorts[0].rules.kafka[0]: cannot set both role",
    "wrongtype": "spec.endpointSelector.matchLabels: expected a mapping",
    "nosections": "spec: rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny",
    "hostpolicy": "spec.nodeSelector: nodeSelector (a host policy) is not supported",
    "icmp": "spec.ingress[0].icmps[0].fields[0].type: ICMP type 'PacketTooBig' not found in IPv4",
    "npmixed": "spec.ingress[0].from[0]: ipBlock cannot be combined with podSelector",
    "npnamedport": "spec.egress[0].ports[0].port: named port 'http' is not supported",
}


def test_validate_reports_every_cilium_error() -> None:
    """Each object Cilium's sanitize rejects gets one `file:line: ns/name: field.path: message` line; exit 1."""
    proc = run("policy", "validate", "invalid")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(INVALID), lines
    for name, want in INVALID.items():
        hits = [ln for ln in lines if re.match(rf"^invalid/errors\.yaml:\d+: (\w+/)?{name}: ", ln)]
        assert len(hits) == 1, (name, lines)
        assert want in hits[0], (name, lines)
    # A trace over a path holding an invalid object refuses to run (exit 1), as the contract says.
    t = run("policy", "trace", "--policies", "invalid", "--endpoints", "endpoints.yaml",
            "--src", "default/frontend", "--dst", "default/backend", "--dport", "80/TCP")
    assert t.returncode == 1


def test_acceptance_scenarios_validate() -> None:
    """Every scenario directory is valid Cilium policy (validate exits 0, one line per object)."""
    for d in ("policies", "scoping", "l7", "edges", "mixed", "visibility", "netpol"):
        proc = run("policy", "validate", d)
        assert proc.returncode == 0, proc.stdout
        kind = ": ok (NetworkPolicy" if d == "netpol" else ": ok (Cilium"
        assert all(kind in ln for ln in proc.stdout.splitlines()), proc.stdout


ICMP_TRACE_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: icmps, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: backend}}]
      icmps: [{fields: [{type: EchoRequest}, {type: EchoReply, family: IPv6}]}]
"""


@pytest.mark.parametrize(
    ("dport", "verdict"),
    [("8/ICMP", "ALLOWED"), ("0/ICMP", "DROPPED"), ("129/ICMPv6", "ALLOWED"), ("128/ICMPv6", "DROPPED"), ("80/TCP", "DROPPED")],
)
def test_trace_icmp_types(tmp_path: Path, dport: str, verdict: str) -> None:
    """`trace --dport TYPE/ICMP` judges an ICMP type as the `icmps` rule keys it (names resolved per family)."""
    pol = tmp_path / "icmps.yaml"
    pol.write_text(ICMP_TRACE_POLICY)
    proc = run("policy", "trace", "--policies", str(pol), "--endpoints", str(ROOT / "examples" / "endpoints.yaml"),
               "--src", "default/backend", "--dst", "default/frontend", "--dport", dport)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"verdict: {verdict}"


def test_trace_rejects_an_icmp_type_out_of_range(tmp_path: Path) -> None:
    pol = tmp_path / "icmps.yaml"
    pol.write_text(ICMP_TRACE_POLICY)
    proc = run("policy", "trace", "--policies", str(pol), "--endpoints", str(ROOT / "examples" / "endpoints.yaml"),
               "--src", "default/backend", "--dst", "default/frontend", "--dport", "256/ICMP")
    assert proc.returncode == 2
    assert "an ICMP type must be 0-255" in proc.stderr
