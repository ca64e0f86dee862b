"""The endpoints file: the local stand-in for Pods and Namespaces (`membrane policy trace --endpoints`).

```yaml
namespaces:                      # optional; namespaces named by endpoints exist implicitly
  - name: default
    labels: {team: web}          # visible to selectors as io.cilium.k8s.namespace.labels.team
endpoints:
  - name: frontend               # referred to as default/frontend
    namespace: default           # absent = default
    labels: {app: frontend}
    ips: [10.244.1.10]
    serviceAccount: default      # absent = default -> io.cilium.k8s.policy.serviceaccount
    interface: mbr0a1b           # optional: the host-side veth (issue 5)
```
Pure: `parse_endpoints` takes the text. Errors are `EndpointsError` with the field path.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from membrane.policies.crd import FieldError, as_list, as_mapping, as_str, check_fields, fail, join, opt
from membrane.policies.errors import EndpointsError, PolicyError
from membrane.policies.labels import (
    CLUSTER_KEY,
    K8S,
    NAMESPACE_KEY,
    NAMESPACE_LABELS_PREFIX,
    SERVICE_ACCOUNT_KEY,
    Label,
    LabelSet,
)
from membrane.policies.loader import iter_documents

CLUSTER_NAME = "default"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace by Kubernetes
_NO_LABELS = LabelSet.of(())


@dataclass(frozen=True, slots=True, kw_only=True)
class Namespace:
    name: str
    labels: Mapping[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """A pod. `ips` may be empty (then only selectors, not addresses, can reach it)."""

    name: str
    namespace: str
    labels: Mapping[str, str]
    ips: tuple[str, ...] = ()
    service_account: str = "default"
    interface: str | None = None
    label_set: LabelSet = _NO_LABELS  # the identity-relevant labels (pod + namespace + SA + cluster)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoints:
    namespaces: tuple[Namespace, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    # (reserved identity, IP) pairs the cluster names: this node's addresses are `host` (1), other nodes'
    # `remote-node` (6), the API server's `kube-apiserver` (7); () = none known (entities then match nothing
    # by address). A pod's own IP wins over these.
    reserved_ips: tuple[tuple[int, str], ...] = ()

    def by_key(self, key: str) -> Endpoint | None:
        ns, _, name = key.rpartition("/")
        ns = ns or "default"
        for e in self.endpoints:
            if e.namespace == ns and e.name == name:
                return e
        return None

    def by_ip(self, ip: str) -> Endpoint | None:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        for e in self.endpoints:
            if any(ipaddress.ip_address(x) == addr for x in e.ips):
                return e
        return None


def endpoint_labels(pod_labels: Mapping[str, str], namespace: str, ns_labels: Mapping[str, str], service_account: str) -> LabelSet:
    """The labels Cilium derives a pod identity from."""
    labels = [Label(K8S, k, v) for k, v in pod_labels.items()]
    labels.append(Label(K8S, NAMESPACE_KEY, namespace))
    labels.append(Label(K8S, SERVICE_ACCOUNT_KEY, service_account))
    labels.append(Label(K8S, CLUSTER_KEY, CLUSTER_NAME))
    merged = {NAMESPACE_NAME_LABEL: namespace, **ns_labels}
    labels.extend(Label(K8S, f"{NAMESPACE_LABELS_PREFIX}.{k}", v) for k, v in merged.items())
    return LabelSet.of(labels)


def _labels(value: object, path: str) -> dict[str, str]:
    if value is None:
        return {}
    m = as_mapping(value, path)
    return {k: as_str(v, join(path, k)) for k, v in m.items()}


def _parse(data: Any) -> Endpoints:
    if data is None:
        return Endpoints()
    m = as_mapping(data, "")
    check_fields(m, "", ("namespaces", "endpoints"))
    namespaces: dict[str, Namespace] = {}
    for i, raw in enumerate(as_list(opt(m, "namespaces") or [], "namespaces")):
        p = f"namespaces[{i}]"
        nm = as_mapping(raw, p)
        check_fields(nm, p, ("name", "labels"))
        name = as_str(opt(nm, "name"), join(p, "name"))
        if not name:
            fail(join(p, "name"), "name is required")
        if name in namespaces:
            fail(join(p, "name"), f"duplicate namespace {name!r}")
        namespaces[name] = Namespace(name=name, labels=_labels(opt(nm, "labels"), join(p, "labels")))
    endpoints: list[Endpoint] = []
    keys: set[str] = set()
    ip_owner: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
    for i, raw in enumerate(as_list(opt(m, "endpoints") or [], "endpoints")):
        p = f"endpoints[{i}]"
        em = as_mapping(raw, p)
        check_fields(em, p, ("name", "namespace", "labels", "ips", "serviceAccount", "interface"))
        name = as_str(opt(em, "name"), join(p, "name"))
        if not name:
            fail(join(p, "name"), "name is required")
        ns = as_str(opt(em, "namespace"), join(p, "namespace")) if opt(em, "namespace") is not None else "default"
        ns = ns or "default"
        key = f"{ns}/{name}"
        if key in keys:
            fail(join(p, "name"), f"duplicate endpoint {key}")
        keys.add(key)
        ips: list[str] = []
        for j, ip in enumerate(as_list(opt(em, "ips") or [], join(p, "ips"))):
            ipp = f"{join(p, 'ips')}[{j}]"
            try:
                addr = ipaddress.ip_address(as_str(ip, ipp).strip())
            except ValueError:
                fail(ipp, f"invalid IP address {ip!r}")
            if addr in ip_owner:
                fail(ipp, f"IP {addr} already belongs to {ip_owner[addr]}")
            ip_owner[addr] = key
            ips.append(str(addr))
        sa = as_str(opt(em, "serviceAccount"), join(p, "serviceAccount")) if opt(em, "serviceAccount") is not None else "default"
        iface = as_str(opt(em, "interface"), join(p, "interface")) if opt(em, "interface") is not None else None
        if iface is not None and not 0 < len(iface) <= 15:
            fail(join(p, "interface"), "an interface name has 1 to 15 characters")
        pod_labels = _labels(opt(em, "labels"), join(p, "labels"))
        if ns not in namespaces:
            namespaces[ns] = Namespace(name=ns, labels={})
        endpoints.append(
            Endpoint(
                name=name,
                namespace=ns,
                labels=pod_labels,
                ips=tuple(ips),
                service_account=sa or "default",
                interface=iface,
                label_set=endpoint_labels(pod_labels, ns, namespaces[ns].labels, sa or "default"),
            )
        )
    return Endpoints(namespaces=tuple(namespaces.values()), endpoints=tuple(endpoints))


def parse_endpoints(text: str | bytes, source: str = "<endpoints>") -> Endpoints:
    """Parse an endpoints file (one YAML document; empty text = no endpoints).

    Raises:
        EndpointsError: the first problem, with the field path (`endpoints[2].ips[0]`); the caller
            should report it and stop (exit status 1).
    """
    result = Endpoints()
    count = 0
    for doc in iter_documents(text, source):
        if isinstance(doc, PolicyError):
            raise EndpointsError(doc.message, source=source, line=doc.line, obj="endpoints")
        if doc.data is None:
            continue
        count += 1
        if count > 1:
            raise EndpointsError("the endpoints file holds one document", source=source, line=doc.line, obj="endpoints")
        try:
            result = _parse(doc.data)
        except FieldError as e:
            raise EndpointsError(e.message, source=source, line=doc.line, obj="endpoints", path=e.path) from None
    return result
