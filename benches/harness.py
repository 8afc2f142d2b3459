"""Processes, tracers and paired rounds for the benchmarks.

Every measurement compares two processes that run side by side, round by
round: the *subject* (a workload in some mode: idle, shim, attached, ...) and
a *reference* (the same workload in a bare interpreter, or the C probe loop
without a consumer). Each round runs one of them and then the other, in
alternating order, so that the machine's drift (other builds on a shared
2-core machine) hits both alike; a round's cost per event is
``(subject - reference) / events``, and the figures are medians over rounds.

Each process times its own rounds (``time.perf_counter_ns`` around the
workload, ``clock_gettime`` in the C loop), so no pipe or scheduling latency
is in a figure. pytest-benchmark records the subject's rounds through
:func:`child_clock`, a clock that advances by exactly the time the process
reported; the paired reference rounds and the derived figures go into the
benchmark's ``extra_info``, from which ``report.py`` writes BENCHMARKS.md.

Traced modes attach a real ``bpftrace -p PID`` with the two-sided handshake of
``tests/tracing.py`` (its BEGIN line, then ``dtrace.wait_for_consumer`` in the
workload): no step waits on a sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(BENCHES))

import tracing  # noqa: E402  (tests/tracing.py: Bpftrace, the handshake, require_tracer)
import workloads  # noqa: E402
from dtrace.tools.command import interpreter  # noqa: E402
from dtrace.tools.proc import elf  # noqa: E402

STEP_TIMEOUT = tracing.STEP_TIMEOUT
QUICK = os.environ.get("PYDTRACE_BENCH_QUICK") == "1"
#: What the figures are computed from: "cpu" (the measured thread's CPU time: user and
#: system, so uprobe traps and the consumer's BPF program count, but not the time the
#: process waits for a CPU that another process holds: robust on a shared machine) or
#: "wall" (wall-clock time). Both are recorded either way.
METRIC = os.environ.get("PYDTRACE_BENCH_CLOCK", "cpu")


@dataclass(frozen=True)
class Plan:
    """Rounds per measurement (and a scale for the work per round)."""

    quiet_rounds: int
    traced_rounds: int
    warmup: int
    scale: float


FULL = Plan(quiet_rounds=25, traced_rounds=11, warmup=2, scale=1.0)
QUICK_PLAN = Plan(quiet_rounds=7, traced_rounds=5, warmup=1, scale=0.5)


def plan() -> Plan:
    return QUICK_PLAN if QUICK else FULL


def scaled(n: int) -> int:
    return max(1, round(n * plan().scale))


# -- the clock pytest-benchmark reads -------------------------------------------------------------

_CLOCK_NS = 0


def child_clock() -> float:
    """Seconds of workload that the benchmark processes have reported so far.

    Given to pytest-benchmark as its timer: around each round it reads this,
    the round runs in a child process, which reports the nanoseconds it timed
    itself, and the clock is advanced by exactly that.
    """
    return _CLOCK_NS / 1e9


def _advance(ns: int) -> None:
    global _CLOCK_NS
    _CLOCK_NS += ns


# -- processes ------------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a benchmark process: no arming by .pth, no forcing, unless asked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYDTRACE", "PYUSDT"))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONHASHSEED"] = "0"
    env.update(extra)
    return env


class Proc:
    """A process that speaks the benchmark line protocol (child.py, or the C floor)."""

    def __init__(self, argv: list[str], env: dict[str, str], name: str) -> None:
        self.name = name
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.stdout = tracing.Lines(self.process.stdout, name)
        self.stderr = tracing.Lines(self.process.stderr, name + "'s stderr")
        ready = self.expect("READY")
        self.pid: int = ready["pid"]
        self.library: str | None = ready.get("library")
        self.ready = ready

    def expect(self, tag: str, timeout: float = STEP_TIMEOUT) -> Any:
        line = self.stdout.next(timeout)
        if line is None or not line.startswith(tag + " "):
            self.kill()
            raise AssertionError(f"{self.name}: expected {tag}, got {line!r}; stderr: {self.stderr.rest(5)}")
        return json.loads(line[len(tag) + 1 :])

    def ask(self, command: str, tag: str, timeout: float = STEP_TIMEOUT) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.expect(tag, timeout)

    def go(self) -> Any:
        return self.ask("go", "LIVE")

    def run(self, n: int) -> dict[str, int]:
        return self.ask(f"run {n}", "DONE", timeout=600)

    def state(self) -> Any:
        return self.ask("state", "STATE")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(STEP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def python_child(workload: str, mode: str, probes: tuple[str, ...] = (), **env: str) -> Proc:
    """A Python benchmark process (child.py) running ``workload`` in ``mode``."""
    argv = [sys.executable, str(BENCHES / "child.py"), workload, mode, ",".join(probes)]
    return Proc(argv, clean_env(**env), f"{workload}/{mode}")


def pyusdt_available() -> str | None:
    """Why pyusdt cannot be measured here, or None."""
    import importlib.util

    if importlib.util.find_spec("libpyusdt") is None or importlib.util.find_spec("pyusdt") is None:
        return "pyusdt is not installed in this environment (pip install pyusdt)"
    return None


# -- the C floor ----------------------------------------------------------------------------------

_FLOOR_DIR: Path | None = None
#: The C loop's variants: the probe site as sys/sdt.h writes it (a 1-byte nop, as pydtrace's
#: emitter does too), and with a 5-byte nop (which kernels with optimized uprobes can patch).
FLOOR_VARIANTS = {"nop": [], "nop5": ["-DPROBE_NOP5"]}


def floor_binaries(variant: str = "nop") -> tuple[Path, Path]:
    """The C probe loop, built once per session; two copies (traced, and reference), so that the
    reference is a different file: uprobes are set per file, not per process."""
    global _FLOOR_DIR
    if _FLOOR_DIR is None:
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise FloorUnavailable("no C compiler (Debian: apt-get install gcc)")
        if not any(Path(d, "sys/sdt.h").exists() for d in ("/usr/include", "/usr/include/x86_64-linux-gnu",
                                                            "/usr/include/aarch64-linux-gnu", "/usr/local/include")):
            raise FloorUnavailable("sys/sdt.h is missing (Debian: apt-get install systemtap-sdt-dev)")
        directory = Path(tempfile.mkdtemp(prefix="pydtrace-floor-"))
        for name, flags in FLOOR_VARIANTS.items():
            binary = directory / f"probe_floor_{name}"
            result = subprocess.run([cc, "-O2", *flags, "-o", str(binary), str(BENCHES / "floor" / "probe_floor.c")],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise FloorUnavailable(f"building the C floor failed: {result.stderr.strip()}")
            shutil.copy2(binary, directory / f"probe_floor_{name}_reference")
        _FLOOR_DIR = directory
    return _FLOOR_DIR / f"probe_floor_{variant}", _FLOOR_DIR / f"probe_floor_{variant}_reference"


class FloorUnavailable(Exception):
    pass


#: The C floor's probe loop for each probe set a workload counts.
FLOOR_KIND = {("function-entry",): "entry", ("line",): "line", ("gc-start", "gc-done"): "gc",
              workloads.INSTANCE_PROBES: "instance", workloads.CFUNCTION_PROBES: "cfunction"}


def floor_child(kind: str, traced: bool, variant: str = "nop") -> Proc:
    traced_binary, reference_binary = floor_binaries(variant)
    binary = traced_binary if traced else reference_binary
    argv = [str(binary), kind] + (["--wait"] if traced else [])
    return Proc(argv, clean_env(), f"floor-{kind}-{variant}{'-traced' if traced else ''}")


# -- consumers ------------------------------------------------------------------------------------


def probe_program(probes: tuple[str, ...], provider: str = "python") -> str:
    """A bpftrace program that counts every event of ``probes`` in one map, @events."""
    return "\n".join(
        f"usdt:{{lib}}:{provider}:{probe.replace('-', '__')} {{ @events = count(); }}" for probe in probes
    )


def start_tracer(program: str, proc: Proc, library: str | None = None) -> tracing.Bpftrace:
    """Attaches bpftrace to ``proc``'s probe object (or to ``library``) and returns once its BEGIN ran."""
    library = library or proc.library
    assert library, f"{proc.name} has no probe object"
    tracer = tracing.Bpftrace(program, proc.pid, library)
    try:
        tracer.start()  # returns after BEGIN: every probe of the program is attached
    except BaseException:
        tracer.kill()
        raise
    return tracer


# -- the interpreter's own probes (a CPython built --with-dtrace) --------------------------------


def interpreter_object(pid: int, probes: tuple[str, ...]) -> str | None:
    """The object of process ``pid``'s interpreter (its executable or libpython) that declares
    every one of ``probes`` itself, or None where it does not declare them all (only CPython 3.15+
    built ``--with-dtrace`` declares the function probes)."""
    declared = interpreter.declared(pid, None)
    paths = {declared.get(probe.replace("-", "__")) for probe in probes}
    return paths.pop() if len(paths) == 1 and None not in paths else None


def wait_for_interpreter_consumer(pid: int, path: str, probes: tuple[str, ...]) -> None:
    """The second side of the handshake for a consumer of the interpreter's own probes: returns
    once the interpreter's semaphore of each of ``probes`` is raised in process ``pid`` (bpftrace
    0.17 raises them after its BEGIN), read from the process's memory at the notes' addresses.
    A process without ``dtrace`` has no ``wait_for_consumer``."""
    obj = elf.read(path)
    assert obj is not None, f"{path} has no SDT notes"
    names = [probe.replace("-", "__") for probe in probes]
    deadline = time.monotonic() + STEP_TIMEOUT
    while True:
        counters = elf.semaphores(pid, obj) or {}
        if all(counters.get(name) for name in names):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the interpreter's semaphores of {names} in process {pid} stayed down: {counters}")
        time.sleep(0.001)


# -- event counts ---------------------------------------------------------------------------------

_COUNTS: dict[tuple[str, int], dict[str, int]] = {}


def event_counts(workload: str, n: int) -> dict[str, int]:
    """The events one round of ``workload`` with ``n`` gives, per probe (counted once per session
    with plain Python sys.monitoring callbacks, in a process of its own)."""
    key = (workload, n)
    if key not in _COUNTS:
        proc = python_child(workload, "count")
        try:
            _COUNTS[key] = proc.ask(f"count {n}", "COUNT", timeout=600)
        finally:
            proc.close()
    return _COUNTS[key]


def events_per_round(workload: str, probes: tuple[str, ...], n: int, gc_per_round: float) -> float:
    """Events of ``probes`` in one round: code events as counted, two per collection for gc."""
    declared = workloads.WORKLOADS[workload].events_per_n
    if declared is not None:
        return declared * n
    counts = event_counts(workload, n)
    total = 0.0
    for probe in probes:
        if probe in workloads.GC_PROBES:
            total += gc_per_round
        else:
            total += counts[probe]
    return total


# -- paired rounds --------------------------------------------------------------------------------


def quartiles(values: list[float]) -> dict[str, float]:
    if len(values) == 1:
        return {"median": values[0], "q1": values[0], "q3": values[0]}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3}


@dataclass
class Pair:
    """A second (traced, reference) pair measured in the same rounds as the subject, so that a
    ratio between the two pairs is taken round by round (the C floor beside an attached
    workload, or pydtrace beside pyusdt)."""

    name: str
    traced: Proc
    reference: Proc
    n: int
    traced_rounds: dict[str, list[int]] = field(default_factory=lambda: {"ns": [], "cpu": []})
    reference_rounds: dict[str, list[int]] = field(default_factory=lambda: {"ns": [], "cpu": []})


@dataclass
class Measurement:
    """The rounds of one subject, each paired with a reference round: {"ns": [...], "cpu": [...]}."""

    subject: dict[str, list[int]] = field(default_factory=lambda: {"ns": [], "cpu": []})
    reference: dict[str, list[int]] = field(default_factory=lambda: {"ns": [], "cpu": []})
    subject_gc: list[int] = field(default_factory=list)
    companions: list[Pair] = field(default_factory=list)


#: Every measurement of this session, for the summary conftest prints.
RESULTS: list[dict[str, Any]] = []


def _keep(into: dict[str, list[int]], done: dict[str, int]) -> None:
    for key in into:
        into[key].append(done[key])


def measure(benchmark, subject: Proc, reference: Proc, n: int, rounds: int, warmup: int,
            companions: list[Pair] = ()) -> Measurement:
    """Runs ``rounds`` paired rounds (after ``warmup`` unrecorded ones) through pytest-benchmark.

    Round k: the reference (and each companion pair) runs before the subject when k is even,
    after it when k is odd. The benchmark's timer (:func:`child_clock`) sees only the
    subject's own time.
    """
    result = Measurement(companions=list(companions))
    counter = {"round": 0}

    def others():
        recording = counter["round"] >= warmup
        done = reference.run(n)
        if recording:
            _keep(result.reference, done)
        for pair in result.companions:
            traced, untraced = pair.traced.run(pair.n), pair.reference.run(pair.n)
            if recording:
                _keep(pair.traced_rounds, traced)
                _keep(pair.reference_rounds, untraced)

    def setup():
        if counter["round"] % 2 == 0:
            others()

    def subject_round():
        done = subject.run(n)
        _advance(done[_KEY[METRIC]])
        if counter["round"] >= warmup:
            _keep(result.subject, done)
            result.subject_gc.append(done["gc"])

    def teardown():
        if counter["round"] % 2 == 1:
            others()
        counter["round"] += 1

    benchmark.pedantic(subject_round, setup=setup, teardown=teardown, rounds=rounds, warmup_rounds=warmup)
    assert len(result.subject["ns"]) == len(result.reference["ns"]) == rounds
    return result


#: The key of each metric in a round's answer.
_KEY = {"wall": "ns", "cpu": "cpu"}


def figures(subject: list[int], reference: list[int], events: float | None) -> dict[str, Any]:
    """Quartiles of the subject's and reference's rounds, of their ratio, and of the paired
    difference per event."""
    out = {
        "subject": quartiles([float(x) for x in subject]),
        "reference": quartiles([float(x) for x in reference]),
        "ratio": quartiles([s / r for s, r in zip(subject, reference)]),
    }
    if events:
        out["per_event_ns"] = quartiles([(s - r) / events for s, r in zip(subject, reference)])
    return out


def pair_events(pair: Pair, subject_events: float | None) -> float:
    """Events per round of a companion pair: the C floor fires one per step; a Python
    companion runs the subject's workload with the same ``n`` (so, the same events)."""
    if pair.name.startswith("floor"):
        return float(pair.n)
    return float(subject_events or 0)


def record(benchmark, info: dict[str, Any], m: Measurement, events: float | None) -> dict[str, Any]:
    """Puts the paired figures into the benchmark's extra_info (and the session's RESULTS).

    The top-level ``subject``, ``reference``, ``ratio`` and ``per_event_ns`` are of
    :data:`METRIC`; ``wall`` and ``cpu`` hold both.
    """
    info = dict(info)
    info.update(
        python=".".join(map(str, sys.version_info[:3])),
        metric=METRIC,
        rounds=len(m.subject["ns"]),
        rounds_ns={"subject": m.subject, "reference": m.reference},
        events_per_round=events,
        gc_per_round=statistics.fmean(m.subject_gc) if m.subject_gc else 0,
    )
    for metric, key in _KEY.items():
        info[metric] = figures(m.subject[key], m.reference[key], events)
    def per_event(pair: Pair, key: str) -> list[float]:
        events_of_pair = pair_events(pair, events)
        return [(t - r) / events_of_pair for t, r in zip(pair.traced_rounds[key], pair.reference_rounds[key])]

    floor = next((pair for pair in m.companions if pair.name == "floor"), None)
    for pair in m.companions:
        # Per round: the companion pair's cost per event, and the subject's cost per event over it
        # (and, beside a floor pair, the companion's over the floor's).
        pair_info: dict[str, Any] = {"n": pair.n, "rounds_ns": {"traced": pair.traced_rounds,
                                                                  "reference": pair.reference_rounds}}
        for metric, key in _KEY.items():
            subject_pe = [(s - r) / events for s, r in zip(m.subject[key], m.reference[key])] if events else []
            pair_pe = per_event(pair, key)
            pair_info[metric] = {
                "per_event_ns": quartiles(pair_pe),
                "subject_over_pair": quartiles([a / b for a, b in zip(subject_pe, pair_pe) if b > 0]) if subject_pe else None,
            }
            if floor is not None and pair is not floor:
                over = [a / b for a, b in zip(pair_pe, per_event(floor, key)) if b > 0]
                pair_info[metric]["over_floor"] = quartiles(over) if over else None
        pair_info.update(pair_info[METRIC])
        info.setdefault("companions", {})[pair.name] = pair_info
    info.update(info[METRIC])
    benchmark.extra_info.update(info)
    RESULTS.append(info)
    return info
