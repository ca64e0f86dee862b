"""The HTTPS front of the API server double: routing, bearer-token auth, content negotiation, watches.

Theory of operation: one asyncio task per TCP connection drives an h11 server connection; each request
is routed by its path (discovery, OpenAPI, or /api/v1 | /apis/<g>/<v> resource paths, namespaced or not,
with an optional subresource) and answered from the Store, as JSON (a Table when `Accept` names
`as=Table`, aggregated discovery when it names `as=APIGroupDiscoveryList`). A watch holds its connection:
it subscribes to the Store before reading the backlog (nothing runs between the two, so no event is
lost), then streams one JSON line per event in chunked encoding until timeoutSeconds, a fault, or the
client leaves. Faults for tests: cut every watch, compact history, rotate tokens, inject error answers,
restart on the same port with or without the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import yaml
from membrane.sandbox.apiserver import discovery, protobuf, tables
from membrane.sandbox.apiserver.protobuf import ProtobufError
from membrane.sandbox.apiserver.resources import ResourceType, by_group_version
from membrane.sandbox.apiserver.selectors import (
    FieldRequirement,
    Requirement,
    SelectorError,
    fields_match,
    labels_match,
    parse_field_selector,
    parse_label_selector,
)
from membrane.sandbox.apiserver.store import ApiError, Event, Store, bad_request, resource_type
from membrane.sandbox.apiserver.tls import TlsFiles, ensure_certificates, write_kubeconfig

log = logging.getLogger(__name__)
Obj = dict[str, Any]

_MAX_BODY_BYTES = 3 * 1024 * 1024  # kube-apiserver's limit on a request body (3 MiB, etcd's value size)
_BODY_TYPES = frozenset({"application/json", "application/yaml", "application/merge-patch+json",
                         "application/json-patch+json", "application/strategic-merge-patch+json",
                         "application/apply-patch+yaml"})
# Requests answered without a token, like the real server's health probes (system:public-info-viewer).
_UNAUTHENTICATED_PATHS = frozenset({"/healthz", "/livez", "/readyz"})


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRecord:
    """One answered request, kept for tests: what clients actually asked for."""

    method: str
    target: str
    content_type: str
    accept: str
    status: int


@dataclass(slots=True)
class _Injected:
    count: int
    code: int
    path_prefix: str


@dataclass(frozen=True, slots=True, kw_only=True)
class _Route:
    rt: ResourceType
    namespace: str | None   # None: all namespaces (or a cluster-scoped type)
    name: str
    subresource: str
    legacy_watch: bool


def _status_ok(rt: ResourceType, obj: Obj) -> Obj:
    meta = obj.get("metadata") or {}
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": {"name": meta.get("name", ""), "group": rt.group, "kind": rt.plural, "uid": meta.get("uid", "")}}


class ApiServer:
    """A Kubernetes API server double on one loopback port, HTTPS with bearer tokens.

        server = ApiServer(state_dir=tmp)        # port 0: an ephemeral port, kept across restarts
        await server.start()
        server.write_kubeconfig(tmp / "kubeconfig")
    """

    def __init__(self, *, state_dir: Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 history_size: int = 10_000, bookmark_interval_s: float = 5.0, store: Store | None = None,
                 advertise_address: str | None = None, default_node: str | None = None,
                 now: Callable[[], float] = time.time) -> None:
        self.state_dir = state_dir
        self.host = host
        # The address the default/kubernetes EndpointSlice names (what pods would dial); default: host.
        self.advertise_address = advertise_address or host
        self.port = port
        self.token = token or secrets.token_urlsafe(24)
        self._tokens = {self.token}
        # The current token, also as a file: kubeconfigs written with use_token_file=True point at it
        # (client-go re-reads a tokenFile), so a rotation reaches clients that re-read it.
        self.token_file = state_dir / "token"
        self.history_size = history_size
        self.bookmark_interval_s = bookmark_interval_s
        self._now = now
        self.default_node = default_node
        self.store = store or Store(history_size=history_size, now=now)
        self.store.default_node = default_node
        self.tls: TlsFiles = ensure_certificates(state_dir)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        # Open watch streams: their connection -> what they watch (for cut_watches and watching_resources).
        self._watches: dict[asyncio.StreamWriter, str] = {}
        self._injected: list[_Injected] = []
        self.requests: deque[RequestRecord] = deque(maxlen=2000)
        self._seeded = False

    # ---- lifetime ---------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.tls.cert, self.tls.key)
        ctx.set_alpn_protocols(["http/1.1"])  # no h2: Go clients then speak HTTP/1.1, one watch per connection
        return ctx

    async def start(self) -> None:
        """Listens (on the port it had before, after a restart) and seeds the default objects once."""
        self._server = await asyncio.start_server(self._serve_connection, self.host, self.port,
                                                  ssl=self._ssl_context(), reuse_address=True, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        if not self._seeded:
            self.store.seed_defaults(server_ip=self.advertise_address, server_port=self.port)
            self._seeded = True

    async def stop(self) -> None:
        """Stops listening and drops every connection (clients see resets, as when an apiserver dies)."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):
                writer.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        self._connections.clear()
        self._watches.clear()

    async def restart(self, *, keep_data: bool = True) -> None:
        """Stops and starts again on the same port. Without data, the store starts empty (defaults
        seeded again) at a resourceVersion above every earlier one, so old versions answer 410."""
        await self.stop()
        if not keep_data:
            self.reset_data()
        await self.start()

    def reset_data(self) -> None:
        """Forgets every object (as a lost etcd would); the next start() seeds the defaults again. The RV
        counter continues above every earlier version, so clients holding old versions get 410."""
        self.store = Store(history_size=self.history_size, start_rv=self.store.resource_version + 1, now=self._now)
        self.store.default_node = self.default_node
        self._seeded = False

    def write_kubeconfig(self, path: Path | None = None, *, use_token_file: bool = False) -> Path:
        """Writes a kubeconfig for this server (URL, CA, and the current token inline, or with
        use_token_file the path of a file holding it, rewritten on rotation). Returns its path."""
        self._write_token_file()
        return write_kubeconfig(path or self.state_dir / "kubeconfig", server=self.url, ca_cert=self.tls.ca_cert,
                                token=self.token, token_file=self.token_file if use_token_file else None)

    def _write_token_file(self) -> None:
        tmp = self.token_file.with_suffix(".tmp")
        tmp.write_text(self.token)
        tmp.chmod(0o600)
        tmp.replace(self.token_file)  # atomic: a reader sees the old token or the new one, never a partial file

    # ---- faults -----------------------------------------------------------------------------------------

    def cut_watches(self) -> int:
        """Aborts every open watch connection mid-stream. Returns how many were cut."""
        cut = list(self._watches)
        for writer in cut:
            writer.transport.abort()
        self._watches.clear()
        return len(cut)

    def compact(self) -> None:
        """Forgets the whole event history: any watch or continue from an earlier version gets 410."""
        self.store.compact()

    def rotate_token(self, new: str | None = None) -> str:
        """Replaces every accepted token with a new one (returned); the old ones get 401 from now on."""
        self.token = new or secrets.token_urlsafe(24)
        self._tokens = {self.token}
        self._write_token_file()
        return self.token

    def add_token(self, token: str) -> None:
        """Accepts one more bearer token (e.g. an agent's service account next to the admin's)."""
        self._tokens.add(token)

    def inject_errors(self, count: int, *, code: int = 500, path_prefix: str = "") -> None:
        """Answers the next `count` requests whose path starts with path_prefix with a Status of `code`."""
        self._injected.append(_Injected(count=count, code=code, path_prefix=path_prefix))

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    def watching_resources(self) -> list[str]:
        """The resource of each open watch ("pods", "ciliumnetworkpolicies.cilium.io"), sorted: lets a
        test wait until a client has (re-)established its watches before it injects the next fault."""
        return sorted(self._watches.values())

    # ---- HTTP -------------------------------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while True:
                try:
                    request, body = await self._read_request(conn, reader)
                except ApiError as e:  # a body over the limit
                    await self._send(conn, writer, e.code, e.status())
                    conn.start_next_cycle()
                    continue
                if request is None:
                    break
                await self._dispatch(conn, reader, writer, request, body)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, h11.RemoteProtocolError):
            pass
        except Exception:
            log.exception("apiserver double: connection failed")
        finally:
            self._connections.discard(writer)
            self._watches.pop(writer, None)
            if writer.transport.is_closing():
                writer.transport.abort()
            else:
                writer.close()

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader) -> tuple[h11.Request | None,
                                                                                                bytes]:
        request: h11.Request | None = None
        body = bytearray()
        too_large = False
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and request is None and conn.their_state is h11.IDLE:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                # Past the limit the rest is read and dropped, so the client gets to read our 413.
                too_large = too_large or len(body) + len(event.data) > _MAX_BODY_BYTES
                if not too_large:
                    body += event.data
            elif isinstance(event, h11.EndOfMessage):
                if too_large:
                    raise ApiError(413, "RequestEntityTooLarge",
                                   f"Request entity too large: limit is {_MAX_BODY_BYTES} bytes")
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, body: Obj | bytes,
                    content_type: str = "application/json", extra: list[tuple[str, str]] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
        headers = [("Content-Type", content_type), ("Content-Length", str(len(data))),
                   ("Cache-Control", "no-cache, private"), ("Audit-Id", str(uuid.uuid4())), *(extra or [])]
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        writer.write(conn.send(h11.Data(data=data)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    async def _dispatch(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        request: h11.Request, body: bytes) -> None:
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
        method = request.method.decode()
        target = request.target.decode("latin-1")
        split = urlsplit(target)
        path = unquote(split.path).rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        accept = headers.get("accept", "")

        def record(status: int) -> None:
            # Recorded before the answer is sent, so a client that has its answer finds its request here.
            self.requests.append(RequestRecord(method=method, target=target,
                                               content_type=headers.get("content-type", ""), accept=accept,
                                               status=status))

        try:
            self._check_auth(path, headers.get("authorization", ""))
            self._check_injected(path)
            answer = await self._route(conn, reader, writer, method, path, query, headers, body, record)
        except ApiError as e:
            extra = [("Retry-After", "1")] if e.code in (429, 503, 504) else []
            if e.code == 401:
                extra.append(("WWW-Authenticate", 'Bearer realm="kubernetes"'))
            record(e.code)
            await self._send(conn, writer, e.code, e.status(), extra=extra)
            return
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as e:
            # The one error boundary: a bug answers this request with a 500 Status; the server serves on.
            log.exception("apiserver double: %s %s failed", method, target)
            if conn.our_state is not h11.SEND_RESPONSE:
                raise
            record(500)
            await self._send(conn, writer, 500, ApiError(500, "InternalError", f"internal error: {e!r}").status())
            return
        if answer is not None:
            record(answer[0])
            await self._send(conn, writer, answer[0], answer[1], content_type=self._content_type(path, accept))

    def _content_type(self, path: str, accept: str) -> str:
        if path in ("/api", "/apis") and "as=APIGroupDiscoveryList" in accept:
            return discovery.AGGREGATED_MEDIA_TYPE
        return "application/json"

    def _check_auth(self, path: str, authorization: str) -> None:
        if path in _UNAUTHENTICATED_PATHS:
            return
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in self._tokens:
            raise ApiError(401, "Unauthorized", "Unauthorized")

    def _check_injected(self, path: str) -> None:
        for inj in self._injected:
            if inj.count > 0 and path.startswith(inj.path_prefix):
                inj.count -= 1
                reason = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
                          504: "Timeout"}.get(inj.code, "InternalError")
                raise ApiError(inj.code, reason, f"injected fault ({inj.code})")
        self._injected = [i for i in self._injected if i.count > 0]

    # ---- routing ----------------------------------------------------------------------------------------

    async def _route(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     method: str, path: str, query: dict[str, str], headers: dict[str, str],
                     body: bytes, record: Callable[[int], None]) -> tuple[int, Obj | bytes] | None:
        accept = headers.get("accept", "")
        aggregated = "as=APIGroupDiscoveryList" in accept
        match path:
            case "/healthz" | "/livez" | "/readyz":
                return 200, b"ok"
            case "/version":
                return 200, discovery.KUBE_VERSION
            case "/api":
                return 200, discovery.aggregated(True) if aggregated else discovery.api_versions(
                    f"{self.host}:{self.port}")
            case "/apis":
                return 200, discovery.aggregated(False) if aggregated else discovery.api_group_list()
            case "/openapi/v3":
                return 200, discovery.openapi_v3_root()
            case "/openapi/v2":
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
        parts = path.strip("/").split("/")
        if parts[:2] == ["openapi", "v3"]:
            rest = parts[2:]
            doc = None
            if rest[:1] == ["api"] and len(rest) == 2:
                doc = discovery.openapi_v3_document("", rest[1])
            elif rest[:1] == ["apis"] and len(rest) == 3:
                doc = discovery.openapi_v3_document(rest[1], rest[2])
            if doc is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return 200, doc
        if parts[0] == "api" and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 2:
            if len(parts) == 2:
                grp = discovery.api_group(parts[1])
                if grp is None:
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                return 200, grp
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            doc = discovery.api_resource_list(group, version)
            if doc is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return 200, doc
        route = self._resolve(group, version, rest)
        return await self._resource(conn, reader, writer, method, route, query, headers, body, record)

    def _resolve(self, group: str, version: str, rest: list[str]) -> _Route:
        legacy_watch = rest[0] == "watch"
        if legacy_watch:
            rest = rest[1:]
        types = by_group_version(group, version)
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in types and types[rest[2]].namespaced:
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        rt = resource_type(group, version, rest[0])
        name = rest[1] if len(rest) >= 2 else ""
        sub = rest[2] if len(rest) == 3 else ""
        if sub and not ((sub == "status" and rt.has_status) or (sub == "binding" and rt.kind == "Pod" and not group)):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if rt.namespaced and name and namespace is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return _Route(rt=rt, namespace=namespace, name=name, subresource=sub, legacy_watch=legacy_watch)

    @staticmethod
    def _parse_body(headers: dict[str, str], body: bytes) -> Any:
        ctype = headers.get("content-type", "application/json").split(";")[0].strip()
        if ctype == "application/vnd.kubernetes.protobuf":
            try:
                return protobuf.decode(body)
            except ProtobufError as e:
                raise ApiError(415, "UnsupportedMediaType", str(e)) from None
        if ctype not in _BODY_TYPES:
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - accepted "
                           f"media types include: {', '.join(sorted(_BODY_TYPES))}")
        try:
            if ctype == "application/apply-patch+yaml" or ctype.endswith("yaml"):
                return yaml.safe_load(body)
            return json.loads(body)
        except (ValueError, yaml.YAMLError) as e:
            raise bad_request(f"the body of the request could not be decoded as {ctype}: {e}") from None

    async def _resource(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        method: str, route: _Route, query: dict[str, str], headers: dict[str, str],
                        body: bytes, record: Callable[[int], None]) -> tuple[int, Obj | bytes] | None:
        rt, ns, name, sub = route.rt, route.namespace, route.name, route.subresource
        store = self.store
        dry_run = query.get("dryRun") == "All"
        strict = query.get("fieldValidation") == "Strict"
        as_table = "as=Table" in headers.get("accept", "")
        try:
            labels = parse_label_selector(query.get("labelSelector", ""))
            fields = parse_field_selector(query.get("fieldSelector", ""), rt.selectable_fields)
        except SelectorError as e:
            raise bad_request(str(e)) from None
        ns_key = ns or ""
        if method == "GET" and (route.legacy_watch or query.get("watch") in ("1", "true")):
            if name:
                fields = (*fields, FieldRequirement(path="metadata.name", equal=True, value=name))
            await self._watch(conn, reader, writer, rt, ns, labels, fields, query, as_table, record)
            return None
        if not name:
            match method:
                case "GET":
                    page = store.list_objects(rt, namespace=ns, labels=labels, fields=fields,
                                      limit=_int(query.get("limit", "0"), "limit"),
                                      continue_token=query.get("continue", ""),
                                      resource_version=query.get("resourceVersion", ""),
                                      exact=query.get("resourceVersionMatch") == "Exact")
                    if as_table:
                        return 200, tables.table(rt, page.items, self._now(), resource_version=str(page.resource_version),
                                                 continue_token=page.continue_token or "", remaining=page.remaining)
                    meta: Obj = {"resourceVersion": str(page.resource_version)}
                    if page.continue_token:
                        meta["continue"] = page.continue_token
                    if page.remaining is not None:
                        meta["remainingItemCount"] = page.remaining
                    return 200, {"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": meta,
                                 "items": page.items}
                case "POST":
                    if rt.namespaced and ns is None:
                        raise ApiError(404, "NotFound", "the server could not find the requested resource")
                    return 201, store.create(rt, ns_key, self._parse_body(headers, body), dry_run=dry_run,
                                             strict=strict)
                case "DELETE":
                    deleted = store.delete_collection(rt, ns, labels, fields, dry_run=dry_run)
                    return 200, {"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                                 "metadata": {"resourceVersion": str(store.resource_version)}, "items": deleted}
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        match method:
            case "GET":
                obj = store.get(rt, ns_key, name)
                if as_table:
                    return 200, tables.table(rt, [obj], self._now(), resource_version=obj["metadata"]["resourceVersion"])
                return 200, obj
            case "POST" if sub == "binding":
                store.bind(ns_key, name, self._parse_body(headers, body), dry_run=dry_run)
                return 201, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}
            case _ if sub == "binding":
                raise ApiError(405, "MethodNotAllowed", "pods/binding only takes POST")
            case "PUT":
                return 200, store.update(rt, ns_key, name, self._parse_body(headers, body), subresource=sub,
                                         dry_run=dry_run, strict=strict)
            case "PATCH":
                ptype = headers.get("content-type", "").split(";")[0].strip()
                before = _exists(store, rt, ns_key, name)
                obj = store.patch(rt, ns_key, name, ptype, self._parse_body(headers, body), subresource=sub,
                                  dry_run=dry_run, field_manager=query.get("fieldManager", ""), strict=strict)
                return (200 if before else 201), obj
            case "DELETE":
                options = self._parse_body(headers, body) if body.strip() else None
                obj = store.delete(rt, ns_key, name, options=options, dry_run=dry_run)
                still_there = _exists(store, rt, ns_key, name)
                return 200, obj if still_there or dry_run else _status_ok(rt, obj)
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    # ---- watch ------------------------------------------------------------------------------------------

    async def _watch(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     rt: ResourceType, namespace: str | None, labels: tuple[Requirement, ...],
                     fields: tuple[FieldRequirement, ...], query: dict[str, str], as_table: bool,
                     record: Callable[[int], None]) -> None:
        store = self.store
        timeout_s = _int(query.get("timeoutSeconds", "0"), "timeoutSeconds") or 1800
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        rv = query.get("resourceVersion", "")
        initial_events = query.get("sendInitialEvents") in ("1", "true")
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def matches(obj: Obj | None) -> bool:
            if obj is None:
                return False
            if namespace is not None and obj["metadata"].get("namespace") != namespace:
                return False
            return labels_match(labels, obj) and fields_match(fields, obj)

        def on_event(ev: Event) -> None:
            if ev.rtype is rt:
                queue.put_nowait(ev)

        # Subscribe first, then read the backlog: no await in between, so no event falls in a gap.
        unsubscribe = store.subscribe(on_event)
        lines: list[bytes] = []
        error: ApiError | None = None
        last_rv = store.resource_version
        first_table = [True]

        def encode(type_: str, obj: Obj, ev: Event | None = None) -> bytes:
            if as_table and type_ in ("ADDED", "MODIFIED", "DELETED"):
                tbl = tables.table(rt, [obj], self._now(), include_columns=first_table[0])
                first_table[0] = False
                return json.dumps({"type": type_, "object": tbl}, separators=(",", ":")).encode() + b"\n"
            if ev is not None and ev.type == type_:
                return ev.json_line()
            return json.dumps({"type": type_, "object": obj}, separators=(",", ":")).encode() + b"\n"

        def bookmark(rv_: int, *, initial_end: bool = False) -> bytes:
            meta: Obj = {"resourceVersion": str(rv_)}
            if initial_end:
                meta["annotations"] = {"k8s.io/initial-events-end": "true"}
            return json.dumps({"type": "BOOKMARK", "object": {"kind": rt.kind, "apiVersion": rt.api_version,
                                                               "metadata": meta}},
                              separators=(",", ":")).encode() + b"\n"

        def translate(ev: Event) -> bytes | None:
            was, now_ = matches(ev.prev), matches(ev.obj)
            if ev.type == "DELETED":
                return encode("DELETED", ev.obj, ev) if now_ else None
            if was and now_:
                return encode("MODIFIED", ev.obj, ev)
            if now_:
                return encode("ADDED", ev.obj, ev)
            if was and ev.prev is not None:
                # It left the selection: the watcher sees it go, as the last state it matched in, at this
                # event's resourceVersion (what the real watch cache sends).
                gone = {**ev.prev, "metadata": {**ev.prev["metadata"], "resourceVersion": str(ev.rv)}}
                return encode("DELETED", gone)
            return None

        if rv in ("", "0"):
            for obj in store.objects(rt, namespace):
                if matches(obj):
                    lines.append(encode("ADDED", obj))
            if initial_events and bookmarks:
                lines.append(bookmark(last_rv, initial_end=True))
        else:
            wanted = _int(rv, "resourceVersion")
            if wanted > store.resource_version:
                unsubscribe()
                raise ApiError(504, "Timeout", f"Too large resource version: {wanted}, current: "
                               f"{store.resource_version}", {"causes": [{"reason": "ResourceVersionTooLarge",
                                                                         "message": "Too large resource version"}],
                                                             "retryAfterSeconds": 1})
            try:
                backlog = store.events_after(wanted)
            except ApiError as e:
                error = e
                backlog = []
            if initial_events:
                error = error or bad_request("sendInitialEvents is only supported with resourceVersion \"\" or \"0\"")
            for ev in backlog:
                if ev.rtype is rt and (line := translate(ev)) is not None:
                    lines.append(line)
        if error is not None:
            unsubscribe()
            if error.code != 410:
                raise error
            lines = [json.dumps({"type": "ERROR", "object": error.status()}, separators=(",", ":")).encode() + b"\n"]

        record(200)
        headers = [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked"),
                   ("Cache-Control", "no-cache, private"), ("Audit-Id", str(uuid.uuid4()))]
        writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
        if lines:
            writer.write(conn.send(h11.Data(data=b"".join(lines))))
        await writer.drain()
        if error is not None:
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            return
        self._watches[writer] = f"{rt.plural}.{rt.group}" if rt.group else rt.plural
        deadline = time.monotonic() + timeout_s
        next_bookmark = time.monotonic() + self.bookmark_interval_s
        eof = asyncio.ensure_future(reader.read(1))  # a watch client sends nothing more; data or EOF ends it
        try:
            while True:
                now_m = time.monotonic()
                if now_m >= deadline:
                    break
                wait_s = min(deadline, next_bookmark) - now_m
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, eof}, timeout=max(0.0, wait_s),
                                             return_when=asyncio.FIRST_COMPLETED)
                if eof in done:
                    getter.cancel()
                    raise ConnectionResetError("watch client went away")
                out: list[bytes] = []
                if getter in done:
                    evs = [getter.result()]
                    while not queue.empty():
                        evs.append(queue.get_nowait())
                    for ev in evs:
                        if (line := translate(ev)) is not None:
                            out.append(line)
                    last_rv = evs[-1].rv
                else:
                    getter.cancel()
                if bookmarks and time.monotonic() >= next_bookmark:
                    out.append(bookmark(max(last_rv, store.resource_version)))
                if time.monotonic() >= next_bookmark:
                    next_bookmark = time.monotonic() + self.bookmark_interval_s
                if out:
                    writer.write(conn.send(h11.Data(data=b"".join(out))))
                    await writer.drain()
            if bookmarks:
                # The real server sends a last bookmark before it ends a watch at its timeout.
                writer.write(conn.send(h11.Data(data=bookmark(max(last_rv, store.resource_version)))))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
        finally:
            unsubscribe()
            eof.cancel()
            self._watches.pop(writer, None)


def _exists(store: Store, rt: ResourceType, namespace: str, name: str) -> bool:
    try:
        store.get(rt, namespace, name)
    except ApiError:
        return False
    return True


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise bad_request(f"invalid {name}: {value!r} is not an integer") from None
