"""Run every fuzz target in this folder for a while each (`make fuzz`, FUZZ_SECONDS=60 by default).

Each target gets a scratch copy of its committed corpus, its dictionary when fuzz/dict has one, and
writes crashes to fuzz/ as crash-* files. Exit status 1 if any target crashed.

`--keep-corpus` merges what a clean run found back into fuzz/corpus/<target> (libFuzzer's `-merge=1`:
only inputs that add coverage), so the corpora grow from run to run and the replay tests cover them.
`--log FILE` appends one line per target run (UTC time, commit, target, seconds, executions, ok), from
which BENCHMARKS.md sums each target's total fuzzing time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PURE_ENV = {**os.environ, "MEMBRANE_PURE": "1"}
# python -c program: argv = ["-c", launcher, target, args...] -> run target with sys.argv = [launcher, args...]
_RUN_AS_LAUNCHER = ("import sys; sys.argv.pop(0); t = sys.argv.pop(1); "
                    "exec(compile(open(t).read(), t, 'exec'), {'__name__': '__main__', '__file__': t})")


def targets() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if not p.name.startswith("_") and p.name != "run_all.py")


def run_target(target: Path, seconds: float, quiet: bool = False, keep_corpus: bool = False) -> tuple[bool, float, str]:
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
        # atheris sees no coverage inside mypyc-compiled modules: fuzz the pure Python reference modules
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=PURE_ENV)
        elapsed = time.monotonic() - start
        if keep_corpus and proc.returncode == 0:
            corpus.mkdir(parents=True, exist_ok=True)
            # libFuzzer's merge re-runs argv[0] in child processes: give it an executable that runs the target
            launcher = Path(scratch) / "target"
            launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "{_RUN_AS_LAUNCHER}" "{launcher}" "{target}" "$@"\n')
            launcher.chmod(0o755)
            merge = subprocess.run([str(launcher), "-merge=1", "-rss_limit_mb=2048", "-timeout=10", str(corpus), str(work)],
                                   capture_output=True, text=True, errors="replace", env=PURE_ENV)
            if merge.returncode != 0:
                return False, elapsed, "corpus merge failed:\n" + "\n".join((merge.stdout + merge.stderr).splitlines()[-15:])
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    return proc.returncode == 0, elapsed, tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="time per target")
    parser.add_argument("--keep-corpus", action="store_true", help="merge new coverage into fuzz/corpus/<target>")
    parser.add_argument("--log", type=Path, help="append one line per target run to this file")
    parser.add_argument("only", nargs="*", help="target names (default: all)")
    args = parser.parse_args()
    failed = []
    for target in targets():
        if args.only and target.stem not in args.only:
            continue
        ok, elapsed, tail = run_target(target, args.seconds, keep_corpus=args.keep_corpus)
        print(f"{target.stem:24s} {'ok' if ok else 'CRASH':5s} {elapsed:7.1f} s", flush=True)
        if args.log is not None:
            runs = re.findall(r"Done (\d+) runs|#(\d+)\s+DONE", tail)
            count = next((int(a or b) for a, b in reversed(runs)), 0)
            commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            with args.log.open("a") as log:
                log.write(f"{stamp}\t{commit}\t{target.stem}\t{elapsed:.0f}\t{count}\t{'ok' if ok else 'CRASH'}\n")
        if not ok:
            failed.append(target.stem)
            print(tail)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
