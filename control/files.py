"""Reads policy PATHs (files or directories) and the endpoints file, and hands their text to policies/.

The only place policy files touch the disk. A directory contributes its `*.yaml`, `*.yml` and
`*.json` files (recursively, sorted); each file's source name is its path as the user wrote it
joined with the relative name, so error lines point at files the user can open. A document shaped
like the endpoints file is skipped, so `examples/` (policies + endpoints.yaml) validates as a whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from membrane.policies import Endpoints, LoadResult, load_policies, merge_results, parse_endpoints

POLICY_SUFFIXES = (".yaml", ".yml", ".json")


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


def read_policies(paths: Sequence[str]) -> LoadResult:
    """Load every policy under `paths`. Returns valid policies and all errors. Raises PathProblem."""
    results = []
    for source, path in policy_files(paths):
        try:
            data = path.read_bytes()
        except OSError as e:
            raise PathProblem(f"{source}: {e.strerror}") from None
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
