"""Compiled topic readers for Kafka request bodies, built from Apache Kafka's message schemas.

Owns the hot-path walk over one request body: it skips every field except the ones that name topics
(`entityType: topicName`, `TopicId` uuids, topic resources of the config APIs) and Produce's `Acks`.
The schemas are the JSON message definitions that kafka-python ships (`kafka/protocol/schemas/resources`,
Kafka 4.1's set); nothing here decodes into kafka-python objects, so the walk stays fast and its
failure modes are ours: every problem is `SchemaError`, which `parsers.kafka` turns into a ParseError.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kafka.protocol.schemas import load_json

JsonObj = dict[str, Any]

_INT16 = struct.Struct(">h")
_INT32 = struct.Struct(">i")
_FIXED_SIZES = {"bool": 1, "int8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4, "int64": 8, "float64": 8, "uuid": 16}
_TOPIC_RESOURCE_TYPE = 2  # ConfigResource.Type.TOPIC (DescribeConfigs, AlterConfigs, IncrementalAlterConfigs)


class SchemaError(Exception):
    """The body does not follow the schema of its api key and version (truncated, bad length, bad UTF-8)."""


class Found:
    """What one walk collected. Mutable scratch, private to one parse."""

    __slots__ = ("acks", "resource_type", "topic_ids", "topics")

    def __init__(self) -> None:
        self.topics: list[str] = []
        self.topic_ids: list[str] = []
        self.acks: int | None = None
        self.resource_type: int | None = None


Step = Callable[[bytes, int, Found], int]


@dataclass(frozen=True, slots=True)
class ApiSchema:
    """One api key's request schema: its versions, flexible versions, and whether any version names topics."""

    api_key: int
    name: str  # Kafka's CamelCase name without "Request", e.g. "OffsetCommit"
    min_version: int
    max_version: int
    first_flexible: int | None  # None when no version is flexible
    names_topics: bool
    request: JsonObj
    response: JsonObj

    def is_flexible(self, version: int) -> bool:
        return self.first_flexible is not None and version >= self.first_flexible


def _versions(spec: str | None) -> tuple[int, int] | None:
    if spec is None or spec.strip() == "" or spec.strip() == "none":
        return None
    spec = spec.strip()
    if spec.endswith("+"):
        return int(spec[:-1]), 32767
    if "-" in spec:
        lo, hi = spec.split("-")
        return int(lo), int(hi)
    return int(spec), int(spec)


def _in(spec: str | None, version: int) -> bool:
    rng = _versions(spec)
    return rng is not None and rng[0] <= version <= rng[1]


def _is_topic_name(field: JsonObj) -> bool:
    return field.get("entityType") == "topicName"


def _is_topic_id(field: JsonObj) -> bool:
    return bool(field["type"] == "uuid" and field["name"] == "TopicId")


def _names_topics(fields: list[JsonObj]) -> bool:
    for f in fields:
        if _is_topic_name(f) or _is_topic_id(f) or f["name"] == "ResourceName":
            return True
        if "fields" in f and _names_topics(f["fields"]):
            return True
    return False


@functools.cache
def api_schemas() -> dict[int, ApiSchema]:
    """Every request schema kafka-python ships, by api key."""
    package = "kafka.protocol.schemas.resources"
    out: dict[int, ApiSchema] = {}
    for entry in importlib.resources.files(package).iterdir():
        m = re.fullmatch(r"(\w+)Request\.json", entry.name)
        if m is None or m.group(1) == "":
            continue
        req = load_json(m.group(0)[: -len(".json")])
        if req.get("type") != "request":
            continue
        resp = load_json(m.group(1) + "Response")
        valid = _versions(req["validVersions"])
        assert valid is not None
        flexible = _versions(req.get("flexibleVersions"))
        out[req["apiKey"]] = ApiSchema(
            api_key=req["apiKey"],
            name=m.group(1),
            min_version=valid[0],
            max_version=valid[1],
            first_flexible=flexible[0] if flexible else None,
            names_topics=_names_topics(req["fields"]),
            request=req,
            response=resp,
        )
    return out


# --- primitive readers ---------------------------------------------------------------------------


def read_uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    """An unsigned varint of at most 5 bytes (32 bits), as KIP-482 compact lengths and tags use."""
    value = 0
    for shift in range(0, 35, 7):
        if pos >= len(buf):
            raise SchemaError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if value > 0xFFFFFFFF:
                raise SchemaError("varint out of range")
            return value, pos
    raise SchemaError("varint longer than 5 bytes")


def _length(buf: bytes, pos: int, compact: bool, wide: bool) -> tuple[int, int]:
    """A length prefix: compact (uvarint N+1, 0 = null) or classic int16/int32 (-1 = null). -1 means null."""
    if compact:
        n, pos = read_uvarint(buf, pos)
        return n - 1, pos
    if wide:
        if pos + 4 > len(buf):
            raise SchemaError("truncated length")
        return _INT32.unpack_from(buf, pos)[0], pos + 4
    if pos + 2 > len(buf):
        raise SchemaError("truncated length")
    return _INT16.unpack_from(buf, pos)[0], pos + 2


def skip_tagged(buf: bytes, pos: int) -> int:
    count, pos = read_uvarint(buf, pos)
    if count > len(buf) - pos:
        raise SchemaError("tagged field count larger than the body")
    for _ in range(count):
        _tag, pos = read_uvarint(buf, pos)
        size, pos = read_uvarint(buf, pos)
        pos += size
        if pos > len(buf):
            raise SchemaError("truncated tagged field")
    return pos


# --- compiling a schema into steps -----------------------------------------------------------------


def _skip_fixed(n: int) -> Step:
    def step(buf: bytes, pos: int, found: Found) -> int:
        pos += n
        if pos > len(buf):
            raise SchemaError("truncated fixed-size field")
        return pos

    return step


def _string_step(compact: bool, nullable: bool, collect: str | None) -> Step:
    def step(buf: bytes, pos: int, found: Found) -> int:
        n, pos = _length(buf, pos, compact, wide=False)
        if n < 0:
            if n != -1 or not nullable:
                raise SchemaError("negative string length")
            return pos
        end = pos + n
        if end > len(buf):
            raise SchemaError("truncated string")
        if collect is not None and (collect == "topic" or found.resource_type == _TOPIC_RESOURCE_TYPE):
            try:
                found.topics.append(buf[pos:end].decode("utf-8"))
            except UnicodeDecodeError as e:
                raise SchemaError("topic name is not UTF-8") from e
        return end

    return step


def _bytes_step(compact: bool, nullable: bool) -> Step:
    def step(buf: bytes, pos: int, found: Found) -> int:
        n, pos = _length(buf, pos, compact, wide=True)
        if n < 0:
            if n != -1 or not nullable:
                raise SchemaError("negative bytes length")
            return pos
        pos += n
        if pos > len(buf):
            raise SchemaError("truncated bytes")
        return pos

    return step


def _uuid_step() -> Step:
    def step(buf: bytes, pos: int, found: Found) -> int:
        end = pos + 16
        if end > len(buf):
            raise SchemaError("truncated uuid")
        found.topic_ids.append(buf[pos:end].hex())
        return end

    return step


def _acks_step() -> Step:
    def step(buf: bytes, pos: int, found: Found) -> int:
        if pos + 2 > len(buf):
            raise SchemaError("truncated acks")
        found.acks = _INT16.unpack_from(buf, pos)[0]
        return pos + 2

    return step


def _resource_type_step() -> Step:
    def step(buf: bytes, pos: int, found: Found) -> int:
        if pos + 1 > len(buf):
            raise SchemaError("truncated resource type")
        found.resource_type = buf[pos]
        return pos + 1

    return step


def _array_step(elem: Step | int, compact: bool, nullable: bool) -> Step:
    fixed = elem if isinstance(elem, int) else None
    elem_step = None if isinstance(elem, int) else elem

    def step(buf: bytes, pos: int, found: Found) -> int:
        n, pos = _length(buf, pos, compact, wide=True)
        if n < 0:
            if n != -1 or not nullable:
                raise SchemaError("negative array length")
            return pos
        if n > len(buf) - pos:  # every element takes at least one byte: no count beyond the body
            raise SchemaError("array count larger than the body")
        if fixed is not None:
            pos += n * fixed
            if pos > len(buf):
                raise SchemaError("truncated array")
            return pos
        assert elem_step is not None
        for _ in range(n):
            pos = elem_step(buf, pos, found)
        return pos

    return step


def _struct_step(steps: list[Step]) -> Step:
    if len(steps) == 1:
        return steps[0]

    def step(buf: bytes, pos: int, found: Found) -> int:
        for s in steps:
            pos = s(buf, pos, found)
        return pos

    return step


def _nullable_struct_step(inner: Step) -> Step:
    def step(buf: bytes, pos: int, found: Found) -> int:
        if pos >= len(buf):
            raise SchemaError("truncated struct marker")
        marker = buf[pos]
        if marker == 0xFF:  # int8 -1: null struct
            return pos + 1
        if marker != 1:
            raise SchemaError("bad struct presence marker")
        return inner(buf, pos + 1, found)

    return step


def _tagged_step(buf: bytes, pos: int, found: Found) -> int:
    return skip_tagged(buf, pos)


def compile_fields(fields: list[JsonObj], version: int, flexible: bool, *, top: bool = False,
                   api_key: int = -1) -> Step:
    """Steps that walk one struct of `fields` at `version`; flexible structs end with a tagged-field section."""
    steps: list[Step] = []
    pending_fixed = 0

    def flush() -> None:
        nonlocal pending_fixed
        if pending_fixed:
            steps.append(_skip_fixed(pending_fixed))
            pending_fixed = 0

    for f in fields:
        if not _in(f.get("versions"), version):
            continue
        if flexible and _in(f.get("taggedVersions"), version):
            # Tagged fields travel in the section at the end of the struct. No request schema puts a
            # topic in a tagged field (tests/parsers/test_kafka.py checks it), so they are skipped there.
            continue
        ftype: str = f["type"]
        nullable = _in(f.get("nullableVersions"), version)
        compact = flexible and f.get("flexibleVersions") != "none"  # RequestHeader ClientId stays classic
        if ftype.startswith("[]"):
            inner = ftype[2:]
            elem: Step | int
            if inner in _FIXED_SIZES:
                elem = _FIXED_SIZES[inner]
            elif inner == "string":  # e.g. DeleteTopics v0-5 TopicNames: an array of topic names
                elem = _string_step(compact, False, "topic" if _is_topic_name(f) else None)
            elif inner in ("bytes", "records"):
                elem = _bytes_step(compact, False)
            else:
                elem = compile_fields(f["fields"], version, flexible)
            flush()
            steps.append(_array_step(elem, compact, nullable))
        elif ftype in _FIXED_SIZES:
            if _is_topic_id(f):
                flush()
                steps.append(_uuid_step())
            elif top and api_key == 0 and f["name"] == "Acks":
                flush()
                steps.append(_acks_step())
            elif f["name"] == "ResourceType" and ftype == "int8":
                flush()
                steps.append(_resource_type_step())
            else:
                pending_fixed += _FIXED_SIZES[ftype]
        elif ftype == "string":
            flush()
            collect = "topic" if _is_topic_name(f) else ("resource" if f["name"] == "ResourceName" else None)
            steps.append(_string_step(compact, nullable, collect))
        elif ftype in ("bytes", "records"):
            flush()
            steps.append(_bytes_step(compact, nullable))
        elif "fields" in f:
            flush()
            inner_step = compile_fields(f["fields"], version, flexible)
            steps.append(_nullable_struct_step(inner_step) if nullable else inner_step)
        else:
            raise ValueError(f"unsupported schema type {ftype!r} in field {f['name']}")
    flush()
    if flexible:
        steps.append(_tagged_step)
    if not steps:
        return lambda buf, pos, found: pos
    return _struct_step(steps)


def reference_reader(api_key: int, version: int) -> Step | None:
    """The walk as composed closures: slower, kept as the reference the generated reader is checked against."""
    return _reference_reader(api_key, version) if _has_schema(api_key, version) else None


@functools.cache
def _reference_reader(api_key: int, version: int) -> Step:
    schema = api_schemas()[api_key]
    return compile_fields(schema.request["fields"], version, schema.is_flexible(version), top=True, api_key=api_key)


# --- generated readers (the hot path) ---------------------------------------------------------------
# The same walk as compile_fields, emitted as one straight-line Python function per api key and
# version: no call per field, one-byte varints read inline. Reads past the end raise IndexError or
# struct.error, which parse_request turns into MalformedMessage like SchemaError.


class _Gen:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.n = 0

    def var(self, stem: str) -> str:
        self.n += 1
        return f"{stem}{self.n}"

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)


def _gen_uvarint(g: _Gen, ind: int, target: str) -> None:
    g.emit(ind, f"{target} = buf[pos]")
    g.emit(ind, f"if {target} < 0x80:")
    g.emit(ind + 1, "pos += 1")
    g.emit(ind, "else:")
    g.emit(ind + 1, f"{target}, pos = read_uvarint(buf, pos)")


def _gen_length(g: _Gen, ind: int, target: str, compact: bool, wide: bool, nullable: bool, what: str) -> None:
    """Emit `target = length` and leave the code at `ind` to run only when the value is not null."""
    if compact:
        _gen_uvarint(g, ind, target)
        g.emit(ind, f"{target} -= 1")
    elif wide:
        g.emit(ind, f"{target} = unpack_i(buf, pos)[0]")
        g.emit(ind, "pos += 4")
    else:
        g.emit(ind, f"{target} = unpack_h(buf, pos)[0]")
        g.emit(ind, "pos += 2")
    g.emit(ind, f"if {target} < 0 and {target} != -1{'' if nullable else ' or ' + target + ' == -1'}:")
    g.emit(ind + 1, f"raise SchemaError({('bad length of ' + what)!r})")


def _gen_fields(g: _Gen, ind: int, fields: list[JsonObj], version: int, flexible: bool, top: bool, api_key: int) -> None:
    fixed = 0

    def flush() -> None:
        nonlocal fixed
        if fixed:
            g.emit(ind, f"pos += {fixed}")
            g.emit(ind, "if pos > n:")
            g.emit(ind + 1, "raise SchemaError('truncated fixed-size fields')")
            fixed = 0

    for f in fields:
        if not _in(f.get("versions"), version):
            continue
        if flexible and _in(f.get("taggedVersions"), version):
            continue  # in the tagged section; no request tags a topic (see compile_fields)
        ftype: str = f["type"]
        name: str = f["name"]
        nullable = _in(f.get("nullableVersions"), version)
        compact = flexible and f.get("flexibleVersions") != "none"
        if ftype in _FIXED_SIZES and not (_is_topic_id(f) or (top and api_key == 0 and name == "Acks")
                                          or (name == "ResourceType" and ftype == "int8")):
            fixed += _FIXED_SIZES[ftype]
            continue
        flush()
        if ftype.startswith("[]"):
            inner = ftype[2:]
            c = g.var("c")
            _gen_length(g, ind, c, compact, True, nullable, name)
            g.emit(ind, f"if {c} > n - pos:")
            g.emit(ind + 1, f"raise SchemaError({('count of ' + name + ' larger than the body')!r})")
            if inner in _FIXED_SIZES:
                g.emit(ind, f"if {c} > 0:")
                g.emit(ind + 1, f"pos += {c} * {_FIXED_SIZES[inner]}")
                g.emit(ind + 1, "if pos > n:")
                g.emit(ind + 2, f"raise SchemaError({('truncated ' + name)!r})")
                continue
            g.emit(ind, f"for _ in range({c}):")
            if inner == "string" or inner in ("bytes", "records"):
                _gen_string(g, ind + 1, compact, False, "topic" if (inner == "string" and _is_topic_name(f)) else None,
                            name, wide=inner != "string")
            else:
                _gen_fields(g, ind + 1, f["fields"], version, flexible, False, api_key)
                g.emit(ind + 1, "pass")
        elif _is_topic_id(f):
            g.emit(ind, "e = pos + 16")
            g.emit(ind, "if e > n:")
            g.emit(ind + 1, "raise SchemaError('truncated uuid')")
            g.emit(ind, "ids.append(buf[pos:e].hex())")
            g.emit(ind, "pos = e")
        elif ftype in _FIXED_SIZES and name == "Acks":
            g.emit(ind, "found.acks = unpack_h(buf, pos)[0]")
            g.emit(ind, "pos += 2")
        elif ftype in _FIXED_SIZES:  # ResourceType
            g.emit(ind, "found.resource_type = buf[pos]")
            g.emit(ind, "pos += 1")
        elif ftype == "string":
            collect = "topic" if _is_topic_name(f) else ("resource" if name == "ResourceName" else None)
            _gen_string(g, ind, compact, nullable, collect, name, wide=False)
        elif ftype in ("bytes", "records"):
            _gen_string(g, ind, compact, nullable, None, name, wide=True)
        elif "fields" in f:
            if nullable:
                g.emit(ind, "marker = buf[pos]")
                g.emit(ind, "pos += 1")
                g.emit(ind, "if marker not in (1, 0xFF):")
                g.emit(ind + 1, "raise SchemaError('bad struct presence marker')")
                g.emit(ind, "if marker == 1:")
                _gen_fields(g, ind + 1, f["fields"], version, flexible, False, api_key)
                g.emit(ind + 1, "pass")
            else:
                _gen_fields(g, ind, f["fields"], version, flexible, False, api_key)
        else:
            raise ValueError(f"unsupported schema type {ftype!r} in field {name}")
    flush()
    if flexible:
        g.emit(ind, "if buf[pos] == 0:")
        g.emit(ind + 1, "pos += 1")
        g.emit(ind, "else:")
        g.emit(ind + 1, "pos = skip_tagged(buf, pos)")


def _gen_string(g: _Gen, ind: int, compact: bool, nullable: bool, collect: str | None, name: str, wide: bool) -> None:
    ln = g.var("l")
    _gen_length(g, ind, ln, compact, wide, nullable, name)
    g.emit(ind, f"if {ln} >= 0:")
    g.emit(ind + 1, f"e = pos + {ln}")
    g.emit(ind + 1, "if e > n:")
    g.emit(ind + 2, f"raise SchemaError({('truncated ' + name)!r})")
    if collect == "topic":
        g.emit(ind + 1, "topics.append(buf[pos:e].decode('utf-8'))")
    elif collect == "resource":
        g.emit(ind + 1, f"if found.resource_type == {_TOPIC_RESOURCE_TYPE}:")
        g.emit(ind + 2, "topics.append(buf[pos:e].decode('utf-8'))")
    g.emit(ind + 1, "pos = e")


def generate_source(api_key: int, version: int) -> str | None:
    """Python source of the generated reader for one api key and version (None: no schema)."""
    schema = api_schemas().get(api_key)
    if schema is None or not schema.min_version <= version <= schema.max_version:
        return None
    g = _Gen()
    g.emit(0, "def read(buf, pos, found):")
    g.emit(1, "n = len(buf)")
    g.emit(1, "topics = found.topics")
    g.emit(1, "ids = found.topic_ids")
    _gen_fields(g, 1, schema.request["fields"], version, schema.is_flexible(version), True, api_key)
    g.emit(1, "return pos")
    return "\n".join(g.lines) + "\n"


def _has_schema(api_key: int, version: int) -> bool:
    schema = api_schemas().get(api_key)
    return schema is not None and schema.min_version <= version <= schema.max_version


def request_reader(api_key: int, version: int) -> Step | None:
    """The generated walk of one request body, or None when this api key/version has no schema here.

    The reader returns the position after the body; it raises SchemaError, IndexError, struct.error or
    UnicodeDecodeError on a body that does not follow the schema. Only known pairs reach the cache,
    so hostile api keys and versions cannot grow it.
    """
    return _generated_reader(api_key, version) if _has_schema(api_key, version) else None


@functools.cache
def _generated_reader(api_key: int, version: int) -> Step:
    source = generate_source(api_key, version)
    assert source is not None
    namespace: dict[str, Any] = {
        "SchemaError": SchemaError, "read_uvarint": read_uvarint, "skip_tagged": skip_tagged,
        "unpack_h": _INT16.unpack_from, "unpack_i": _INT32.unpack_from,
    }
    exec(compile(source, f"<kafka reader {api_key} v{version}>", "exec"), namespace)
    reader: Step = namespace["read"]
    return reader


def tagged_topic_fields(fields: list[JsonObj]) -> list[str]:
    """Names of tagged fields that name topics (expected empty: see compile_fields)."""
    out = []
    for f in fields:
        if "tag" in f and (_is_topic_name(f) or _is_topic_id(f) or ("fields" in f and _names_topics(f["fields"]))):
            out.append(f["name"])
        if "fields" in f:
            out.extend(tagged_topic_fields(f["fields"]))
    return out
