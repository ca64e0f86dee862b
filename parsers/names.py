"""Protocol name tables shared by parsers and policies: one table per protocol, numbers from the protocol's spec.

Owns data only (no parsing, no policy logic), so `policies/` may import it as it imports
`parsers.events`. Invariant: every other name map of the product is derived from a table here.
"""

from __future__ import annotations

from typing import Final

# Kafka api keys (the numbers of the Kafka protocol's request types, kafka.apache.org/protocol#protocol_api_keys)
# by name. Names are Kafka's request names in lower case without separators, except where Cilium 1.19's
# `apiKey` (pkg/policy/api/kafka.go, KafkaAPIKeyMap) spells them otherwise: "offsets" for ListOffsets
# and "findcoordinator" for FindCoordinator (formerly GroupCoordinator).
KAFKA_API_KEY_NAMES: Final[dict[int, str]] = {
    0: "produce", 1: "fetch", 2: "offsets", 3: "metadata", 4: "leaderandisr", 5: "stopreplica",
    6: "updatemetadata", 7: "controlledshutdown", 8: "offsetcommit", 9: "offsetfetch",
    10: "findcoordinator", 11: "joingroup", 12: "heartbeat", 13: "leavegroup", 14: "syncgroup",
    15: "describegroups", 16: "listgroups", 17: "saslhandshake", 18: "apiversions", 19: "createtopics",
    20: "deletetopics", 21: "deleterecords", 22: "initproducerid", 23: "offsetforleaderepoch",
    24: "addpartitionstotxn", 25: "addoffsetstotxn", 26: "endtxn", 27: "writetxnmarkers",
    28: "txnoffsetcommit", 29: "describeacls", 30: "createacls", 31: "deleteacls", 32: "describeconfigs",
    33: "alterconfigs", 34: "alterreplicalogdirs", 35: "describelogdirs", 36: "saslauthenticate",
    37: "createpartitions", 38: "createdelegationtoken", 39: "renewdelegationtoken",
    40: "expiredelegationtoken", 41: "describedelegationtoken", 42: "deletegroups", 43: "electleaders",
    44: "incrementalalterconfigs", 45: "alterpartitionreassignments", 46: "listpartitionreassignments",
    47: "offsetdelete", 48: "describeclientquotas", 49: "alterclientquotas",
    50: "describeuserscramcredentials", 51: "alteruserscramcredentials", 55: "describequorum",
    57: "updatefeatures", 60: "describecluster", 61: "describeproducers", 65: "describetransactions",
    66: "listtransactions", 68: "consumergroupheartbeat", 69: "consumergroupdescribe",
    71: "gettelemetrysubscriptions", 72: "pushtelemetry", 74: "listconfigresources",
    75: "describetopicpartitions", 76: "sharegroupheartbeat", 77: "sharegroupdescribe", 78: "sharefetch",
    79: "shareacknowledge", 88: "streamsgroupheartbeat", 89: "streamsgroupdescribe",
    90: "describesharegroupoffsets", 91: "altersharegroupoffsets", 92: "deletesharegroupoffsets",
}

# Cilium's KafkaAPIKeyMap knows keys 0-33 only; a policy naming any other key is rejected, as Cilium does.
CILIUM_MAX_KAFKA_API_KEY: Final = 33


def kafka_api_key_name(api_key: int) -> str:
    """The name of `api_key` for flows and logs; the decimal number when the table has none."""
    return KAFKA_API_KEY_NAMES.get(api_key, str(api_key))
