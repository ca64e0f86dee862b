"""Run every fuzz target in this folder for a while each (`make fuzz`, FUZZ_SECONDS=60 by default).

Each target gets a scratch copy of its committed corpus (so a run never rewrites fuzz/corpus), its
dictionary when fuzz/dict has one, and writes crashes to fuzz/ as crash-* files. Exit status 1 if
any target crashed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def targets() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if not p.name.startswith("_") and p.name != "run_all.py")


def run_target(target: Path, seconds: float, quiet: bool = False) -> tuple[bool, float, str]:
    """Fuzz one target for `seconds`. Returns (ok, elapsed seconds, tail of its output)."""
    corpus = HERE / "corpus" / target.stem
    with tempfile.TemporaryDirectory(prefix=f"mbr-fuzz-{target.stem}-") as scratch:
        work = Path(scratch) / "corpus"
        if corpus.is_dir():
            shutil.copytree(corpus, work)
        else:
            work.mkdir()
        cmd = [sys.executable, str(target), str(work), f"-max_total_time={max(1, int(seconds))}",
               "-rss_limit_mb=2048", "-timeout=10", f"-artifact_prefix={HERE}/"]
        proto = target.stem.split("_")[0]
        dictionary = HERE / "dict" / f"{proto}.dict"
        if dictionary.exists():
            cmd.append(f"-dict={dictionary}")
        start = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        elapsed = time.monotonic() - start
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    return proc.returncode == 0, elapsed, tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="time per target")
    parser.add_argument("only", nargs="*", help="target names (default: all)")
    args = parser.parse_args()
    failed = []
    for target in targets():
        if args.only and target.stem not in args.only:
            continue
        ok, elapsed, tail = run_target(target, args.seconds)
        print(f"{target.stem:24s} {'ok' if ok else 'CRASH':5s} {elapsed:7.1f} s", flush=True)
        if not ok:
            failed.append(target.stem)
            print(tail)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
