"""Request-target normalisation (parsers/http_target.py): the proxy and the server must judge the same path.

Case table (rule numbers are the module docstring's):
| input                         | result            | rule |
|-------------------------------|-------------------|------|
| /a/b?x=1                      | unchanged         | -    |
| http://h:8080/a?q             | /a?q              | 1    |
| http://h                      | /                 | 1    |
| *                             | *                 | 1    |
| relative, ''                  | MalformedMessage  | 1    |
| %2F %2f %5C %5c \\ # NUL SP   | MalformedMessage  | 2    |
| %zz, trailing %               | MalformedMessage  | 2    |
| %7E %41 %2E                   | ~ A .             | 3    |
| /a/./b/../c, %2E%2E           | dot segments gone | 4    |
| /a//b///c                     | /a/b/c            | 5    |
| query %2F, '/../'             | kept byte for byte|      |
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from membrane.parsers.errors import MalformedMessage
from membrane.parsers.events import Direction
from membrane.parsers.http_target import normalize_target, split_target


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a/b?x=1", "/a/b?x=1"),
        ("/", "/"),
        ("*", "*"),
        ("http://h:8080/a?q", "/a?q"),
        ("https://h", "/"),
        ("http://h?q=1", "/?q=1"),
        ("/%7Euser/%41%2e", "/~user/A."),
        ("/a/./b/../c", "/a/c"),
        ("/a/%2E%2E/b", "/b"),
        ("/a/%2e/b", "/a/b"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/a//b///c", "/a/b/c"),
        ("//a/../b", "/b"),
        ("/a/b?x=%2F&y=/../z", "/a/b?x=%2F&y=/../z"),
        ("/caf%C3%A9", "/caf%C3%A9"),
    ],
)
def test_normalisation_rules(target: str, expected: str) -> None:
    """Absolute form is reduced, unreserved escapes decoded, dot segments removed, slashes merged (RFC 3986 §6.2.2, §5.2.4)."""
    assert normalize_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "",
        "a/b",
        "h:80",
        "/a%2Fb",
        "/a%2fb",
        "/a%5Cb",
        "/a%5cb",
        "/a\\b",
        "/a#frag",
        "/a\x00",
        "/a b",
        "/a\tb",
        "/%zz",
        "/a%",
        "/a%4",
        "/a?x#y",
        "/a?x y",
        "/a?\\",
        "/\x7f",
    ],
)
def test_targets_servers_read_differently_are_refused(target: str) -> None:
    """Encoded slashes, backslashes, fragments, controls and bad escapes are MalformedMessage, so 400 (RFC 9112 §3.2)."""
    with pytest.raises(MalformedMessage) as info:
        normalize_target(target, direction=Direction.CLIENT_TO_SERVER)
    assert info.value.direction is Direction.CLIENT_TO_SERVER


def test_split_target() -> None:
    """The path is everything before the first '?'; the query everything after it (RFC 3986 §3.4)."""
    assert split_target("/a?b?c") == ("/a", "b?c")
    assert split_target("/a") == ("/a", "")
    assert split_target("/a?") == ("/a", "")


_PIECES = st.sampled_from(
    ["/", "a", "b", ".", "..", "%2E", "%2e", "%41", "%7e", "//", "-", "~", "?", "=", "%2F", "\\", "%", "#"]
)


@given(st.lists(_PIECES, max_size=16).map(lambda parts: "/" + "".join(parts)))
def test_normalisation_is_idempotent_and_leaves_no_dot_segments(target: str) -> None:
    """Normalising twice changes nothing, and a normal path has no dot segment and no '//' (RFC 3986 §6.2.2)."""
    try:
        once = normalize_target(target)
    except MalformedMessage:
        return
    assert normalize_target(once) == once
    path, _ = split_target(once)
    assert path.startswith("/")
    assert "//" not in path
    assert not {".", ".."} & set(path.split("/"))
