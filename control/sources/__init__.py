"""Where the node's inputs come from: each source yields typed changes that `control/state.py` applies.

A source owns reading its origin (files now; the Kubernetes API and CNI next, as siblings of
`files.py`) and turning it into changes: the policies it holds (under its own source key, so several
sources' policies combine), endpoints, namespaces and nodes. It never compiles, never touches the
kernel and never decides what an invalid input means for enforcement: it reports a `SourceProblem`,
and the state keeps that source's last good input (fail closed, never open).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from membrane.policies import Endpoints, Namespace, Policy

LOCAL_UNRESOLVED = ""  # an Endpoint.interface meaning "on this node; its interface is found from its IP"


@dataclass(frozen=True, slots=True, kw_only=True)
class PoliciesChanged:
    """Every policy source `key` holds now (a whole set: what is absent was removed).
    An empty set is a deliberate "no policies" (for files: an explicit empty List)."""

    key: str
    policies: tuple[Policy, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointsChanged:
    """The endpoints (pods) and their namespaces as the source knows them now (a whole set)."""

    endpoints: Endpoints


@dataclass(frozen=True, slots=True, kw_only=True)
class NamespacesChanged:
    """Namespace labels changed (the Kubernetes source); endpoints' identities follow them."""

    namespaces: tuple[Namespace, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class NodesChanged:
    """The cluster's nodes: name -> node IPs (the Kubernetes source; `remote-node` identities next)."""

    nodes: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceProblem:
    """Source `key` could not be read or holds errors (one line each, naming file/field). The state
    keeps the last good input of that source and reports `errors` in the status."""

    key: str
    errors: tuple[str, ...]


Change = PoliciesChanged | EndpointsChanged | NamespacesChanged | NodesChanged | SourceProblem


class SourceError(Exception):
    """A source cannot give a first snapshot. `usage` = a usage error (a path that does not exist:
    exit status 2); otherwise its content is invalid (exit status 1). The message has one line per problem."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


class Source(Protocol):
    """One origin of inputs. The agent takes a snapshot at start, then polls it."""

    key: str  # names the source in errors and keys its policies

    def snapshot(self) -> list[Change]:
        """Everything the source holds now. Raises SourceError: the agent must not start on it."""
        ...

    def poll(self) -> list[Change]:
        """What changed since the last snapshot or poll ([] = nothing). Never raises: a problem is a
        `SourceProblem` change (the last good input stays in force)."""
        ...
