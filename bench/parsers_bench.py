"""Parser throughput per protocol: runs every `bench/parsers/<proto>.py` module's `run()` and prints a table.

Usage: .venv/bin/python bench/parsers_bench.py [--json]
Each row is one measurement (messages/s and MB/s) taken in this run, side by side with its
reference (httptools vs h11, hand reader vs dnslib, ...), so ratios are comparable on any machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "parser_cases"
# The protocol modules name their columns in slightly different ways; one name per quantity here.
_ALIASES = {
    "messages/s": "msg_per_s", "messages_per_s": "msg_per_s",
    "MB/s": "MB_per_s", "mb_per_s": "MB_per_s",
    "us/message": "us_per_msg",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    for module_path in sorted(HERE.glob("*.py")):
        if module_path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"bench_parsers_{module_path.stem}", module_path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for row in module.run():
            rows.append({"protocol": module_path.stem, **{_ALIASES.get(k, k): v for k, v in row.items()}})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    keys = sorted({k for row in rows for k in row} - {"protocol", "name"})
    print(f"{'protocol':10s} {'name':58s} " + " ".join(f"{k:>14s}" for k in keys))
    for row in rows:
        cells = []
        for k in keys:
            v = row.get(k, "")
            cells.append(f"{v:14.1f}" if isinstance(v, float) else f"{v!s:>14s}")
        print(f"{row['protocol']!s:10s} {row.get('name', '')!s:58s} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
