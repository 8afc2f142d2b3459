#!/usr/bin/env python3
"""soak.py: run a multi-threaded workload under attach/detach churn and compare events seen with events made.

Not part of the normal test run. Each round attaches a fresh `bpftrace -p PID`, waits for its BEGIN
line and for dtrace.wait_for_consumer, lets several threads call a function a known number of times
(and compile, call and drop fresh code objects), detaches, and checks that the workload went idle.
It reports per round the events bpftrace counted against those made, the workload's resident memory
and its name-cache entries, and fails (exit 1) on any lost or extra event, a workload that did not go
idle, or memory that keeps growing.

Run it as root, with a Python that has pydtrace-rs installed:

    sudo .venv-3.12/bin/python scripts/soak.py --seconds 300
    sudo .venv-3.13/bin/python scripts/soak.py --seconds 60 --threads 8 --calls 200000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tracing import Bpftrace, tracer_missing_reason  # noqa: E402

WORKLOAD = """
import json, os, sys, threading, time
import dtrace

def hot(x):
    return x

def window(threads, calls, fresh_code):
    barrier = threading.Barrier(threads)
    def worker():
        barrier.wait()
        for i in range(calls):
            hot(i)
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for i in range(fresh_code):  # code objects that come and go: the cache must not keep them
        namespace = {}
        exec(compile(f"def gen_{i}():\\n    return {i}\\n", f"<soak-{i}>", "exec"), namespace)
        namespace[f"gen_{i}"]()
    for t in pool:
        t.join()

def rss_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0

print(os.getpid(), dtrace.library_path(), flush=True)
for line in sys.stdin:
    words = line.split()
    if words[0] == "window":
        threads, calls, fresh = map(int, words[1:])
        live = dtrace.wait_for_consumer("function-entry", "function-return", timeout=30)
        window(threads, calls, fresh)
        print(json.dumps({"live": live, "made": threads * calls}), flush=True)
    elif words[0] == "detached":
        deadline = time.monotonic() + 30
        while dtrace.enabled_probes() and time.monotonic() < deadline:
            time.sleep(0.005)
        import gc
        gc.collect()
        print(json.dumps({"idle": not dtrace.enabled_probes(), "rss_kib": rss_kib(),
                          "cache": dtrace._native._testing.name_cache_entries()}), flush=True)
"""

PROGRAM = """
usdt:{lib}:python:function__entry /str(arg1) == "hot"/ { @entries = count(); }
usdt:{lib}:python:function__return /str(arg1) == "hot"/ { @returns = count(); }
usdt:{lib}:python:function__entry { @all = count(); }
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="examples:\n  sudo .venv-3.12/bin/python scripts/soak.py --seconds 300\n"
        "  sudo .venv-3.13/bin/python scripts/soak.py --seconds 60 --threads 8 --calls 200000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=60, help="how long to soak (default 60)")
    parser.add_argument("--threads", type=int, default=4, help="threads calling per round (default 4)")
    parser.add_argument("--calls", type=int, default=50000, help="calls per thread per round (default 50000)")
    parser.add_argument("--fresh-code", type=int, default=2000, help="code objects made and dropped per round")
    parser.add_argument("--print-program", action="store_true", help="print the bpftrace program and exit")
    args = parser.parse_args()
    if args.print_program:
        print(PROGRAM.strip())
        return 0
    reason = tracer_missing_reason()
    if reason:
        print(f"soak.py: {reason}", file=sys.stderr)
        return 1

    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYDTRACE")}
    workload = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WORKLOAD)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=environment)
    pid, library = workload.stdout.readline().split()

    def say(line: str) -> dict:
        workload.stdin.write(line + "\n")
        workload.stdin.flush()
        return json.loads(workload.stdout.readline())

    failures, rounds, seen_total, made_total, rss = [], 0, 0, 0, []
    deadline = time.monotonic() + args.seconds
    print(f"{'round':>5} {'made':>10} {'entries':>10} {'returns':>10} {'all events':>11} {'rss KiB':>9} {'cache':>6}")
    try:
        while time.monotonic() < deadline:
            rounds += 1
            tracer = Bpftrace(PROGRAM, int(pid), library)
            tracer.start()
            window = say(f"window {args.threads} {args.calls} {args.fresh_code}")
            maps = tracer.stop()
            idle = say("detached")
            entries, returns = maps.get("@entries", 0), maps.get("@returns", 0)
            seen_total += entries
            made_total += window["made"]
            rss.append(idle["rss_kib"])
            print(f"{rounds:>5} {window['made']:>10} {entries:>10} {returns:>10} {maps.get('@all', 0):>11} "
                  f"{idle['rss_kib']:>9} {idle['cache']:>6}")
            if not window["live"]:
                failures.append(f"round {rounds}: probes were not live")
            if entries != window["made"] or returns != window["made"]:
                failures.append(f"round {rounds}: made {window['made']}, saw {entries} entries, {returns} returns")
            if not idle["idle"]:
                failures.append(f"round {rounds}: the workload did not go idle after detach")
    finally:
        workload.stdin.close()
        workload.wait(60)
    # Memory: the second half of the run may not sit much above the first (a leak grows every round).
    if len(rss) >= 6:
        first, second = rss[: len(rss) // 2], rss[len(rss) // 2 :]
        growth = min(second) - max(first)
        if growth > 8 * 1024:
            failures.append(f"resident memory grew by {growth} KiB between the two halves of the run")
    print(f"\n{rounds} rounds: {made_total} calls made, {seen_total} entries seen; "
          f"memory {min(rss) if rss else 0}..{max(rss) if rss else 0} KiB")
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
