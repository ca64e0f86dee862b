"""The JSON Schema of Hubble's flow JSON (hubble_flow_schema.json, derived from flow.proto at Cilium v1.19.4)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from jsonschema import Draft202012Validator

SCHEMA_PATH = Path(__file__).with_name("hubble_flow_schema.json")


@cache
def schema_validator() -> Draft202012Validator:
    """A validator for one `hubble observe -o json` line (GetFlowsResponse with a flow)."""
    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)
