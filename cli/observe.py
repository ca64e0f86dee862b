"""`membrane observe`: watch flows like `hubble observe`, from a flows file or a running agent/gateway's socket.

Owns the command line (Hubble's flag names and meanings) and the reading of flows files, rotated ones
included (`name.N` ... `name.1`, `name`, oldest first) and followed across rotation (`-f`, like `tail -F`).
Filtering and printing are library calls (membrane.proxy.flowfilter); the server side is
membrane.proxy.flowserver. Exit status: 0, 2 on usage errors (a bad filter, no such file, no server), 130
on Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from membrane.proxy.flowfilter import (
    FilterBuilder,
    FilterError,
    FlowDict,
    FlowMatcher,
    format_compact,
    format_json,
    format_table,
    parse_line,
    parse_since,
    table_row,
)
from membrane.proxy.flows import rotated_paths

DEFAULT_SERVER = "/var/run/membrane/agent.sock"
DEFAULT_LAST = 20  # what `hubble observe` prints with no --last, --since or --follow
POLL_S = 0.1

# (flag, short, help). Each may be repeated; values of one flag OR, different flags AND (see `--help`).
_FILTERS: tuple[tuple[str, str | None, str], ...] = (
    ("verdict", None, "flows with this verdict (FORWARDED, DROPPED, ERROR, AUDIT, REDIRECTED, TRACED, TRANSLATED)"),
    ("namespace", "n", "flows from or to pods in this namespace"),
    ("from-namespace", None, "flows from pods in this namespace"),
    ("to-namespace", None, "flows to pods in this namespace"),
    ("pod", None, "flows from or to this pod name prefix ([namespace/]name; no namespace = default)"),
    ("from-pod", None, "flows from this pod name prefix ([namespace/]name)"),
    ("to-pod", None, "flows to this pod name prefix ([namespace/]name)"),
    ("label", "l", "flows from or to an endpoint matching this label selector (app=x, k8s:app in (a,b), reserved:world)"),
    ("from-label", None, "flows from an endpoint matching this label selector"),
    ("to-label", None, "flows to an endpoint matching this label selector"),
    ("ip", None, "flows from or to this IP address or CIDR"),
    ("from-ip", None, "flows from this IP address or CIDR"),
    ("to-ip", None, "flows to this IP address or CIDR"),
    ("port", None, "flows with this source or destination port"),
    ("from-port", None, "flows with this source port"),
    ("to-port", None, "flows with this destination port"),
    ("identity", None, "flows from or to this security identity (number or reserved name: world, host...)"),
    ("from-identity", None, "flows from this security identity"),
    ("to-identity", None, "flows to this security identity"),
    ("protocol", None, "flows of this L4 or L7 protocol (tcp, udp, http, dns, kafka)"),
    ("type", "t", "event type TYPE[:SUBTYPE]: l7, drop, trace, policy-verdict (drop:133 = default-deny drops)"),
    ("http-status", None, "HTTP responses with this status or prefix (403, 4+, 50+)"),
    ("http-method", None, "HTTP flows with this method (case-insensitive)"),
    ("http-path", None, "HTTP flows whose URL path matches this regular expression"),
    ("dns-query", None, "DNS flows whose query matches this regular expression"),
    ("traffic-direction", None, "flows judged on ingress or egress"),
    ("drop-reason-desc", None, "drops with this reason (POLICY_DENIED, POLICY_DENY, ...)"),
    ("node-name", None, "flows from nodes matching this pattern (k8s*)"),
    ("uuid", None, "the flow with this uuid"),
)


class _FilterFlag(argparse.Action):
    """Keeps every filter flag in command-line order, so `--not` applies to the flag after it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        flags: list[tuple[str, str]] = getattr(namespace, "filter_flags", None) or []
        flags.append((self.dest.replace("_", "-"), "" if values is None else str(values)))
        namespace.filter_flags = flags


def register(sub: Any) -> None:
    p = sub.add_parser(
        "observe",
        help="watch flows (allowed and denied requests) like `hubble observe`",
        description=(
            "Print flow records from a flows file (--flows, rotated files included) or from a running agent or "
            "gateway over its local socket (--server). Filters work as hubble's: a flow must match at least one "
            "value of each filter flag given (values of one flag are OR-ed, different flags AND-ed); --not puts "
            "the next filter on the deny list. --pod, --ip, --label, --port, --namespace match either end."
        ),
    )
    src = p.add_argument_group("source")
    src.add_argument("--flows", metavar="FILE", help="read this flows file (and its rotated name.1, name.2 ...)")
    src.add_argument("--server", metavar="PATH", default=None,
                     help=f"the agent's or gateway's flow socket (default {DEFAULT_SERVER}; gateway: --socket)")
    sel = p.add_argument_group("selection")
    sel.add_argument("-f", "--follow", action="store_true", help="keep printing new flows (across file rotation)")
    sel.add_argument("--last", type=int, metavar="N", help="only the last N matching flows (then new ones with -f)")
    sel.add_argument("--all", action="store_true", help="every stored flow (the server default is the last 20)")
    sel.add_argument("--since", metavar="TIME", help="flows since a duration ago (5m, 1h30m) or an RFC 3339 time")
    sel.add_argument("--until", metavar="TIME", help="flows until a duration ago or an RFC 3339 time")
    flt = p.add_argument_group("filters")
    flt.add_argument("--not", dest="not", nargs=0, action=_FilterFlag, help="the next filter excludes what it matches")
    for flag, short, text in _FILTERS:
        names = [f"--{flag}"] + ([f"-{short}"] if short else [])
        flt.add_argument(*names, dest=flag.replace("-", "_"), action=_FilterFlag, metavar="VALUE", help=text)
    out = p.add_argument_group("output")
    out.add_argument("-o", "--output", default="compact", choices=("compact", "json", "jsonpb", "table"),
                     help="compact (one line a flow, as hubble prints it), json (the flow JSON), table")
    out.add_argument("--time-format", default="StampMilli", choices=("StampMilli", "RFC3339", "RFC3339Nano"),
                     help="how times are printed in compact and table output (UTC)")
    out.add_argument("--print-node-name", action="store_true", help="show the node name in compact output")
    p.set_defaults(func=run, filter_flags=[])


def _fail(message: str) -> int:
    print(f"membrane observe: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if args.output == "table" and args.follow:
        return _fail("table output is not compatible with --follow")
    if args.last is not None and args.last < 0:
        return _fail("--last must be 0 or more")
    if args.last is not None and args.all:
        return _fail("cannot set both --last and --all")
    if args.flows and args.server:
        return _fail("give --flows FILE or --server PATH, not both")
    builder = FilterBuilder()
    try:
        for flag, value in args.filter_flags:
            builder.add(flag, value)
        whitelist, blacklist = builder.result()
        since_ns = parse_since(args.since) if args.since else None
        until_ns = parse_since(args.until) if args.until and not args.follow else None
        matcher = FlowMatcher.build(whitelist, blacklist, since_ns=since_ns, until_ns=until_ns)
    except FilterError as e:
        return _fail(str(e))
    printer = _Printer(args.output, args.time_format, args.print_node_name, sys.stdout)
    if args.follow:
        # SIGTERM ends a follow like Ctrl-C: print what is buffered and exit 0.
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.flows:
            status = _from_files(args, matcher, printer)
        else:
            request = {
                "whitelist": whitelist, "blacklist": blacklist, "follow": args.follow,
                "since_ns": since_ns, "until_ns": until_ns, "last": _server_last(args),
            }
            status = _from_server(args.server or DEFAULT_SERVER, request, printer)
    except KeyboardInterrupt:
        printer.close()
        return 0 if args.follow else 130
    except BrokenPipeError:  # `membrane observe | head`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's own flush at exit
        return 0
    printer.close()
    return status


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _server_last(args: argparse.Namespace) -> int | None:
    if args.last is not None:
        return int(args.last)
    if args.all or args.since:
        return None
    return 0 if args.follow else DEFAULT_LAST


class _Printer:
    def __init__(self, output: str, time_format: str, show_node: bool, out: IO[str]) -> None:
        self.output = output
        self.time_format = time_format
        self.show_node = show_node
        self.out = out
        self.rows: list[tuple[str, ...]] = []

    def flow(self, flow: FlowDict, node: str) -> None:
        if self.output == "table":
            self.rows.append(table_row(flow, time_format=self.time_format))
            return
        if self.output in ("json", "jsonpb"):
            line = format_json(flow, node)
        else:
            line = format_compact(flow, node, time_format=self.time_format, show_node=self.show_node)
        self.out.write(line + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.output == "table" and self.rows:
            self.out.write(format_table(self.rows))
            self.rows = []
        self.out.flush()


# --- files ------------------------------------------------------------------------------------------


def _lines_of(handle: IO[str]) -> Iterator[str]:
    yield from handle


def _from_files(args: argparse.Namespace, matcher: FlowMatcher, printer: _Printer) -> int:
    path = str(args.flows)
    paths = rotated_paths(path)
    if not paths and not args.follow:
        return _fail(f"no flows file at {path}")
    # Open every file first: a rotation while we read renames files, but never the ones we hold open.
    handles = []
    for p in paths:
        try:
            handles.append(open(p, encoding="utf-8", errors="replace"))  # noqa: SIM115 - closed below
        except FileNotFoundError:  # rotated away between the listing and the open
            continue
        except OSError as e:
            return _fail(f"cannot read {p}: {e.strerror}")
    last: collections.deque[tuple[FlowDict, str]] | None = (
        collections.deque(maxlen=args.last) if args.last is not None else None
    )
    current: IO[str] | None = None
    pending = ""
    try:
        for i, handle in enumerate(handles):
            is_current = i == len(handles) - 1 and handle.name == path
            for line in _lines_of(handle):
                if is_current and not line.endswith("\n"):
                    pending = line  # a line being written right now: finished when we follow
                    break
                _emit(line, matcher, printer, last)
            if is_current:
                current = handle
        if last is not None:
            for flow, node in last:
                printer.flow(flow, node)
        if not args.follow:
            return 0
        printer.close()
        _follow(path, current, pending, lambda line: _emit(line, matcher, printer, None))
        return 0
    finally:
        for handle in handles:
            handle.close()


def _emit(line: str, matcher: FlowMatcher, printer: _Printer,
          last: collections.deque[tuple[FlowDict, str]] | None) -> None:
    parsed = parse_line(line)
    if parsed is None:
        return
    flow, node = parsed
    if not matcher.matches(flow, node):
        return
    if last is not None:
        last.append((flow, node))
    else:
        printer.flow(flow, node)


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _follow(path: str, handle: IO[str] | None, pending: str, emit: Callable[[str], None]) -> None:
    """Print lines appended to `path` as they come, and go on across rotations (several may happen between
    two polls: the files rotated after the one we held are read in order before the new `path`)."""
    owned: IO[str] | None = None

    def drain(h: IO[str]) -> bool:
        nonlocal pending
        data = h.read()
        if data:
            *complete, pending = (pending + data).split("\n")
            for line in complete:
                emit(line)
        return bool(data)

    try:
        while True:
            if handle is None:
                if _inode(path) is None:
                    time.sleep(POLL_S)
                    continue
                try:
                    handle = owned = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
                except FileNotFoundError:
                    continue
            if drain(handle):
                continue
            held = os.fstat(handle.fileno()).st_ino
            if _inode(path) == held:
                time.sleep(POLL_S)
                continue
            # Rotated: finish the file we hold, then the newer rotated files, oldest first, then the new `path`.
            drain(handle)
            newer = _files_after(path, held)
            if owned is not None:
                owned.close()
            handle = owned = None
            for p in newer:
                try:
                    with open(p, encoding="utf-8", errors="replace") as h:
                        drain(h)
                except FileNotFoundError:
                    continue
    finally:
        if owned is not None:
            owned.close()


def _files_after(path: str, inode: int) -> list[str]:
    """The rotated files newer than the one with `inode` (not `path` itself), oldest first."""
    files = [p for p in rotated_paths(path) if p != path]
    for i, p in enumerate(files):
        if _inode(p) == inode:
            return files[i + 1:]
    return []


# --- the server ---------------------------------------------------------------------------------------


def _from_server(path: str, request: dict[str, Any], printer: _Printer) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        return _fail(f"no flow server at {path} (is the agent running? a gateway serves one with --socket)")
    except OSError as e:
        sock.close()
        return _fail(f"cannot connect to {path}: {e.strerror}")
    with sock, sock.makefile("rwb") as stream:
        stream.write((json.dumps(request) + "\n").encode())
        stream.flush()
        for raw in stream:
            line = raw.decode("utf-8", "replace")
            parsed = parse_line(line)
            if parsed is not None:
                printer.flow(*parsed)
                continue
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if isinstance(message, dict) and "error" in message:
                    return _fail(f"the server refused the request: {message['error']}")
                if isinstance(message, dict) and "lost_events" in message:
                    lost = message["lost_events"].get("num_events_lost", "?")
                    print(f"membrane observe: {lost} flows lost (this client read too slowly)", file=sys.stderr)
    return 0
