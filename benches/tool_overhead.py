"""What the counting tools cost on call-heavy code: ``calls``, ``calls -L`` and ``flame`` (counted in the
process, the default; and ``--per-event``) beside cProfile, on pyperformance's richards, deltablue and
raytrace, all in one run.

Each benchmark runs as a command of its own (``-c``), and times only its work (``time.perf_counter``
around it, written to a file): tool start-up and tracer attach are not in the figures. The ratio is the
median traced time over the median untraced time of the same run.

Needs pyperformance installed in the interpreter (``pip install pyperformance``: its benchmark sources
ship in the package) and bpftrace with root. Usage:

    sudo .venv-3.12/bin/python benches/tool_overhead.py [--repeat 5] [--per-event] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

#: Each benchmark: its module under pyperformance's data files, and the work one run does.
BENCHMARKS = {
    "richards": "Richards().run(10)",
    "deltablue": "delta_blue(12000)",
    "raytrace": "bench_raytrace(1, 110, 110, None)",
}

DRIVER = """\
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location({module!r}, {path!r})
bench = importlib.util.module_from_spec(spec)
sys.modules[{module!r}] = bench
spec.loader.exec_module(bench)
globals().update(vars(bench))
start = time.perf_counter()
{work}
elapsed = time.perf_counter() - start
with open(os.environ["BENCH_OUT"], "w") as f:
    f.write(repr(elapsed))
"""


def benchmark_file(name: str) -> Path:
    import pyperformance

    return Path(pyperformance.__file__).parent / "data-files" / "benchmarks" / f"bm_{name}" / "run_benchmark.py"


def modes(per_event: bool) -> dict[str, list[str]]:
    """How each mode runs a command (the driver's argv appended)."""
    tool = [sys.executable, "-m", "dtrace"]
    out = {
        "untraced": [],
        "cProfile": [sys.executable, "-m", "cProfile", "-o", os.devnull],
        "calls": [*tool, "calls", "-c"],
        "calls -L": [*tool, "calls", "-L", "-c"],
        "flame": [*tool, "flame", "-o", "/tmp/pydtrace-bench-flame.svg", "-c"],
    }
    if per_event:
        out["calls --per-event"] = [*tool, "calls", "--per-event", "-c"]
        out["flame --per-event"] = [*tool, "flame", "--per-event", "-o", "/tmp/pydtrace-bench-flame.svg", "-c"]
    return out


def run_once(mode: list[str], driver: Path, out: Path) -> float:
    command = [sys.executable, str(driver)]
    if mode and mode[-1] == "-c":
        argv = [*mode, shlex.join(command)]
    elif mode:  # cProfile: python -m cProfile -o FILE driver.py
        argv = [*mode, str(driver)]
    else:
        argv = command
    env = {**os.environ, "BENCH_OUT": str(out)}
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr}")
    return float(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--per-event", action="store_true", help="also the tools' --per-event runs")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    chosen = modes(args.per_event)
    results: dict[str, dict[str, float]] = {}
    best: dict[str, dict[str, float]] = {}  # the fastest run of each: the least disturbed by other jobs
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "elapsed"
        for name, work in BENCHMARKS.items():
            driver = Path(tmp) / f"bm_{name}_driver.py"
            driver.write_text(DRIVER.format(module=f"bm_{name}", path=str(benchmark_file(name)), work=work))
            times: dict[str, list[float]] = {mode: [] for mode in chosen}
            for _ in range(args.repeat):  # interleaved: a slow moment of the machine hits every mode
                for mode, argv in chosen.items():
                    times[mode].append(run_once(argv, driver, out))
            results[name] = {mode: statistics.median(t) for mode, t in times.items()}
            best[name] = {mode: min(t) for mode, t in times.items()}
            spread = {mode: (min(t), max(t)) for mode, t in times.items()}
            print(f"{name}: " + ", ".join(f"{m} {results[name][m]:.3f} s [{lo:.3f}-{hi:.3f}]"
                                          for m, (lo, hi) in spread.items()), file=sys.stderr)
    names = list(BENCHMARKS)
    if args.markdown:
        print("| mode: ratio of medians (of the fastest runs) | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        print("| untraced (s): median (fastest) | " + " | ".join(
            f"{results[n]['untraced']:.3f} ({best[n]['untraced']:.3f})" for n in names) + " |")
        for mode in chosen:
            if mode != "untraced":
                print(f"| `{mode}` | " + " | ".join(
                    f"{results[n][mode] / results[n]['untraced']:.2f}x ({best[n][mode] / best[n]['untraced']:.2f}x)"
                    for n in names) + " |")
    else:
        for n in names:
            print(n, {m: round(v / results[n]["untraced"], 2) for m, v in results[n].items()})


if __name__ == "__main__":
    main()
