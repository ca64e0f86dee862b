"""The Kubernetes protobuf request encoding, decoded for the few bodies kubectl sends that way.

kubectl's typed clients (`kubectl create namespace`, `create configmap`, `create serviceaccount`) POST
`application/vnd.kubernetes.protobuf` and do not fall back to JSON on 415. The envelope is the magic
`k8s\\x00` and a runtime.Unknown {typeMeta{apiVersion, kind}, raw}; `raw` is the object's message. This
module decodes the envelope, ObjectMeta's user-set fields (name, generateName, namespace, labels,
annotations, finalizers) and the bodies of Namespace, ConfigMap and ServiceAccount into the JSON form.
Anything else raises ProtobufError (the server answers 415 and names the kind). Never encodes.
"""

from __future__ import annotations

from typing import Any

MAGIC = b"k8s\x00"


class ProtobufError(ValueError):
    """A body this decoder cannot read (malformed, or a kind it has no schema for)."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ProtobufError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProtobufError("varint too long")


def fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """The (field number, value) pairs of one message: ints for varints, bytes for length-delimited."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            out.append((number, value))
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ProtobufError(f"field {number}: length {length} past the end")
            out.append((number, data[pos:pos + length]))
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ProtobufError(f"field {number}: unsupported wire type {wire}")
    return out


def _str(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise ProtobufError("expected a string")
    return value.decode()


def _map_entry(value: int | bytes) -> tuple[str, str]:
    if not isinstance(value, bytes):
        raise ProtobufError("expected a map entry")
    entry = dict(fields(value))
    return _str(entry.get(1, b"")), _str(entry.get(2, b""))


def _object_meta(data: bytes) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    names = {1: "name", 2: "generateName", 3: "namespace", 6: "resourceVersion"}
    for number, value in fields(data):
        if number in names:
            if text := _str(value):  # gogo-protobuf writes empty strings: empty means unset here
                meta[names[number]] = text
        elif number in (11, 12):
            key, val = _map_entry(value)
            meta.setdefault("labels" if number == 11 else "annotations", {})[key] = val
        elif number == 14:
            meta.setdefault("finalizers", []).append(_str(value))
    return meta


def _object(kind: str, raw: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for number, value in fields(raw):
        if not isinstance(value, bytes):
            if kind == "ConfigMap" and number == 4:
                obj["immutable"] = bool(value)
            continue
        if number == 1:
            obj["metadata"] = _object_meta(value)
        elif kind == "Namespace" and number == 2:
            obj["spec"] = {"finalizers": [_str(v) for n, v in fields(value) if n == 1]}
        elif kind == "ConfigMap" and number in (2, 3):
            key, val = _map_entry(value)
            obj.setdefault("data" if number == 2 else "binaryData", {})[key] = val
        elif kind == "ServiceAccount" and number == 3:
            obj["automountServiceAccountToken"] = bool(value)
    return obj


DECODABLE_KINDS = ("Namespace", "ConfigMap", "ServiceAccount")


def decode(body: bytes) -> dict[str, Any]:
    """Decodes a protobuf-encoded request body into the object's JSON form.

    Returns the object with apiVersion and kind set. Raises ProtobufError for a malformed body or a
    kind outside DECODABLE_KINDS (the caller answers 415, asking for JSON).
    """
    if not body.startswith(MAGIC):
        raise ProtobufError("missing the k8s\\x00 protobuf envelope")
    envelope = dict(fields(body[len(MAGIC):]))
    type_meta = envelope.get(1, b"")
    raw = envelope.get(2, b"")
    if not isinstance(type_meta, bytes) or not isinstance(raw, bytes):
        raise ProtobufError("malformed runtime.Unknown envelope")
    tm = {n: _str(v) for n, v in fields(type_meta)}
    api_version, kind = tm.get(1, ""), tm.get(2, "")
    if kind not in DECODABLE_KINDS or api_version != "v1":
        raise ProtobufError(f"protobuf bodies are read only for {', '.join(DECODABLE_KINDS)}; got {api_version} "
                            f"{kind}: send application/json")
    return {"apiVersion": api_version, "kind": kind, **_object(kind, raw)}
