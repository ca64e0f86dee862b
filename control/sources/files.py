"""The file source: policy PATHs (files or directories) and the endpoints file, read from disk.

The only place policy files touch the disk. A directory contributes its `*.yaml`, `*.yml` and
`*.json` files (recursively, sorted); each file's source name is its path as the user wrote it
joined with the relative name, so error lines point at files the user can open. A document shaped
like the endpoints file is skipped, so `examples/` (policies + endpoints.yaml) validates as a whole.

Invariant: an empty policy file (0 bytes, or only whitespace, comments and `---`), the transient
state of a truncating write, is an error naming the file, never "no policies". Removing every policy
takes a file that says so: an empty List (`kind: List` or `kind: CiliumNetworkPolicyList`, `items: []`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from membrane.control.sources import Change, EndpointsChanged, PoliciesChanged, SourceError, SourceProblem
from membrane.policies import (
    Endpoints,
    EndpointsError,
    LoadResult,
    PolicyValidationError,
    load_policies,
    merge_results,
    parse_endpoints,
)

POLICY_SUFFIXES = (".yaml", ".yml", ".json")
EMPTY_POLICY_HINT = (
    "an empty file is not read as 'no policies' (it is what a truncating write leaves for a moment); "
    "to enforce no policies, write an empty list: 'apiVersion: v1', 'kind: List', 'items: []'"
)


class EmptyPolicyFile(PolicyValidationError):
    """A policy file holds no document (see the module's invariant); the message says how to mean "none"."""

    @property
    def location(self) -> str:
        return self.source


class PathProblem(Exception):
    """A PATH does not exist or cannot be read: a usage error (exit status 2)."""


def policy_files(paths: Sequence[str]) -> list[tuple[str, Path]]:
    """(source name, path) for every policy file under `paths`. Raises PathProblem."""
    out: list[tuple[str, Path]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in POLICY_SUFFIXES:
                    out.append((str(Path(raw) / f.relative_to(p)), f))
        elif p.is_file():
            out.append((raw, p))
        else:
            raise PathProblem(f"{raw}: no such file or directory")
    return out


def is_blank_policy_text(data: bytes) -> bool:
    """True when `data` holds no document at all: nothing, or only whitespace, comments and separators."""
    for raw in data.splitlines():
        line = raw.strip()
        if line and not line.startswith(b"#") and line not in (b"---", b"..."):
            return False
    return True


def read_policies(paths: Sequence[str]) -> LoadResult:
    """Load every policy under `paths`. Returns valid policies and all errors (an empty file is one).
    Raises PathProblem."""
    results = []
    for source, path in policy_files(paths):
        try:
            data = path.read_bytes()
        except OSError as e:
            raise PathProblem(f"{source}: {e.strerror}") from None
        if is_blank_policy_text(data):
            results.append(LoadResult((), (EmptyPolicyFile(f"policy file is empty: {EMPTY_POLICY_HINT}", source=source),)))
            continue
        results.append(load_policies(data, source, skip_endpoints_documents=True))
    return merge_results(results)


def read_endpoints(path: str | None) -> Endpoints:
    """Parse the endpoints file (None = no endpoints). Raises PathProblem or policies.EndpointsError."""
    if path is None:
        return Endpoints()
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise PathProblem(f"{path}: {e.strerror}") from None
    return parse_endpoints(data, path)


class FileSource:
    """Policies and endpoints from files, polled by (mtime, size). All policy files form one set under
    `key`: an invalid edit anywhere rejects the whole set and the last good one stays in force."""

    key = "files"

    def __init__(self, policies: Sequence[str], endpoints: str | None) -> None:
        self.policies = tuple(policies)
        self.endpoints = endpoints
        self._stamps: dict[str, tuple[float, int]] = {}

    def snapshot(self) -> list[Change]:
        """Read everything now. Raises SourceError (usage=True for a missing path)."""
        self._stamps = self._watched()
        try:
            loaded = read_policies(self.policies)
            endpoints = read_endpoints(self.endpoints)
        except PathProblem as e:
            raise SourceError(str(e), usage=True) from None
        except EndpointsError as e:
            raise SourceError(str(e)) from None
        if loaded.errors:
            raise SourceError("\n".join(str(e) for e in loaded.errors))
        return [PoliciesChanged(key=self.key, policies=tuple(loaded.policies)), EndpointsChanged(endpoints=endpoints)]

    def poll(self) -> list[Change]:
        stamps = self._watched()
        if stamps == self._stamps:
            return []
        try:
            return self.snapshot()
        except SourceError as e:
            return [SourceProblem(key=self.key, errors=tuple(str(e).splitlines()))]

    def _watched(self) -> dict[str, tuple[float, int]]:
        """path -> (mtime, size) of every watched file (a directory's file list counts too)."""
        out: dict[str, tuple[float, int]] = {}
        paths = [self.endpoints] if self.endpoints is not None else []
        with contextlib.suppress(PathProblem):
            paths += [str(p) for _src, p in policy_files(self.policies)]
        paths += self.policies  # a directory's own mtime changes when files come and go
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:
                out[p] = (-1.0, -1)
                continue
            out[p] = (st.st_mtime, st.st_size)
        return out
