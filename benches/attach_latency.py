"""How long a consumer waits for its first event, and how long hooks stay on after it leaves.

    python benches/attach_latency.py [--python PY ...] [--processes 20] [--write BENCHMARKS.md]

For every Python and every shape of a busy process (below; the programs are
tests/workloads/busy.py's, which tests/test_attach.py attaches to as well), it starts
``--processes`` processes that ``import dtrace`` and run without any handshake, and attaches ``bpftrace -p PID`` to each
twice (the process's first attach, then a later one). Measured:

- attach: from the consumer's first instruction (its ``BEGIN``) to its first event, both read
  from the kernel's clock inside bpftrace (``nsecs``), so the tracer's own start-up (loading
  and attaching its programs) is not counted, but everything on the process's side is; and
  the process's own share, from the moment the probe's semaphore went up to the moment its
  hooks were live (bpftrace 0.17 raises the semaphores only after ``BEGIN``);
- detach: from the semaphore going down to the hooks being off.

The semaphore and the process's exported ``pydtrace_live_probes`` word are read through
``/proc/PID/mem`` every 0.5 ms, on the same clock (CLOCK_MONOTONIC).

The target is 100 ms at the worst of all attaches of a shape. ``--write`` puts the table into
the file between the ``attach-latency`` markers (benches/report.py keeps that section).
Needs root and bpftrace.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import sections  # benches/, beside this script

BOUND_MS = 100.0
#: A first event that takes longer than this counts as never (the figure says so).
GIVE_UP_S = 30.0

BEGIN_MARK, END_MARK = sections.ATTACH_LATENCY  # the section this script owns in BENCHMARKS.md

#: The busy-process program the attach tests run too (tests/test_attach.py): run by path under
#: each --python, which has neither tests/ nor benches/ on its path.
BUSY = Path(__file__).resolve().parent.parent / "tests" / "workloads" / "busy.py"

#: The shapes of busy process measured, each with what it is: busy.py's shape, and whether the page
#: cache is dropped before each attach.
SHAPES = {
    "cpu-bound": ("a CPU-bound main thread, no I/O", "cpu-bound", False),
    "writing": ("a CPU-bound main thread writing a line every ~2 ms", "writing", False),
    "cold-cache": ("as 'writing', with the page cache dropped before each attach", "writing", True),
    "lock-wait": ("the main thread blocked in C (a lock's wait) while two threads run Python", "lock-wait", False),
    "asyncio": ("an asyncio loop: a task that computes and yields, one that sleeps", "asyncio", False),
}

PROGRAM = """
BEGIN { printf("BEGIN %%lld\\n", nsecs); }
usdt:%(lib)s:python:function__entry /@seen == 0/ {
    @seen = 1;
    printf("FIRST %%lld\\n", nsecs);
    exit();
}
"""


def addresses(pid: int, library: str) -> tuple[int, int]:
    """The addresses of ``pydtrace_live_probes`` and of function__entry's semaphore in ``pid``."""
    symbols = subprocess.run(["nm", "-D", "--defined-only", library], capture_output=True, text=True,
                             check=True).stdout
    match = re.search(r"^([0-9a-f]+) \S+ pydtrace_live_probes$", symbols, re.M)
    if match is None:
        raise SystemExit(f"{library} exports no pydtrace_live_probes: rebuild pydtrace-rs")
    notes = subprocess.run(["readelf", "-n", library], capture_output=True, text=True, check=True).stdout
    semaphore = re.search(r"Name: function__entry\s+Location: \S+, Base: \S+, Semaphore: (0x[0-9a-f]+)", notes)
    assert semaphore is not None, "no function__entry note"
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == library and int(fields[2], 16) == 0:
                base = int(fields[0].split("-")[0], 16)
                return base + int(match.group(1), 16), base + int(semaphore.group(1), 16)
    raise SystemExit(f"process {pid} has not mapped {library}")


def drop_page_cache() -> None:
    """As on a server that has run for days: the interpreter's and the libraries' pages are cold."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Poller(threading.Thread):
    """Reads the semaphore and the live word of a process every 0.5 ms, and notes when each changes."""

    def __init__(self, pid: int, live_at: int, semaphore_at: int) -> None:
        super().__init__(daemon=True)
        self.mem = open(f"/proc/{pid}/mem", "rb", buffering=0)
        self.live_at, self.semaphore_at = live_at, semaphore_at
        self.changes: list[tuple[str, int]] = []  # ("semaphore" | "live", new value != 0), ns
        self.stopping = False

    def read(self, address: int, size: int) -> int:
        self.mem.seek(address)
        return int.from_bytes(self.mem.read(size), "little")

    def run(self) -> None:
        state = {"semaphore": 0, "live": 0}
        while not self.stopping:
            now = time.monotonic_ns()
            for name, value in (("semaphore", self.read(self.semaphore_at, 2)), ("live", self.read(self.live_at, 4))):
                if (value != 0) != (state[name] != 0):
                    state[name] = value
                    self.changes.append((f"{name} {'up' if value else 'down'}", now))
            time.sleep(0.0005)

    def first(self, change: str, after: int = 0) -> int | None:
        return next((t for c, t in self.changes if c == change and t >= after), None)


def attach_once(pid: int, library: str, live_at: int, semaphore_at: int, cold: bool) -> dict[str, float | None]:
    """Milliseconds: BEGIN to first event; semaphore up to live; semaphore down to off."""
    if cold:
        drop_page_cache()
    poller = Poller(pid, live_at, semaphore_at)
    poller.start()
    tracer = subprocess.Popen(["bpftrace", "-p", str(pid), "-e", PROGRAM % {"lib": library}],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    begin = first = None
    deadline = time.monotonic() + GIVE_UP_S + 30  # bpftrace's own start-up is not timed
    assert tracer.stdout is not None
    for line in tracer.stdout:
        if line.startswith("BEGIN "):
            begin = int(line.split()[1])
        elif line.startswith("FIRST "):
            first = int(line.split()[1])
            break
        if time.monotonic() > deadline:
            break
    if first is None:
        tracer.kill()
    tracer.wait()
    give_up = time.monotonic() + GIVE_UP_S
    while poller.first("live down") is None and time.monotonic() < give_up:
        time.sleep(0.001)
    poller.stopping = True
    poller.join()
    up, live = poller.first("semaphore up"), poller.first("live up")
    down = poller.first("semaphore down")
    off = poller.first("live down", after=down or 0)

    def ms(start: int | None, end: int | None) -> float | None:
        return None if start is None or end is None else (end - start) / 1e6

    return {"attach": ms(begin, first), "ours": ms(up, live), "detach": ms(down, off)}


def measure_shape(python: str, shape: str, processes: int) -> dict[str, list[float | None]]:
    _, program, cold = SHAPES[shape]
    figures: dict[str, list[float | None]] = {"first": [], "later": [], "ours": [], "detach": []}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDTRACE")}
    for _ in range(processes):
        process = subprocess.Popen([python, str(BUSY), program, "--import-dtrace"], stdout=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, text=True, env=env)
        try:
            assert process.stdout is not None
            word, facts = process.stdout.readline().split(" ", 1)
            assert word == "READY", word
            ready = json.loads(facts)
            pid, library = ready["pid"], ready["library"]
            live_at, semaphore_at = addresses(pid, library)
            for which in ("first", "later"):
                got = attach_once(pid, library, live_at, semaphore_at, cold=cold)
                figures[which].append(got["attach"])
                figures["ours"].append(got["ours"])
                figures["detach"].append(got["detach"])
        finally:
            process.kill()
            process.wait()
    return figures


def summary(values: list[float | None]) -> str:
    missing = sum(v is None for v in values)
    got = sorted(v for v in values if v is not None)
    if not got:
        return f"no event within {GIVE_UP_S:g} s ({missing} of {len(values)})"
    worst = "never" if missing else f"{got[-1]:.1f}"
    over = sum(v > BOUND_MS for v in got) + missing
    verdict = "met" if over == 0 else f"**{over} of {len(values)} over {BOUND_MS:g} ms**"
    return f"median {statistics.median(got):.1f}, worst {worst}: {verdict}"


def table(results: dict[str, dict[str, dict[str, list[float | None]]]]) -> list[str]:
    pythons = list(results)
    lines = [
        BEGIN_MARK,
        "## Attach and detach latency",
        "",
        "Written by `python benches/attach_latency.py`. Busy processes that `import dtrace` and run with no "
        "handshake; `bpftrace -p PID` attached to each twice (the first attach of the process, then a later one). "
        "Attach: milliseconds from the consumer's `BEGIN` to its first event (both on the kernel's clock in "
        "bpftrace). bpftrace 0.17 raises the probe's semaphore only after `BEGIN`, so part of that is the "
        "tracer's: the process's own share is the next row, from the semaphore going up to the hooks being "
        "live (the watcher's poll, every 20 ms, and the hand-off to a thread with the GIL). Detach: from the "
        "semaphore going down to the hooks being off. Semaphore and hooks are read from the process's memory "
        f"every 0.5 ms. Target: at most {BOUND_MS:g} ms at the worst.",
        "",
        "| shape | | " + " | ".join(f"Python {p}" for p in pythons) + " |",
        "|---|---|" + "---|" * len(pythons),
    ]
    for shape, (description, _, _) in SHAPES.items():
        for which, label in (("first", "first attach, BEGIN to first event"),
                             ("later", "later attach, BEGIN to first event"),
                             ("ours", "every attach, semaphore up to hooks live"),
                             ("detach", "every detach, semaphore down to hooks off")):
            cells = [summary(results[p][shape][which]) if shape in results[p] else "" for p in pythons]
            name = f"{shape}: {description}" if which == "first" else ""
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    lines += ["", END_MARK]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", help="an interpreter with pydtrace-rs installed (repeatable)")
    parser.add_argument("--processes", type=int, default=20, help="processes per shape (default: %(default)s)")
    parser.add_argument("--shape", action="append", choices=list(SHAPES), help="only these shapes")
    parser.add_argument("--json", help="also write the raw figures here")
    parser.add_argument("--write", help="put the table into this Markdown file (BENCHMARKS.md)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("attach_latency.py needs root (bpftrace, /proc/PID/mem, drop_caches)")
    results: dict[str, dict[str, dict[str, list[float | None]]]] = {}
    for python in args.python or [sys.executable]:
        version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        results[version] = {}
        for shape in args.shape or list(SHAPES):
            started = time.monotonic()
            results[version][shape] = measure_shape(python, shape, args.processes)
            figures = results[version][shape]
            print(f"Python {version} {shape}: " + "; ".join(f"{k} {summary(v)}" for k, v in figures.items())
                  + f" ({time.monotonic() - started:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    lines = table(results)
    if args.write:
        sections.splice(Path(args.write), sections.ATTACH_LATENCY, lines)
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
