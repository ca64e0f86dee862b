"""control/sources/files.py and control/state.py: what a file source reports, and what the state keeps in force.

| file content | snapshot (start) | poll (running) |
|---|---|---|
| valid policy | PoliciesChanged | PoliciesChanged when (mtime, size) changed, [] otherwise |
| 0 bytes / whitespace / comments and `---` only | SourceError naming the file (exit 1), saying how to mean "none" | SourceProblem; the last good policies stay |
| empty List (`kind: List` or `CiliumNetworkPolicyList`, `items: []`) | PoliciesChanged with no policies | the same: every policy removed |
| missing path | SourceError(usage=True) (exit 2) | SourceProblem |
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from membrane.control.sources import EndpointsChanged, PoliciesChanged, SourceError, SourceProblem
from membrane.control.sources.files import FileSource, is_blank_policy_text, read_policies
from membrane.control.state import NodeState

POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
"""
ENDPOINTS = "endpoints:\n  - {name: web, namespace: default, labels: {app: web}, ips: [10.244.9.1]}\n"
BLANK = [b"", b"   \n\n\t\n", b"# all policies go here\n# (none yet)\n", b"---\n# c\n---\n...\n"]
EMPTY_LISTS = [
    "apiVersion: v1\nkind: List\nitems: []\n",
    "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicyList\nitems: []\n",
]


def _files(tmp_path: Path, policy: bytes | str) -> tuple[Path, FileSource]:
    pol = tmp_path / "policy.yaml"
    pol.write_bytes(policy.encode() if isinstance(policy, str) else policy)
    eps = tmp_path / "endpoints.yaml"
    eps.write_text(ENDPOINTS)
    return pol, FileSource([str(pol)], str(eps))


def _touch_changed(path: Path, data: bytes | str) -> None:
    """Write and move the mtime on, so a poll in the same clock tick still sees the change."""
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize("blank", BLANK, ids=["zero-bytes", "whitespace", "comments", "separators"])
def test_blank_policy_file_refuses_to_start_naming_the_file(tmp_path: Path, blank: bytes) -> None:
    """A policy file with no document is an error at start (not 'no policies'), naming the file and the explicit way."""
    pol, source = _files(tmp_path, blank)
    with pytest.raises(SourceError) as err:
        source.snapshot()
    assert not err.value.usage
    assert str(err.value).startswith(f"{pol}: policy file is empty")
    assert "kind: List" in str(err.value)
    assert "items: []" in str(err.value)


@pytest.mark.parametrize("blank", BLANK, ids=["zero-bytes", "whitespace", "comments", "separators"])
def test_policy_file_turning_blank_keeps_the_last_good_policy(tmp_path: Path, blank: bytes) -> None:
    """A policy file truncated while the agent runs is a SourceProblem; the state keeps the policies in force and reports the file."""
    pol, source = _files(tmp_path, POLICY)
    state = NodeState()
    for change in source.snapshot():
        state.apply(change)
    _touch_changed(pol, blank)
    changes = source.poll()
    assert len(changes) == 1
    assert isinstance(changes[0], SourceProblem)
    assert state.apply(changes[0]) is False
    assert [p.name for p in state.inputs().policies] == ["web"]
    assert len(state.error_lines) == 1
    assert state.error_lines[0].startswith(f"{pol}: policy file is empty")
    _touch_changed(pol, POLICY)  # the writer finished: the error goes, the policy is read again
    assert any(state.apply(c) for c in source.poll())
    assert state.error_lines == []


@pytest.mark.parametrize("text", EMPTY_LISTS, ids=["List", "CiliumNetworkPolicyList"])
def test_explicit_empty_list_removes_every_policy(tmp_path: Path, text: str) -> None:
    """An empty List is the deliberate 'no policies': accepted at start and while running."""
    pol, source = _files(tmp_path, text)
    assert [c for c in source.snapshot() if isinstance(c, PoliciesChanged)] == [PoliciesChanged(key="files", policies=())]
    _touch_changed(pol, POLICY)
    state = NodeState()
    for change in source.poll():
        state.apply(change)
    assert len(state.inputs().policies) == 1
    _touch_changed(pol, text)
    for change in source.poll():
        state.apply(change)
    assert state.inputs().policies == ()
    assert state.error_lines == []


def test_unchanged_files_poll_nothing_and_a_missing_path_is_a_usage_error(tmp_path: Path) -> None:
    """No edit, no change; a PATH that does not exist is a usage error at start (exit 2)."""
    _, source = _files(tmp_path, POLICY)
    changes = source.snapshot()
    assert [type(c) for c in changes] == [PoliciesChanged, EndpointsChanged]
    assert source.poll() == []
    with pytest.raises(SourceError) as err:
        FileSource([str(tmp_path / "nope.yaml")], None).snapshot()
    assert err.value.usage


def test_validate_reports_an_empty_file_too(tmp_path: Path) -> None:
    """`read_policies` (used by `policy validate` and the gateway) reports a blank file as an error, a List with no items not."""
    (tmp_path / "a.yaml").write_text("")
    (tmp_path / "b.yaml").write_text(EMPTY_LISTS[0])
    loaded = read_policies([str(tmp_path)])
    assert [str(e).split(":")[0] for e in loaded.errors] == [str(tmp_path / "a.yaml")]


def test_blank_text_detection() -> None:
    """Only whitespace, comments and document markers count as blank; any content line does not."""
    assert is_blank_policy_text(b"# x\n  # y\n---\n")
    assert not is_blank_policy_text(b"# x\nkind: List\n")
    assert not is_blank_policy_text(b"{}")


def test_state_allocates_stable_endpoint_ids(tmp_path: Path) -> None:
    """Endpoint ids are nonzero, given once per endpoint with an interface, and kept across endpoint changes."""
    from membrane.policies import parse_endpoints

    state = NodeState()
    state.apply(EndpointsChanged(endpoints=parse_endpoints(
        "endpoints:\n  - {name: a, labels: {app: a}, interface: v1}\n  - {name: b, labels: {app: b}}\n")))
    assert state.endpoint_ids == {"default/a": 1}
    state.apply(EndpointsChanged(endpoints=parse_endpoints(
        "endpoints:\n  - {name: c, labels: {app: c}, interface: v3}\n  - {name: a, labels: {app: a}, interface: v1}\n")))
    assert state.endpoint_ids == {"default/a": 1, "default/c": 2}


def test_namespace_labels_change_endpoint_identity_labels() -> None:
    """A NamespacesChanged (the Kubernetes source) recomputes each endpoint's identity labels from its namespace's."""
    from membrane.control.sources import NamespacesChanged
    from membrane.policies import Namespace, parse_endpoints

    state = NodeState()
    state.apply(EndpointsChanged(endpoints=parse_endpoints("endpoints:\n  - {name: a, labels: {app: a}}\n")))
    before = state.endpoints.endpoints[0].label_set
    assert state.apply(NamespacesChanged(namespaces=(Namespace(name="default", labels={"team": "web"}),))) is True
    after = state.endpoints.endpoints[0].label_set
    assert after != before
    assert "io.cilium.k8s.namespace.labels.team" in str(after)
