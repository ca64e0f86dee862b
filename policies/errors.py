"""The one exception family policies/ raises, and only at load or compile time: `PolicyError`.

Every error carries a location: the source name (a file name, or what the caller passed), the
line of the offending field (the loader maps the field path to its line; the document's first line
when the field is absent), the object (`ns/name`, or `document N` before the name is
known) and the field path inside it (`specs[0].ingress[0].toPorts[0]`). `str(error)` is the
one-line form `membrane policy validate` prints.
"""

from __future__ import annotations


class PolicyError(Exception):
    """A policy or endpoints document is unusable as written. Report it; the object is rejected."""

    def __init__(
        self,
        message: str,
        *,
        source: str = "",
        line: int | None = None,
        obj: str | None = None,
        path: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.source = source
        self.line = line
        self.obj = obj
        self.path = path
        # Every problem of the same object, this one first (parse_policy reports them all at once).
        self.problems: tuple[PolicyError, ...] = (self,)

    @property
    def location(self) -> str:
        """`source:line: obj: path` with the missing parts left out."""
        parts: list[str] = []
        if self.source or self.line is not None:
            parts.append(f"{self.source or '<input>'}:{self.line if self.line is not None else 0}")
        if self.obj:
            parts.append(self.obj)
        if self.path:
            parts.append(self.path)
        return ": ".join(parts)

    def __str__(self) -> str:
        where = self.location
        return f"{where}: {self.message}" if where else self.message


class PolicyYamlError(PolicyError):
    """The text is not YAML (a syntax error); `line` is where the parser gave up."""


class PolicyValidationError(PolicyError):
    """A well-formed document that Cilium would reject (unknown field, wrong type, bad regex, ...)."""


class EndpointsError(PolicyError):
    """The endpoints file (the local stand-in for Pods and Namespaces) is invalid."""


class PolicyConflictError(PolicyError):
    """Rules that each load fine but cannot be combined for one endpoint and port (two L7 parsers)."""
