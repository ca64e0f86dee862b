"""DNS name normalisation and matchPattern properties (Cilium 1.19 pkg/fqdn/matchpattern).

| property                                                         | test                             |
|------------------------------------------------------------------|----------------------------------|
| a pattern without `*` matches exactly its own name, any case/dot | test_literal_pattern_is_equality |
| `*` matches every valid name                                     | test_star_matches_every_name     |
| `*.zone` matches exactly one more label                          | test_single_label_wildcard       |
| `**.zone` matches one or more more labels                        | test_multi_label_wildcard        |
"""

from __future__ import annotations

import re2
from hypothesis import given
from hypothesis import strategies as st
from membrane.policies.crd import re2_options
from membrane.policies.dnsmatch import fqdn, pattern_to_regex, validate_match_pattern

_label = st.from_regex(r"[a-z0-9][-a-z0-9_]{0,10}", fullmatch=True)
_names = st.lists(_label, min_size=1, max_size=5).map(".".join)


def _matches(pattern: str, name: str) -> bool:
    return re2.search(pattern_to_regex(pattern), fqdn(name), re2_options()) is not None


@given(a=_names, b=_names, upper=st.booleans(), dot=st.booleans())
def test_literal_pattern_is_equality(a: str, b: str, upper: bool, dot: bool) -> None:
    """A pattern without wildcards is a case-insensitive, trailing-dot-insensitive equality."""
    query = (b.upper() if upper else b) + ("." if dot else "")
    assert validate_match_pattern(a) is None
    assert _matches(a, query) is (a == b)


@given(name=_names)
def test_star_matches_every_name(name: str) -> None:
    """`*` selects every valid DNS name."""
    assert _matches("*", name)


@given(zone=_names, extra=st.lists(_label, min_size=0, max_size=3))
def test_single_label_wildcard(zone: str, extra: list[str]) -> None:
    """`*.zone` matches names exactly one label below zone."""
    name = ".".join([*extra, zone])
    assert _matches("*." + zone, name) is (len(extra) == 1)


@given(zone=_names, extra=st.lists(_label, min_size=0, max_size=3))
def test_multi_label_wildcard(zone: str, extra: list[str]) -> None:
    """`**.zone` matches names one or more labels below zone, never zone itself."""
    name = ".".join([*extra, zone])
    assert _matches("**." + zone, name) is (len(extra) >= 1)
