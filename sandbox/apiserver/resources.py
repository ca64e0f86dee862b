"""The catalog of resource types the API server double serves: names, kinds, scope, verbs, short names.

Owns the static facts a client learns from discovery (what `kubectl api-resources` prints) and which
fields a field selector may name per resource. Never stores objects. Invariant: every (group, version,
plural) appears once, and short names are unique across the catalog, as kubectl needs to resolve them.
"""

from __future__ import annotations

from dataclasses import dataclass

# The verbs of a full-featured resource, in the order the real server lists them.
ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SUBRESOURCE_VERBS = ("get", "patch", "update")

# Fields every resource accepts in a field selector (the real server's DefaultClusterScopedAttr /
# DefaultNamespaceScopedAttr); a resource adds its own below, like kube-apiserver's per-type lists.
_META_FIELDS = ("metadata.name", "metadata.namespace")


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceType:
    """One served resource. `group` is "" for the core (legacy /api/v1) group."""

    group: str
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    has_status: bool = False               # a /status subresource exists; main-resource writes keep status
    field_selectors: tuple[str, ...] = ()  # beyond metadata.name and metadata.namespace; () = only those
    # Top-level fields besides apiVersion, kind and metadata (what fieldValidation=Strict checks names against).
    body_fields: tuple[str, ...] = ("spec", "status")

    @property
    def api_version(self) -> str:
        """The apiVersion string of objects of this type ("v1", "cilium.io/v2")."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version(self) -> str:
        return self.api_version

    @property
    def selectable_fields(self) -> tuple[str, ...]:
        return _META_FIELDS + self.field_selectors


def _core(plural: str, singular: str, kind: str, namespaced: bool, *, short_names: tuple[str, ...] = (),
          categories: tuple[str, ...] = (), has_status: bool = False,
          field_selectors: tuple[str, ...] = (), body_fields: tuple[str, ...] = ("spec", "status")) -> ResourceType:
    return ResourceType(group="", version="v1", plural=plural, singular=singular, kind=kind, namespaced=namespaced,
                        short_names=short_names, categories=categories, has_status=has_status,
                        field_selectors=field_selectors, body_fields=body_fields)


CATALOG: tuple[ResourceType, ...] = (
    _core("pods", "pod", "Pod", True, short_names=("po",), categories=("all",), has_status=True,
          field_selectors=("spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
                           "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName")),
    _core("namespaces", "namespace", "Namespace", False, short_names=("ns",), has_status=True,
          field_selectors=("status.phase",)),
    _core("nodes", "node", "Node", False, short_names=("no",), has_status=True,
          field_selectors=("spec.unschedulable",)),
    _core("events", "event", "Event", True, short_names=("ev",),
          field_selectors=("involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                           "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
                           "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type"),
          body_fields=("involvedObject", "reason", "message", "source", "firstTimestamp", "lastTimestamp", "count",
                       "type", "eventTime", "series", "action", "related", "reportingComponent",
                       "reportingInstance")),
    _core("services", "service", "Service", True, short_names=("svc",), categories=("all",), has_status=True),
    _core("configmaps", "configmap", "ConfigMap", True, short_names=("cm",),
          body_fields=("data", "binaryData", "immutable")),
    _core("serviceaccounts", "serviceaccount", "ServiceAccount", True, short_names=("sa",),
          body_fields=("secrets", "imagePullSecrets", "automountServiceAccountToken")),
    ResourceType(group="discovery.k8s.io", version="v1", plural="endpointslices", singular="endpointslice",
                 kind="EndpointSlice", namespaced=True, body_fields=("addressType", "endpoints", "ports")),
    ResourceType(group="networking.k8s.io", version="v1", plural="networkpolicies", singular="networkpolicy",
                 kind="NetworkPolicy", namespaced=True, short_names=("netpol",)),
    ResourceType(group="coordination.k8s.io", version="v1", plural="leases", singular="lease", kind="Lease",
                 namespaced=True),
    ResourceType(group="apiextensions.k8s.io", version="v1", plural="customresourcedefinitions",
                 singular="customresourcedefinition", kind="CustomResourceDefinition", namespaced=False,
                 short_names=("crd", "crds"), categories=("api-extensions",), has_status=True),
    # Cilium's CRDs, with the short names and categories of Cilium 1.19's CRD manifests.
    ResourceType(group="cilium.io", version="v2", plural="ciliumnetworkpolicies", singular="ciliumnetworkpolicy",
                 kind="CiliumNetworkPolicy", namespaced=True, short_names=("cnp", "ciliumnp"),
                 categories=("cilium", "ciliumpolicy"), has_status=True, body_fields=("spec", "specs", "status")),
    ResourceType(group="cilium.io", version="v2", plural="ciliumclusterwidenetworkpolicies",
                 singular="ciliumclusterwidenetworkpolicy", kind="CiliumClusterwideNetworkPolicy", namespaced=False,
                 short_names=("ccnp",), categories=("cilium", "ciliumpolicy"), has_status=True,
                 body_fields=("spec", "specs", "status")),
    ResourceType(group="cilium.io", version="v2", plural="ciliumendpoints", singular="ciliumendpoint",
                 kind="CiliumEndpoint", namespaced=True, short_names=("cep", "ciliumep"), categories=("cilium",),
                 has_status=True, body_fields=("status",)),
)

# Groups in the order /apis lists them (each serves exactly one version here).
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(r.group for r in CATALOG if r.group))


META_FIELDS = frozenset({"name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
                         "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
                         "annotations", "ownerReferences", "finalizers", "managedFields"})


def unknown_fields(rt: ResourceType, obj: dict[str, object]) -> list[str]:
    """The top-level and metadata field names of obj this type does not have, as JSON paths ("spc", "metadata.lables")."""
    known = {"apiVersion", "kind", "metadata", *rt.body_fields}
    out = [k for k in obj if k not in known]
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        out += [f"metadata.{k}" for k in meta if k not in META_FIELDS]
    return out


def by_group_version(group: str, version: str) -> dict[str, ResourceType]:
    """Returns the resources of one group/version keyed by plural; empty if the group/version is not served."""
    return {r.plural: r for r in CATALOG if r.group == group and r.version == version}


def find(group: str, version: str, plural: str) -> ResourceType | None:
    """Returns the resource type, or None if this server does not serve it (the caller answers 404)."""
    return by_group_version(group, version).get(plural)


def find_kind(api_version: str, kind: str) -> ResourceType | None:
    """Returns the resource type whose objects have this apiVersion and kind, or None."""
    for r in CATALOG:
        if r.api_version == api_version and r.kind == kind:
            return r
    return None
