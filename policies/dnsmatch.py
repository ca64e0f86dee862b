"""DNS name normalisation and Cilium 1.19 `matchName` / `matchPattern` semantics.

Names compare lower-cased and fully qualified (one trailing dot). In a pattern, `*` within a label
matches zero or more of `[-a-zA-Z0-9_]` (runs of `*` count as one); a leading `**.` matches one or
more whole labels; a pattern made only of `*` (optionally with a trailing dot) matches every name,
including the root `.`. This mirrors pkg/fqdn/matchpattern; regexes are compiled with RE2.
"""

from __future__ import annotations

import re

MAX_FQDN_LENGTH = 255
_DNS_CHARS = "[-a-zA-Z0-9_]"
_MULTI_LABEL = "(" + _DNS_CHARS + "+([.]" + _DNS_CHARS + "+){0,})[.]"
_ALLOWED_NAME = re.compile(r"^[-a-zA-Z0-9_.]+$")
_ALLOWED_PATTERN = re.compile(r"^[-a-zA-Z0-9_.*]+$")
MATCH_ALL_REGEX = "(^(" + _DNS_CHARS + "+[.])+$)|(^[.]$)"


def fqdn(name: str) -> str:
    """Lower-case `name` and give it exactly one trailing dot ('.' stays the root)."""
    name = name.strip().lower()
    if name.endswith("."):
        return name
    return name + "."


def is_match_all(pattern: str) -> bool:
    p = pattern.strip()
    if p.endswith("."):
        p = p[:-1]
    return bool(p) and set(p) == {"*"}


def validate_match_name(name: str) -> str | None:
    """Returns an error message, or None when `name` is a valid matchName."""
    if len(name.strip()) > MAX_FQDN_LENGTH:
        return f"matchName {name!r} is longer than {MAX_FQDN_LENGTH} characters"
    if not _ALLOWED_NAME.match(name):
        return f"invalid characters in matchName {name!r}: only 0-9, a-z, A-Z, '.', '-' and '_' are allowed"
    return None


def validate_match_pattern(pattern: str) -> str | None:
    """Returns an error message, or None when `pattern` is a valid matchPattern."""
    if len(pattern.strip()) > MAX_FQDN_LENGTH:
        return f"matchPattern {pattern!r} is longer than {MAX_FQDN_LENGTH} characters"
    if not _ALLOWED_PATTERN.match(pattern):
        return f"invalid characters in matchPattern {pattern!r}: only 0-9, a-z, A-Z, '.', '-', '_' and '*' are allowed"
    return None


def pattern_to_regex(pattern: str) -> str:
    """The anchored regex (RE2 syntax) a valid matchPattern stands for, matched against `fqdn(name)`."""
    pattern = pattern.strip().lower()
    if is_match_all(pattern):
        return MATCH_ALL_REGEX
    pattern = fqdn(pattern)
    out: list[str] = []
    start = 0
    stars = 0
    while stars < len(pattern) and pattern[stars] == "*":
        stars += 1
    if stars >= 2 and stars < len(pattern) and pattern[stars] == ".":
        out.append(_MULTI_LABEL)
        start = stars + 1
    i = start
    while i < len(pattern):
        c = pattern[i]
        if c == ".":
            out.append("[.]")
        elif c == "*":
            while i + 1 < len(pattern) and pattern[i + 1] == "*":
                i += 1
            out.append(_DNS_CHARS + "*")
        else:
            out.append(c)
        i += 1
    return "^" + "".join(out) + "$"
