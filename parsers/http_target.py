"""Request-target normalisation shared by HTTP/1.1 and HTTP/2: the proxy and the server must judge the same path.

Rules (applied in this order, RFC 3986 §6.2.2 syntax-based normalisation, as Envoy's `normalize_path`
and `merge_slashes` do):
1. The target is origin form (`/path?query`), or `*` for OPTIONS; absolute form (`http://h/p`) is
   reduced to its origin form. Anything else is malformed.
2. Refused outright (servers disagree on them, RFC 9112 §3.2 / Envoy `path_with_escaped_slashes_action`
   REJECT_REQUEST): encoded slashes or backslashes (`%2F`, `%5C`), a raw backslash, `#`, NUL, any
   control character or space, and a `%` not followed by two hex digits.
3. Percent-encoded unreserved characters (ALPHA DIGIT `-._~`) are decoded (RFC 3986 §6.2.2.2), so
   `%2E%2E` is a dot segment like `..`.
4. Dot segments are removed (RFC 3986 §5.2.4); `..` above the root stays at the root.
5. Runs of `/` are merged into one.
The query is kept byte for byte. Never raises anything but `MalformedMessage`.
"""

from __future__ import annotations

import re

from membrane.parsers.errors import MalformedMessage
from membrane.parsers.events import Direction

_FORBIDDEN = re.compile(r"%(?:2[fF]|5[cC])|[\\#\x00-\x20\x7f]")
_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_UNRESERVED_PCT = re.compile(r"%(?:[46][1-9A-Fa-f]|[57][0-9Aa]|3[0-9]|2[dDeE]|5[fF]|7[eE])")
_ABSOLUTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?]*")
_SLASHES = re.compile(r"/{2,}")
# Targets already normalised, as the function returned them: a request repeats its path (an API's
# routes, a gRPC method) and six regex passes cost microseconds. Only successes are kept (a refusal
# is raised again each time), and only short ones (at most 4096 x 256 characters held); cleared when
# full, so a client sending unique paths costs one lookup more.
_NORMALISED: dict[str, str] = {}
_NORMALISED_MAX = 4096
_NORMALISED_LONGEST = 256


def _decode_unreserved(match: re.Match[str]) -> str:
    return chr(int(match.group(0)[1:], 16))


def _remove_dot_segments(path: str) -> str:
    output: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments[1:], start=1):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if output:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/" + "/".join(output)


def split_target(target: str) -> tuple[str, str]:
    """Split an origin-form target into (path, query); query is '' when there is no '?'."""
    path, _, query = target.partition("?")
    return path, query


def normalize_target(target: str, *, direction: Direction = Direction.CLIENT_TO_SERVER) -> str:
    """Return the normalised origin-form target (path, then '?query' when the target had one).

    Raises:
        MalformedMessage: the target is in a form servers read differently (see the module rules);
            the proxy answers 400 and never forwards it.
    """
    known = _NORMALISED.get(target)
    if known is not None:
        return known
    if target == "*":
        return target
    normalised = _normalise(target, direction)
    if len(target) > _NORMALISED_LONGEST:
        return normalised
    if len(_NORMALISED) >= _NORMALISED_MAX:
        _NORMALISED.clear()
    _NORMALISED[target] = normalised
    return normalised


def _normalise(target: str, direction: Direction) -> str:
    absolute = _ABSOLUTE.match(target)
    if absolute:
        target = target[absolute.end() :] or "/"
        if not target.startswith("/"):
            target = "/" + target
    if not target.startswith("/"):
        raise MalformedMessage(f"request target {target[:64]!r} is not in origin form", direction=direction)
    path, sep, query = target.partition("?")
    bad = _FORBIDDEN.search(path) or _PCT.search(path)
    if bad:
        raise MalformedMessage(
            f"request target has {bad.group(0)!r} at offset {bad.start()}, which servers read differently",
            direction=direction,
        )
    if _FORBIDDEN.search(query.replace("%2F", "").replace("%2f", "").replace("%5C", "").replace("%5c", "")):
        raise MalformedMessage("request query has a control character, space, backslash or '#'", direction=direction)
    path = _UNRESERVED_PCT.sub(_decode_unreserved, path)
    path = _SLASHES.sub("/", path)
    path = _remove_dot_segments(path)
    path = _SLASHES.sub("/", path)
    return path + sep + query
