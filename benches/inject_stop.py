"""How long ``--inject`` stops the process it loads the probes into, and whether it lives on.

    .venv-3.12/bin/python benches/inject_stop.py [--attempts 20] [--shapes busy,sleep,accept]
    python3 benches/inject_stop.py --all      # every .venv-3.1x of the checkout, one after the other

Runs with the interpreter that runs it (its pydtrace-rs is the one injected, through gdb on 3.12
and 3.13, sys.remote_exec on 3.14 and later: dtrace/tools/inject/loader.py) against fresh targets of
that interpreter, one per attempt, in three shapes: the main thread busy in Python, sleeping in
``time.sleep``, blocked in C in ``accept``. Each target runs a ticker thread that wakes every
millisecond and keeps the longest gap it saw between two wakes: a stop of the process (gdb's
attach, a breakpoint's trap) shows there, whatever the way in. Per attempt it records the
ticker's longest gap over the injection, the stop gdb reports itself (gdb only), the tool's
wall time, and whether the target lived on and still worked (its sleeps as long as asked, its
server answering, its loop counting), with nothing on its stderr. Needs root (ptrace) and, for
gdb, the one PYDTRACE_GDB names (scripts/dev bench sets it) or gdb on PATH. docs/injection.md
holds the figures of the project's machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TARGET = r'''
import os, sys, threading, time
worst = 0.0
count = 0
said = threading.Lock()

def say(*words):
    with said:  # one whole line from any thread
        sys.stdout.write(" ".join(str(word) for word in words) + "\n")
        sys.stdout.flush()

def ticker():
    global worst
    last = time.monotonic()
    while True:
        time.sleep(0.001)
        now = time.monotonic()
        worst = max(worst, now - last)
        last = now

def commands():
    global worst
    for line in sys.stdin:
        if line.strip() == "reset":
            worst = 0.0
        say("GAP", round(worst * 1000, 1), count)

threading.Thread(target=ticker, daemon=True).start()
threading.Thread(target=commands, daemon=True).start()
SHAPE = sys.argv[1]
if SHAPE == "busy":
    say("READY", os.getpid())
    while True:
        count += 1
elif SHAPE == "sleep":
    say("READY", os.getpid())
    while True:
        started = time.monotonic()
        time.sleep(0.3)
        count += 1
        say("SLEPT", time.monotonic() - started)
else:
    import socket
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    say("READY", os.getpid(), server.getsockname()[1])
    while True:
        connection, _ = server.accept()
        count += 1
        connection.sendall(b"hello\n")
        connection.close()
'''

SHAPES = ("busy", "sleep", "accept")


class Target:
    def __init__(self, shape: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYDTRACE", "PYTHONPATH"))}
        self.shape = shape
        self.process = subprocess.Popen([sys.executable, "-c", TARGET, shape], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        words = self.line("READY").split()
        self.pid = int(words[1])
        self.port = int(words[2]) if len(words) > 2 else None

    def line(self, word: str) -> str:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the target ended: {self.process.stderr.read()}")
            if line.startswith("SLEPT "):
                self.slept = float(line.split()[1])
            if line.startswith(word):
                return line

    def gap(self, reset: bool = False) -> tuple[float, int]:
        self.process.stdin.write("reset\n" if reset else "gap\n")
        self.process.stdin.flush()
        _, worst, count = self.line("GAP").split()
        return float(worst), int(count)

    def works(self) -> bool:
        """Alive and working as before: sleeps as long as asked, answers, counts on."""
        if self.process.poll() is not None:
            return False
        if self.shape == "sleep":
            for _ in range(2):
                self.line("SLEPT")
                if self.slept < 0.3:
                    return False
        elif self.shape == "accept":
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as connection:
                if connection.makefile("r").readline() != "hello\n":
                    return False
        else:
            _, first = self.gap()
            time.sleep(0.2)
            _, second = self.gap()
            if second <= first:
                return False
        return self.process.poll() is None

    def end(self) -> str:
        """Its stderr (empty when all went well)."""
        self.process.kill()
        self.process.wait()
        return self.process.stderr.read()


def attempt(shape: str) -> dict:
    from dtrace.tools.inject import loader as inject
    from dtrace.tools.errors import ToolError

    target = Target(shape)
    try:
        time.sleep(0.3)
        target.gap(reset=True)
        said = io.StringIO()
        started = time.monotonic()
        error = None
        with contextlib.redirect_stderr(said):
            try:
                inject.load_probes(target.pid, True, "bench", "not loaded")
            except ToolError as failure:
                error = str(failure)
        wall = (time.monotonic() - started) * 1000
        time.sleep(0.3)
        worst, _ = target.gap()
        stopped = re.search(r"the process was stopped ([\d.]+) ms", said.getvalue())
        works = target.works()
    finally:
        stderr = target.end()
    return dict(error=error, wall=wall, pause=worst, stopped=float(stopped.group(1)) if stopped else None,
                lived=works, quiet=not stderr.strip(), stderr=stderr.strip())


def figures(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} / {max(values):.0f}"


def run(attempts: int, shapes: list[str]) -> None:
    from dtrace.tools.inject import gdb as inject_gdb

    import sysconfig

    version = sys.version.split()[0] + (" --with-dtrace" if sysconfig.get_config_var("WITH_DTRACE") == 1 else "")
    way = "gdb" if sys.version_info < (3, 14) else "sys.remote_exec"
    gdb = ""
    if way == "gdb":
        path = inject_gdb.gdb_path()
        gdb = f" ({inject_gdb.gdb_version(path)})"
    print(f"CPython {sys.version.split()[0]} ({sys.executable}), through {way}{gdb}, {attempts} attempts per shape",
          file=sys.stderr, flush=True)
    for shape in shapes:
        results = []
        for _ in range(attempts):
            results.append(attempt(shape))
            if results[-1]["error"] or not results[-1]["lived"] or not results[-1]["quiet"]:
                print(f"  {shape}: {results[-1]['error'] or ''} {results[-1]['stderr'][-300:]}", file=sys.stderr)
        loaded = [r for r in results if r["error"] is None]
        stopped = [r["stopped"] for r in loaded if r["stopped"] is not None]
        pauses, walls = [r["pause"] for r in results], [r["wall"] for r in results]
        print(f"| {version} | {way} | {shape} | {len(loaded)}/{attempts} | {figures(stopped)} | {figures(pauses)} | "
              f"{figures(walls)} | {sum(r['lived'] for r in results)}/{attempts} | "
              f"{sum(r['quiet'] for r in results)}/{attempts} |", flush=True)


HEADER = ("| Python | way in | target | loaded | stopped, gdb's figure (ms, median / worst) | longest pause the "
          "target saw (ms, median / worst) | the tool's time (ms, median / worst) | lived on, working | "
          "nothing on its stderr |\n"
          "|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attempts", type=int, default=20)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--all", action="store_true", help="run with every .venv-3.1x of the checkout")
    args = parser.parse_args()
    shapes = [shape for shape in args.shapes.split(",") if shape]
    if os.geteuid() != 0:
        sys.exit("inject_stop.py needs root (ptrace)")
    if HEADER:
        print(HEADER, flush=True)
    if args.all:
        for venv in sorted(ROOT.glob(".venv-3.1[0-9]*")):
            python = venv / "bin" / "python"
            if python.exists():
                done = subprocess.run([str(python), __file__, "--attempts", str(args.attempts), "--shapes", args.shapes,
                                       "--no-header"], stdout=subprocess.PIPE, text=True)
                sys.stdout.write(done.stdout)
                sys.stdout.flush()
        return
    run(args.attempts, shapes)


if __name__ == "__main__":
    if "--no-header" in sys.argv:
        sys.argv.remove("--no-header")
        HEADER = ""
    main()
