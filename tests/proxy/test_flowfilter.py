"""proxy/flowfilter.py: hubble's filter semantics (flows_filter.go, pkg/hubble/filters at Cilium v1.19.4), pure.

| flags | filters (whitelist, OR-ed) |
|---|---|
| `--pod x --http-status 403` | (source pod x AND 403) OR (destination pod x AND 403) |
| `--from-pod x --from-pod y` | source pod x OR y (one filter) |
| `--namespace n` | source pod in n/ OR destination pod in n/ |
| `--namespace n --pod p` | source n/p OR destination n/p |
| `--not --verdict FORWARDED` | blacklist: verdict FORWARDED |
"""

from __future__ import annotations

from typing import Any

import pytest
from membrane.proxy.flowfilter import (
    FilterBuilder,
    FilterError,
    FlowMatcher,
    format_compact,
    format_table,
    parse_line,
    parse_selector,
    parse_since,
)


def _build(*flags: tuple[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    builder = FilterBuilder()
    for flag, value in flags:
        builder.add(flag, value)
    return builder.result()


def _flow(src_pod: str = "default/backend", dst_pod: str = "default/frontend", *, code: int = 0,
          labels: tuple[str, ...] = ("k8s:app=backend",), verdict: str = "FORWARDED") -> dict[str, Any]:
    sns, sname = src_pod.split("/")
    dns_, dname = dst_pod.split("/")
    http: dict[str, Any] = {"method": "GET", "url": "http://a/api/x?q=1"}
    if code:
        http["code"] = code
    return {
        "time": "2025-11-26T04:06:40.5Z", "verdict": verdict,
        "IP": {"source": "10.244.1.20", "destination": "10.244.1.10", "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": 40000, "destination_port": 80}},
        "source": {"identity": 1726, "namespace": sns, "pod_name": sname, "labels": list(labels)},
        "destination": {"identity": 9776, "namespace": dns_, "pod_name": dname, "labels": ["k8s:app=frontend"]},
        "Type": "L7", "l7": {"type": "RESPONSE" if code else "REQUEST", "http": http},
        "event_type": {"type": 129}, "traffic_direction": "INGRESS", "is_reply": bool(code), "Summary": "s",
    }


def test_either_end_flags_make_two_filters_anded_with_the_rest() -> None:
    """`--pod x --http-status 403` is (source x AND 403) OR (destination x AND 403), as hubble builds it."""
    white, black = _build(("pod", "backend"), ("http-status", "403"))
    assert white == [{"source_pod": ["backend"], "http_status_code": ["403"]},
                     {"destination_pod": ["backend"], "http_status_code": ["403"]}]
    assert black == []
    matcher = FlowMatcher.build(white, black)
    assert matcher.matches(_flow(code=403))
    assert not matcher.matches(_flow(code=200))
    assert matcher.matches(_flow("default/frontend", "default/backend", code=403))
    assert not matcher.matches(_flow("default/other", "default/frontend", code=403))


def test_repeated_flag_ors_and_namespace_applies_to_pods() -> None:
    """Values of one flag OR; `--namespace` scopes pod names on both ends; a bare pod name means `default/`."""
    white, _ = _build(("from-pod", "default/backend"), ("from-pod", "shop/order"))
    assert white == [{"source_pod": ["default/backend", "shop/order"]}]
    white, _ = _build(("namespace", "shop"))
    assert white == [{"source_pod": ["shop/"]}, {"destination_pod": ["shop/"]}]
    white, _ = _build(("namespace", "shop"), ("pod", "order"))
    assert white == [{"source_pod": ["shop/order"]}, {"destination_pod": ["shop/order"]}]
    matcher = FlowMatcher.build(*_build(("pod", "back")))  # a prefix, in namespace default
    assert matcher.matches(_flow())
    assert not matcher.matches(_flow("shop/backend", "shop/x"))


def test_not_puts_the_next_flag_on_the_blacklist() -> None:
    """`--not` applies to the flag after it only; a flow is shown when no blacklist filter matches it."""
    white, black = _build(("not", ""), ("verdict", "FORWARDED"), ("protocol", "http"))
    assert black == [{"verdict": ["FORWARDED"]}]
    assert white == [{"protocol": ["http"]}]
    matcher = FlowMatcher.build(white, black)
    assert matcher.matches(_flow(verdict="DROPPED"))
    assert not matcher.matches(_flow())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ((("pod", "a"), ("from-pod", "b")), "filters --from-pod and --pod cannot be combined"),
        ((("namespace", "a"), ("to-pod", "b")), "cannot be combined"),
        ((("label", "a=b"), ("to-label", "c=d")), "cannot be combined"),
        ((("not", ""), ("not", "")), "consecutive --not"),
        ((("http-status", "4xx"),), "invalid http status code prefix"),
        ((("type", "sometimes"),), "--type 'sometimes'"),
        ((("ip", "10.0.0.300"),), None),
    ],
)
def test_unusable_flags_are_refused(flags: tuple[tuple[str, str], ...], message: str | None) -> None:
    """Combinations hubble refuses and values it cannot parse raise FilterError naming them."""
    with pytest.raises(FilterError) as err:
        FlowMatcher.build(*_build(*flags))
    if message is not None:
        assert message in str(err.value)


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("app=backend", ("k8s:app=backend",), True),
        ("k8s:app=backend", ("k8s:app=backend",), True),
        ("reserved:app=backend", ("k8s:app=backend",), False),  # a source prefix must match the label's source
        ("app in (a, backend)", ("k8s:app=backend",), True),
        ("app notin (a, backend)", ("k8s:app=backend",), False),
        ("app!=x", ("k8s:team=y",), True),  # k8s semantics: != also matches an absent label
        ("!app", ("k8s:app=backend",), False),
        ("app", ("k8s:app=backend",), True),
        ("app=backend, env=prod", ("k8s:app=backend", "k8s:env=prod"), True),
        ("app=backend,env=prod", ("k8s:app=backend",), False),
        ("reserved:world", ("reserved:world",), True),
    ],
)
def test_label_selectors(selector: str, labels: tuple[str, ...], expected: bool) -> None:
    """`--from-label` takes Kubernetes selectors with Cilium's `source:` prefixes (no prefix = any source)."""
    matcher = FlowMatcher.build(*_build(("from-label", selector)))
    assert matcher.matches(_flow(labels=labels)) is expected


def test_selector_syntax_errors() -> None:
    """A selector that cannot be read is an error, not a filter that matches nothing."""
    for bad in ("app in (a", "app in a", "=x", ""):
        with pytest.raises(FilterError):
            parse_selector(bad)


def test_since_takes_durations_and_rfc3339() -> None:
    """`--since` is a Go duration back from now or an RFC 3339 time, as hubble's FromString."""
    now = 1_764_130_000_000_000_000
    assert parse_since("5m", now_ns=now) == now - 300_000_000_000
    assert parse_since("1h30m", now_ns=now) == now - 5_400_000_000_000
    assert parse_since("250ms", now_ns=now) == now - 250_000_000
    assert parse_since("2025-11-26T04:06:40Z") == 1_764_130_000_000_000_000
    assert parse_since("2025-11-26T05:06:40.5+01:00") == 1_764_130_000_500_000_000
    with pytest.raises(FilterError):
        parse_since("yesterday")


def test_http_path_is_the_url_path_and_status_prefixes() -> None:
    """`--http-path` matches the URL's path (no query) as an unanchored regex; `--http-status 4+` a prefix."""
    assert FlowMatcher.build(*_build(("http-path", "/api/x$"))).matches(_flow())
    assert not FlowMatcher.build(*_build(("http-path", "q=1"))).matches(_flow())
    assert FlowMatcher.build(*_build(("http-status", "4+"))).matches(_flow(code=404))
    assert FlowMatcher.build(*_build(("http-status", "40+"))).matches(_flow(code=403))
    assert not FlowMatcher.build(*_build(("http-status", "4+"))).matches(_flow())  # a request has no status


def test_parse_line_reads_the_envelope_and_bare_flows() -> None:
    """A line may be the `{"flow": ...}` envelope or a bare flow; anything else is skipped (None)."""
    import json

    flow = _flow()
    assert parse_line(json.dumps({"flow": flow, "node_name": "n1", "time": flow["time"]})) == (flow, "n1")
    assert parse_line(json.dumps(flow)) == (flow, "")
    assert parse_line('{"lost_events": {"num_events_lost": "3"}}') is None
    assert parse_line("not json") is None


def test_compact_and_table_forms() -> None:
    """Compact is hubble's line (a response printed client <- server); table columns align like tabwriter's."""
    request = _flow()
    response = _flow("default/frontend", "default/backend", code=200)
    response["l4"] = {"TCP": {"source_port": 80, "destination_port": 40000}}
    assert format_compact(request) == (
        "Nov 26 04:06:40.500: default/backend:40000 (ID:1726) -> default/frontend:80 (ID:9776) http-request FORWARDED (s)"
    )
    assert format_compact(response).split(": ", 1)[1].startswith(
        "default/backend:40000 (ID:9776) <- default/frontend:80 (ID:1726) http-response")
    table = format_table([("a", "bb", "c", "d", "e", "f"), ("aaaa", "b", "c", "d", "e", "f")])
    assert table.splitlines() == [
        "TIMESTAMP   SOURCE   DESTINATION   TYPE   VERDICT   SUMMARY",
        "a           bb       c             d      e         f",
        "aaaa        b        c             d      e         f",
    ]
