"""What reading the Python stack from the frames costs a traced program (BENCHMARKS.md, "Python
stacks from the frames").

Two measurements, each with every configuration in a process of its own, all started together and
run round by round in turns (each round: one run of the workload in each process, in a rotating
order), so that the drift of a shared machine hits them alike; each process times its own rounds
in CPU time (``thread_time_ns`` around the workload: user and system time of the thread, the
kernel's probe handlers included, time spent waiting for a CPU on a busy machine left out).
Figures are medians over rounds, and the cost is the ratio to the untraced process's median.

1. ``where connect`` on a call-heavy program (a round: 200,000 Python calls, then one
   ``connect()``): untraced (twice: the second, an A/A pair, shows the noise); ``where connect`` (the stack read from the frames at each connect,
   the default); ``where connect --trace-calls`` (the stacks kept from entry/return/line
   events). The tools attach with ``-p`` to running processes, and each round's connect is
   checked in their reports (every connect counted).
2. What one walked event costs: 1,000 connects a round, untraced, under a bpftrace uprobe that
   only counts them (the floor of any uprobe), and under ``where connect``.
3. ``flame --sample 99`` beside ``py-spy record -r 99`` (if installed) on pyperformance's
   richards, deltablue and raytrace (if pyperformance is installed: its benchmark files are
   imported and their functions run, without pyperf's runner).

Usage (root, bpftrace): ``python benches/pystack_cost.py [--rounds N] [--part where|event|sample|both]``.
It prints the Markdown rows of BENCHMARKS.md's section.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

CHILD = textwrap.dedent("""\
    import importlib.util, os, socket, sys, time
    MODE, BENCH = sys.argv[1], sys.argv[2]
    if MODE == "trace-calls":
        import dtrace

    def leaf(x):
        return x + 1

    def calls(n):
        total = 0
        for _ in range(n):
            total = leaf(total)
        return total

    def dial():
        with socket.socket() as s:
            s.connect_ex(("127.0.0.1", 9))

    def where_round():
        calls(200_000)
        dial()

    def load(path):
        spec = importlib.util.spec_from_file_location("bench_module", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    if BENCH == "where":
        work = where_round
    elif BENCH == "connects":
        def work():
            for _ in range(1000):
                dial()
    else:
        module = load(sys.argv[3])
        work = {
            "richards": lambda: module.Richards().run(3),
            "deltablue": lambda: module.delta_blue(2000),
            "raytrace": lambda: module.bench_raytrace(1, 60, 60, None),
        }[BENCH]
    work()  # warm up (imports, specialization)
    print(os.getpid(), flush=True)
    for line in sys.stdin:
        if line.strip() == "wait":
            print(dtrace.wait_for_consumer("function-entry", "function-return", "line", timeout=60), flush=True)
            continue
        start = time.thread_time_ns()
        work()
        print(time.thread_time_ns() - start, flush=True)
""")


class Subject:
    """One process running the workload a round at a time, and what traces it."""

    def __init__(self, name: str, mode: str, bench: str, path: str, directory: Path) -> None:
        self.name, self.mode = name, mode
        script = directory / "child.py"
        script.write_text(CHILD)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYDTRACE")}
        self.process = subprocess.Popen([sys.executable, str(script), mode, bench, path], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.pid = int(self.process.stdout.readline())
        self.tracer: subprocess.Popen | None = None
        self.times: list[int] = []
        self.output = ""

    def attach(self, argv: list[str], ready: str, stream: str = "stderr") -> None:
        """Start a tracer and wait for its line that says it is attached (on ``stream``)."""
        self.tracer = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = []
        for line in getattr(self.tracer, stream):
            seen.append(line)
            if ready in line:
                return
        raise SystemExit(f"{argv[:4]} did not attach: {''.join(seen)}")

    def round(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        self.times.append(int(self.process.stdout.readline()))

    def say(self, word: str) -> str:
        self.process.stdin.write(word + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        if self.tracer is not None and self.tracer.poll() is None:
            self.tracer.send_signal(signal.SIGINT)
            try:
                out, _ = self.tracer.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self.tracer.kill()
                out, _ = self.tracer.communicate()
            self.output = out
        self.process.stdin.close()
        self.process.wait(30)


def run_rounds(subjects: list[Subject], rounds: int) -> None:
    for r in range(rounds):
        shift = r % len(subjects)
        for subject in subjects[shift:] + subjects[:shift]:
            subject.round()


def tool(*args: str) -> list[str]:
    return [sys.executable, "-m", "dtrace", *args]


def where_part(rounds: int, directory: Path) -> list[str]:
    subjects = [Subject("untraced", "plain", "where", "", directory),
                Subject("untraced, again (A/A: the noise)", "plain", "where", "", directory),
                Subject("where connect (frames)", "plain", "where", "", directory),
                Subject("where connect --trace-calls", "trace-calls", "where", "", directory)]
    try:
        subjects[2].attach(tool("where", "connect", "-p", str(subjects[2].pid)), "Tracing ")
        subjects[3].attach(tool("where", "connect", "--trace-calls", "-p", str(subjects[3].pid)), "Tracing ")
        assert subjects[3].say("wait") == "True"
        run_rounds(subjects, rounds)
    finally:
        for subject in subjects:
            subject.close()
    base = statistics.median(subjects[0].times)
    rows = []
    for subject in subjects:
        median = statistics.median(subject.times)
        counted = ""
        if subject.tracer is not None:
            # every round's connect is in the report (the frames way counts the warm-up's too
            # only if it ran after attaching: it did not)
            counted = subject.output.splitlines()[0] if subject.output else "(no report)"
        rows.append(f"| {subject.name} | {median / 1e6:.2f} ms | {min(subject.times) / 1e6:.2f} ms | "
                    f"{median / base:.3f}x | {counted} |")
    return rows


def event_part(rounds: int, directory: Path) -> list[str]:
    """What one walked event costs: 1,000 connects a round, untraced, under a uprobe that only
    counts them (the kernel's floor), and under ``where connect``."""
    subjects = [Subject("untraced", "plain", "connects", "", directory),
                Subject("uprobe counting connect (floor)", "plain", "connects", "", directory),
                Subject("where connect (frames)", "plain", "connects", "", directory)]
    floor = (f'BEGIN {{ printf("Tracing\\n"); }} uprobe:libc:connect /pid == {subjects[1].pid}/ '
             "{ @calls = count(); }")
    try:
        subjects[1].attach(["bpftrace", "-p", str(subjects[1].pid), "-e", floor], "Tracing", stream="stdout")
        subjects[2].attach(tool("where", "connect", "-p", str(subjects[2].pid)), "Tracing ")
        run_rounds(subjects, rounds)
    finally:
        for subject in subjects:
            subject.close()
    base = statistics.median(subjects[0].times)
    rows = []
    for subject in subjects:
        median = statistics.median(subject.times)
        per_event = (median - base) / 1000 / 1000  # microseconds per connect over untraced
        rows.append(f"| {subject.name} | {median / 1e6:.2f} ms | {min(subject.times) / 1e6:.2f} ms | "
                    f"{per_event:+.2f} us |")
    return rows


def sample_part(rounds: int, directory: Path) -> list[str]:
    spec = importlib.util.find_spec("pyperformance")
    if spec is None or spec.origin is None:
        return ["(pyperformance is not installed: pip install pyperformance)"]
    benchmarks = Path(spec.origin).parent / "data-files" / "benchmarks"
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    rows = []
    for bench in ("richards", "deltablue", "raytrace"):
        path = str(benchmarks / f"bm_{bench}" / "run_benchmark.py")
        subjects = [Subject("untraced", "plain", bench, path, directory),
                    Subject("flame --sample 99", "plain", bench, path, directory)]
        if os.path.exists(py_spy):
            subjects.append(Subject("py-spy record -r 99", "plain", bench, path, directory))
        try:
            subjects[1].attach(tool("flame", "--sample", "99", "--folded", "-o", str(directory / f"{bench}.folded"),
                                    "-p", str(subjects[1].pid)), "Tracing ")
            if len(subjects) > 2:
                subjects[2].attach([py_spy, "record", "-r", "99", "-f", "raw", "-o", str(directory / f"{bench}.spy"),
                                    "-p", str(subjects[2].pid)], "Sampling process", stream="stdout")
            run_rounds(subjects, rounds)
        finally:
            for subject in subjects:
                subject.close()
        base = statistics.median(subjects[0].times)
        for subject in subjects:
            median = statistics.median(subject.times)
            samples = ""
            folded = directory / (f"{bench}.folded" if subject.name.startswith("flame") else f"{bench}.spy")
            if subject.tracer is not None and folded.exists():
                samples = str(sum(int(line.rsplit(" ", 1)[1]) for line in folded.read_text().splitlines() if line))
            rows.append(f"| {bench} | {subject.name} | {median / 1e6:.2f} ms | {min(subject.times) / 1e6:.2f} ms | "
                        f"{median / base:.3f}x | {samples} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--part", choices=("where", "event", "sample", "both"), default="both")
    args = parser.parse_args()
    print(f"Python {sys.version.split()[0]}, {args.rounds} rounds, {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory(prefix="pystack-") as folder:
        directory = Path(folder)
        if args.part in ("where", "both"):
            print("\n| configuration | median round (CPU) | fastest round | median vs untraced | the tool's report |\n"
                  "| --- | --- | --- | --- | --- |")
            print("\n".join(where_part(args.rounds, directory)))
        if args.part in ("event", "both"):
            print("\n| 1,000 connects a round | median round (CPU) | fastest round | per connect, over untraced |\n"
                  "| --- | --- | --- | --- |")
            print("\n".join(event_part(args.rounds, directory)))
        if args.part in ("sample", "both"):
            print("\n| benchmark | profiler | median round (CPU) | fastest round | median vs untraced | samples |\n"
                  "| --- | --- | --- | --- | --- | --- |")
            print("\n".join(sample_part(args.rounds, directory)))


if __name__ == "__main__":
    main()
