"""Runs `membrane` (membrane.cli.main) under cProfile with a CPU-time clock and writes the stats on exit.

    python bench/peers/cpu_profile.py OUT.prof gateway --policies ... --workers 1

`python -m cProfile` times with the wall clock, so on a machine whose cores are shared with the load generator
and the backend, a syscall during which the proxy is preempted looks expensive. time.process_time counts only
the CPU this process used, which is what "where does the proxy spend its time" asks.
"""

from __future__ import annotations

import cProfile
import runpy
import sys
import time


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["membrane", *sys.argv[2:]]
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        runpy.run_module("membrane.cli", run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    main()
