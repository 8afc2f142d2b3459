"""Run every benchmark and write BENCHMARKS.md.

    python benches/report.py [--python PY ...] [--quick] [--output BENCHMARKS.md]

For each Python (default: this one) it runs ``pytest benches --benchmark-only``
(timings: every workload in every mode, paired round by round with a bare
interpreter; the C uprobe floor and pyusdt in the same rounds as the attached
workload) and ``benches/callgrind.py`` (instruction counts: import cost, idle
overhead, dispatch floor and shim), then writes one report from that run.
``--results DIR`` keeps the raw JSON; ``--from DIR`` writes the report again
from kept results without measuring.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent
sys.path.insert(0, str(BENCHES))

import analysis  # noqa: E402
import callgrind  # noqa: E402
import sections  # noqa: E402
import workloads  # noqa: E402

#: The issue's targets.
IDLE_BOUND = 1.005
IMPORT_BOUND = 2_000_000
SHIM_BOUND = 2.0
ATTACHED_BOUND = 1.15
PYUSDT_BOUND = 0.5


# -- running ----------------------------------------------------------------------------------------


def run_command(argv: list[str], **kwargs) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kwargs).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dirty = run_command(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "bpftrace": run_command(["bpftrace", "--version"]) if shutil.which("bpftrace") else "not installed",
        "valgrind": run_command(["valgrind", "--version"]) if shutil.which("valgrind") else "not installed",
        "commit": run_command(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT) + (" (with uncommitted changes)" if dirty else ""),
        "load_before": os.getloadavg(),
    }


def python_info(python: str) -> dict[str, Any]:
    code = (
        "import sys, json, importlib.metadata as m\n"
        "def v(name):\n"
        "    try: return m.version(name)\n"
        "    except m.PackageNotFoundError: return None\n"
        "import sysconfig\n"
        "print(json.dumps({'version': '.'.join(map(str, sys.version_info[:3])), 'executable': sys.executable,"
        " 'pydtrace': v('pydtrace-rs'), 'pyusdt': v('pyusdt'), 'pytest_benchmark': v('pytest-benchmark'),"
        " 'with_dtrace': bool(sysconfig.get_config_var('WITH_DTRACE'))}))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDTRACE")}
    return json.loads(run_command([python, "-c", code], env=env) or "{}")


def measure(python: str, results: Path, quick: bool, with_callgrind: bool, with_timing: bool = True) -> dict[str, Any]:
    info = python_info(python)
    tag = info.get("version", "python")
    if not with_timing:
        previous = results / f"python-{tag}.json"
        if previous.exists():
            info = {**json.loads(previous.read_text()), **info}
        print(f"==> instruction counts on Python {tag} (callgrind)", flush=True)
        figures = callgrind.measure(python, quick=quick)
        (results / f"callgrind-{tag}.json").write_text(json.dumps(figures, indent=2))
        previous.write_text(json.dumps(info, indent=2))
        return info
    timing = results / f"timing-{tag}.json"
    argv = [python, "-m", "pytest", str(BENCHES), "--benchmark-only", "-q", "-p", "no:cacheprovider",
            f"--benchmark-json={timing}", f"--ignore={BENCHES / 'test_scope.py'}"]  # benches/scope.py runs that
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDTRACE")}
    if quick:
        env["PYDTRACE_BENCH_QUICK"] = "1"
    print(f"==> timings on Python {tag}: {' '.join(argv)}", flush=True)
    started = datetime.datetime.now()
    code = subprocess.run(argv, cwd=ROOT, env=env).returncode
    info["timing_minutes"] = (datetime.datetime.now() - started).total_seconds() / 60
    info["pytest_exit"] = code
    if with_callgrind and callgrind.valgrind_available() is None:
        print(f"==> instruction counts on Python {tag} (callgrind)", flush=True)
        figures = callgrind.measure(python, quick=quick)
        (results / f"callgrind-{tag}.json").write_text(json.dumps(figures, indent=2))
    (results / f"python-{tag}.json").write_text(json.dumps(info, indent=2))
    return info


# -- writing --------------------------------------------------------------------------------------


def fmt_ns(fig: analysis.Figure | None, digits: int = 1) -> str:
    return "n/a" if fig is None else f"{fig.median:.{digits}f} [{fig.q1:.{digits}f}, {fig.q3:.{digits}f}]"


def fmt_ratio_fig(fig: analysis.Figure | None, digits: int = 3) -> str:
    return "n/a" if fig is None else f"{fig.median:.{digits}f} [{fig.q1:.{digits}f}, {fig.q3:.{digits}f}]"


def fmt_ratio(ratio: analysis.Ratio | None) -> str:
    return "n/a" if ratio is None else f"{ratio.value:.2f} [{ratio.lo:.2f}, {ratio.hi:.2f}]"


def verdict(ok: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "inside the noise"}[ok]


def mi(n: float) -> str:
    return f"{n / 1e6:.2f} M"


class Run:
    """Everything measured for one Python."""

    def __init__(self, results: Path, tag: str) -> None:
        self.tag = tag
        self.info = json.loads((results / f"python-{tag}.json").read_text())
        timing = results / f"timing-{tag}.json"
        self.timing = analysis.Results.from_json(json.loads(timing.read_text())) if timing.exists() else None
        cg = results / f"callgrind-{tag}.json"
        self.cg = json.loads(cg.read_text()) if cg.exists() else None


def timing_cells(runs: list[Run], part) -> list[str]:
    """One target cell per run: ``part(run, workload)`` for every timed workload, joined; "n/a"
    for a run without timings, "n/a (no tracer)" where no workload gave a part."""
    cells = []
    for r in runs:
        if not r.timing:
            cells.append("n/a")
            continue
        parts = [p for w in r.timing.workloads() if (p := part(r, w))]
        cells.append("<br>".join(parts) or "n/a (no tracer)")
    return cells


def targets_section(runs: list[Run]) -> list[str]:
    out = ["## Targets", "",
           "Each cell: the figure, its verdict. Timing figures are medians over paired rounds with "
           "their interquartile range in brackets; where that range straddles the bound, the "
           "timing cannot decide and the instruction count (callgrind) does (docs/decisions.md, 11).", ""]
    header = "| target | " + " | ".join(f"Python {r.tag}" for r in runs) + " |"
    out += [header, "|---" * (len(runs) + 1) + "|"]

    def row(name: str, cells: list[str]) -> None:
        out.append(f"| {name} | " + " | ".join(cells) + " |")

    # Idle.
    cells = []
    for r in runs:
        parts = []
        if r.cg:
            ws = r.cg["workloads"]
            own = sum(w.get("idle_own", 0) for w in ws.values())
            lo = min(w["idle_ratio"] for w in ws.values())
            hi = max(w["idle_ratio"] for w in ws.values())
            worst = max(ws.items(), key=lambda kv: kv[1]["idle_ratio"])[0]
            disarmed = max(abs(w["disarmed"] / w["bare"] - 1) for w in ws.values())
            ok = own == 0 and hi <= IDLE_BOUND
            parts.append(f"instructions: {lo:.4f} to {hi:.4f}x bare ({worst}); {own} instructions in pydtrace's "
                         f"code during the idle runs: {verdict(ok) if hi <= IDLE_BOUND or own else 'met in our code; see findings'}")
        if r.timing:
            ratios = {w: r.timing.ratio(w, "idle") for w in r.timing.workloads()}
            ratios = {w: f for w, f in ratios.items() if f}
            if ratios:
                worst_w, worst_f = max(ratios.items(), key=lambda kv: kv[1].median)
                aa = [r.timing.ratio(w, "bare") for w in ratios]
                spread = max(max(abs(f.q1 - 1), abs(f.q3 - 1)) for f in aa if f) if any(aa) else 0
                # The rounds' range is noise within one pair of processes; two bare processes differ by
                # up to the A/A spread (their layouts differ). A ratio inside that cannot decide either.
                decided = [True if f.q3 <= IDLE_BOUND else
                           (False if f.q1 > IDLE_BOUND and f.median - 1 > spread else None)
                           for f in ratios.values()]
                ok = False if any(d is False for d in decided) else (None if None in decided else True)
                parts.append(f"time: medians {min(f.median for f in ratios.values()):.3f} to "
                             f"{worst_f.median:.3f}x ({worst_w}), A/A spread ±{spread:.1%}: {verdict(ok)}")
        cells.append("<br>".join(parts) or "n/a")
    row(f"idle at most {IDLE_BOUND}x bare, every workload", cells)

    # Import.
    cells = []
    for r in runs:
        if r.cg:
            cost = r.cg["import"]["import dtrace (armed)"]["over_bare_total"]
            cells.append(f"{mi(cost)} instructions: {verdict(cost <= IMPORT_BOUND)}")
        else:
            cells.append("n/a")
    row(f"`import dtrace` at most {mi(IMPORT_BOUND)} instructions over a bare start", cells)

    # Shim.
    cells = []
    for r in runs:
        parts = []
        if r.cg:
            ratios = {w: v.get("shim_to_noop") for w, v in r.cg["workloads"].items()
                      if v.get("shim_to_noop") and "shim-new" not in v}
            if ratios:
                worst = max(ratios.items(), key=lambda kv: kv[1])
                parts.append(f"instructions: at most {worst[1]:.2f}x ({worst[0]}): "
                             f"{verdict(all(v <= SHIM_BOUND for v in ratios.values()))}")
            obj = r.cg["workloads"].get("object", {})
            if "new_shim_to_noop" in obj:
                parts.append(f"instance-new (object): {obj['new_shim_to_noop']:.2f}x: "
                             f"{verdict(obj['new_shim_to_noop'] <= SHIM_BOUND)}; instance-delete: "
                             + (f"{obj['delete_shim_per_event']:.0f} instructions per event, no dispatch floor"
                                if "delete_shim_per_event" in obj else "not armed on this version"))
        if r.timing:
            rows = {row_["workload"]: row_["shim_to_noop"] for row_ in r.timing.rows()
                    if row_["shim_to_noop"] and row_["workload"] != "object"}
            if rows:
                text = ", ".join(f"{w} {x.value:.2f}" for w, x in rows.items())
                decided = [x.decided(SHIM_BOUND) for x in rows.values()]
                ok = False if False in decided else (None if None in decided else True)
                parts.append(f"time: {text}: {verdict(ok)}")
        cells.append("<br>".join(parts) or "n/a")
    row(f"shim (probes on, no consumer) at most {SHIM_BOUND}x the no-op dispatch floor per event", cells)

    # Attached.
    def attached_part(r: Run, w: str) -> str | None:
        ratio = r.timing.attached_to_floor(w)
        return ratio and f"{w} {ratio.value:.2f} [{ratio.lo:.2f}, {ratio.hi:.2f}]: {verdict(ratio.decided(ATTACHED_BOUND))}"

    row(f"attached at most {ATTACHED_BOUND}x the C uprobe floor per event", timing_cells(runs, attached_part))

    # gc-only.
    def gc_only_part(r: Run, w: str) -> str | None:
        gc_only, idle = r.timing.ratio(w, "attached-gc"), r.timing.ratio(w, "idle")
        if not gc_only:
            return None
        pe = r.timing.per_event(w, "attached-gc")
        return (f"{w}: {gc_only.median:.3f}x bare (idle {idle.median:.3f}x), "
                f"{pe.median:+.1f} ns/event; no sys.monitoring event set")

    row("attaching only the gc probes leaves the call and line workloads at idle cost", timing_cells(runs, gc_only_part))

    # pyusdt.
    cells = []
    for r in runs:
        ratio = r.timing.attached_to_pyusdt("call") if r.timing else None
        cells.append("n/a" if ratio is None else
                     f"{ratio.value:.2f} [{ratio.lo:.2f}, {ratio.hi:.2f}] of pyusdt's cost per call: "
                     f"{verdict(ratio.decided(PYUSDT_BOUND))}")
    row(f"attached at most {PYUSDT_BOUND}x pyusdt's cost per call (call-heavy loop)", cells)

    # The interpreter's own function probe (CPython 3.15+ built --with-dtrace): a comparison, no target.
    cells = [cpython_cell(r) for r in runs]
    if any(cell != "n/a" for cell in cells):
        row("attached, beside CPython's own `function__entry` (call-heavy loop, same rounds; no target)",
            [cell if cell != "n/a" else "n/a: the interpreter declares no function probes" for cell in cells])
    return out


def cpython_cell(r: Run) -> str:
    """pydtrace's attached cost per call over the interpreter's own probe's, and each over the C
    floor, all measured in the same rounds; "n/a" where the interpreter declares no such probe."""
    res = r.timing
    ratio = res.attached_to_cpython("call") if res else None
    if ratio is None:
        return "n/a"
    ours = res.companion_to_floor("call", "cpython-attached", "pydtrace")
    theirs = res.subject_to_floor("call", "cpython-attached")
    text = f"pydtrace {fmt_ratio(ratio)} of CPython's cost per call"
    if ours and theirs:
        text += f"; over the C floor: pydtrace {fmt_ratio(ours)}, CPython's {fmt_ratio(theirs)}"
    return text


MODE_TEXT = {
    "bare": "bare (A/A: a second bare interpreter; the noise)",
    "idle": "idle: `import dtrace`, armed, nothing attached",
    "noop": "no-op builtin as the callback (dispatch floor)",
    "builtin": "`operator.is_` as the callback (a plain builtin)",
    "shim": "shim: probes forced on, no consumer",
    "pyusdt-idle": "pyusdt imported, nothing attached",
    "attached": "attached: bpftrace counts the probes",
    "attached-gc": "attached: bpftrace counts only gc-start/gc-done",
    "pyusdt-attached": "pyusdt attached: bpftrace counts its probe",
    "cpython-attached": "CPython's own probe attached: bpftrace counts the interpreter's copy (no dtrace imported)",
}


def workload_section(run: Run) -> list[str]:
    res = run.timing
    if res is None:
        return []
    out = [f"### Python {run.tag}: every workload in every mode", "",
           "ns/event: the subject's round minus the paired bare round, divided by the events the "
           "workload's probes see in a round (counted once with sys.monitoring; two per collection "
           "for gc). CPU time of the measured thread; wall-clock in the last column.", ""]
    for w in res.workloads():
        bare = res.get(w, "bare")
        if bare is None:
            continue
        wl = workloads.WORKLOADS.get(w)
        out.append(f"**{w}**: {wl.description if wl else ''}; probes {', '.join(bare['probes'])}; "
                   f"{bare['events_per_round']:.0f} events per round of {bare['reference']['median'] / 1e6:.1f} ms "
                   f"({bare['reference']['median'] / bare['events_per_round']:.1f} ns of work per event).")
        out.append("")
        out.append("| mode | ns/event [IQR] | time / bare [IQR] | ratio to its floor | wall ns/event |")
        out.append("|---|---|---|---|---|")
        noop = res.per_event(w, "noop")
        for mode in MODE_TEXT:
            info = res.get(w, mode)
            if info is None:
                continue
            pe = res.per_event(w, mode)
            ratio = res.ratio(w, mode)
            floor_text = ""
            if mode == "shim" and pe and noop:
                floor_text = f"{fmt_ratio(pe.ratio_to(noop))} of the no-op dispatch"
            elif mode == "attached":
                r = res.attached_to_floor(w)
                floor_text = f"{fmt_ratio(r)} of the C floor ({fmt_ns(res.floor(w))} ns, same rounds)" if r else ""
            elif mode == "pyusdt-attached":
                r = res.attached_to_pyusdt(w)
                paired = res.companion(w, mode, "pydtrace")
                if r and paired:
                    floor_text = (f"pydtrace beside it: {fmt_ns(analysis.Figure.of(paired['per_event_ns']))} ns, "
                                  f"{fmt_ratio(r)} of pyusdt")
            elif mode == "cpython-attached":
                r = res.attached_to_cpython(w)
                paired = res.companion(w, mode, "pydtrace")
                floor = res.companion(w, mode, "floor")
                theirs = res.subject_to_floor(w, mode)
                ours = res.companion_to_floor(w, mode, "pydtrace")
                if r and paired:
                    floor_text = (f"pydtrace beside it: {fmt_ns(analysis.Figure.of(paired['per_event_ns']))} ns, "
                                  f"{fmt_ratio(r)} of CPython's")
                if floor and theirs and ours:
                    floor_text += (f"; the C floor beside both: {fmt_ns(analysis.Figure.of(floor['per_event_ns']))} "
                                   f"ns; CPython's {fmt_ratio(theirs)} of it, pydtrace's {fmt_ratio(ours)}")
            wall = analysis.Figure.of(info.get("wall", {}).get("per_event_ns"))
            out.append(f"| {MODE_TEXT[mode]} | {fmt_ns(pe)} | {fmt_ratio_fig(ratio)} | {floor_text} | "
                       f"{'n/a' if wall is None else f'{wall.median:.1f}'} |")
        out.append("")
    floors = [(name, info) for (name, mode), info in res.by_key.items() if mode == "floor"]
    if floors:
        out += ["**The C uprobe floor** on its own (`benches/floor/probe_floor.c`: the same SDT probe, the "
                "same arguments in registers, the same bpftrace program, a loop of 100,000 events per round "
                "paired with an untraced copy):", "",
                "| probe site | ns/event [IQR] | wall ns/event |", "|---|---|---|"]
        for name, info in floors:
            pe = analysis.Figure.of(info.get("per_event_ns"))
            wall = analysis.Figure.of(info.get("wall", {}).get("per_event_ns"))
            label = name.removeprefix("floor-")
            label = {"entry": "function__entry, `nop` (sys/sdt.h, as pydtrace emits it)",
                     "line": "line, `nop`", "gc": "gc__start + gc__done, `nop`",
                     "cfunction": "cfunction__entry + cfunction__return, `nop`",
                     "entry-nop5": "function__entry, 5-byte `nop` (optimizable uprobe)"}.get(label, label)
            out.append(f"| {label} | {fmt_ns(pe)} | {'n/a' if wall is None else f'{wall.median:.1f}'} |")
        out.append("")
    return out


def callgrind_section(runs: list[Run]) -> list[str]:
    runs = [r for r in runs if r.cg]
    if not runs:
        return ["## Instruction counts", "", "valgrind was not available: no deterministic figures.", ""]
    out = ["## Instruction counts (callgrind, deterministic)", "",
           "`valgrind --tool=callgrind`, `PYTHONHASHSEED=0`, bytecode caches as installed. Repeatable to "
           "about 0.1% here.", ""]
    out += ["### `import dtrace`", "", "| start-up | " + " | ".join(f"Python {r.tag}: instructions (over bare)" for r in runs) + " |",
            "|---" * (len(runs) + 1) + "|"]
    labels = list(runs[0].cg["import"])
    for label in labels:
        cells = []
        for r in runs:
            v = r.cg["import"].get(label)
            cells.append("n/a" if v is None else f"{mi(v['total'])} ({'+' if v['over_bare_total'] >= 0 else ''}{mi(v['over_bare_total'])})")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append("")
    out += ["### One run of each workload, main thread only", "",
            "Counted inside the measured call only (`--toggle-collect=ffi_call`: the driver calls the workload "
            "through ctypes, after a warm-up run "
            "in the same process). Per event: (mode − bare) / events. *Disarmed*: `import dtrace` under "
            "`PYDTRACE=0`. *In pydtrace's code*: instructions executed inside its shared object.", ""]
    for r in runs:
        out += [f"Python {r.tag}:", "",
                "| workload | n | events | bare | disarmed / bare | idle / bare | in pydtrace's code, idle | "
                "no-op dispatch per event | shim per event | of which in pydtrace's code | shim / no-op |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for w, v in r.cg["workloads"].items():
            out.append(f"| {w} | {v['n']} | {v['events']} | {mi(v['bare'])} | {v['disarmed'] / v['bare']:.4f} | "
                       f"{v['idle_ratio']:.4f} | {v.get('idle_own', 0)} | "
                       f"{v.get('noop_per_event', 0):.0f} | {v.get('shim_per_event', 0):.0f} | "
                       f"{v.get('shim_own_per_event', 0):.0f} | {v.get('shim_to_noop') or 0:.2f} |")
        obj = r.cg["workloads"].get("object", {})
        if "new_shim_to_noop" in obj:
            out.append("")
            out.append(f"object, the instance probes' halves on their own: instance-new {obj['new_shim_per_event']:.0f} "
                       f"instructions per event against its dispatch floor (no-op on CALL, C_RETURN, C_RAISE) of "
                       f"{obj['new_noop_per_event']:.0f} ({obj['new_shim_to_noop']:.2f}x; in pydtrace's code "
                       f"{obj['shim-new_own'] / (obj['events'] / 2):.0f}); instance-delete "
                       + (f"{obj['delete_shim_per_event']:.0f} per event (no dispatch floor: a deallocator of ours "
                          f"replaces CPython's)." if "delete_shim_per_event" in obj else "not measured: "
                          f"{r.cg.get('unsupported', {}).get('instance-delete-start', 'not armed')}."))
        watcher = r.cg.get("watcher")
        if watcher:
            out.append("")
            out.append(f"The idle watcher thread: {watcher['per_poll']:.0f} instructions per poll "
                       f"({watcher['polls']} polls, {watcher['gil_acquisitions']} GIL acquisitions, "
                       f"{watcher.get('handed_off', 0)} changes handed off), i.e. about "
                       f"{watcher['per_poll'] * 50 / 1000:.0f} thousand instructions per second at 50 polls per second.")
        out.append("")
    return out


def findings_section(runs: list[Run]) -> list[str]:
    """What the figures say where a target is missed or close, worked out from this run's data."""
    out = ["## Findings", ""]
    for r in runs:
        notes: list[str] = []
        if r.cg:
            imp = r.cg["import"]
            cost = imp["import dtrace (armed)"]["over_bare_total"]
            unarmed = imp["import dtrace with PYDTRACE=0 (not armed)"]["over_bare_total"]
            pulled = [m for m in r.cg.get("imported_by_dtrace", []) if m in ("__future__", "warnings")]
            text = (f"`import dtrace` costs {mi(cost)} instructions ({mi(unarmed)} without arming; "
                    f"the standard library's `_json` costs {mi(imp['import _json (a small C extension of the standard library)']['over_bare_total'])}).")
            if pulled:
                parts = [f"`{m}` ({mi(imp['import ' + m]['over_bare_total'])} on its own)" for m in pulled]
                text += (" It imports " + " and ".join(parts) + ": `from __future__ import annotations` executes an "
                         "import of the `__future__` module at run time, and the arming imports `warnings` "
                         "eagerly although it only warns on errors. Neither is needed on 3.12+.")
            notes.append(text)
        if r.cg:
            ws = r.cg["workloads"]
            own = sum(w.get("idle_own", 0) for w in ws.values())
            spread = max(abs(w["idle_ratio"] - 1) for w in ws.values())
            disarmed = max(abs(w["disarmed"] / w["bare"] - 1) for w in ws.values())
            for w, v in ws.items():
                timed = r.timing.ratio(w, "idle") if r.timing else None
                if timed and timed.q1 > IDLE_BOUND and v.get("idle_own", 0) == 0:
                    notes.append(f"{w}, idle: {timed.median:.3f}x bare's time [{timed.q1:.3f}, {timed.q3:.3f}] while "
                                 f"executing {v['idle_ratio']:.4f}x bare's instructions, none in pydtrace's code, "
                                 f"and {v['idle'] / v['disarmed']:.4f}x those of `import dtrace` under `PYDTRACE=0` "
                                 f"(imported, not armed): the time goes with the import's different start-up "
                                 f"(memory layout), not with a hook; the instruction count decides "
                                 f"(docs/decisions.md, 11).")
            if own == 0 and r.info.get("with_dtrace"):
                notes.append("Built `--with-dtrace`: the interpreter's own probe sites (each a test of its "
                             "semaphore, never raised in these runs) are in bare and idle alike, so idle / bare "
                             "is what `import dtrace` adds to such an interpreter.")
            if own == 0:
                notes.append(f"Idle: pydtrace's shared object executes no instruction in the main thread during any "
                             f"idle run. The idle runs' instruction counts still differ from bare by up to "
                             f"{spread:.2%} (either way), and the disarmed runs (`import dtrace`, `PYDTRACE=0`) by "
                             f"{disarmed:.2%}: the difference is the interpreter's own work on the same bytecode "
                             f"after a different start-up (the allocator's pool state: on 3.13's line workload all "
                             f"of it is in `_PyObject_Malloc` and `_PyObject_Free`), not a hook.")
            for w, v in ws.items():
                top = v.get("shim_top") or []
                if top and v.get("shim_own_per_event"):
                    per = ", ".join(f"`{name.split('::')[-1]}` {count / v['events']:.0f}" for name, count in top[:3])
                    notes.append(f"{w}, shim: {v['shim_own_per_event']:.0f} instructions per event in pydtrace's code "
                                 f"(most: {per}).")
            obj = ws.get("object", {})
            if obj.get("shim-new_top"):
                half = obj["events"] / 2
                per = ", ".join(f"`{name.split('::')[-2] + '::' + name.split('::')[-1] if name.count('::') else name}` "
                                f"{count / half:.0f}" for name, count in obj["shim-new_top"][:3])
                notes.append(f"object, instance-new alone: {obj['new_shim_to_noop']:.2f}x its dispatch floor; "
                             f"{obj['shim-new_own'] / half:.0f} instructions per event in pydtrace's code (most: {per}).")
        if r.timing:
            gc_floor = r.timing.floor("gc")
            gc_noop = r.timing.per_event("gc", "noop")
            gc_shim = r.timing.per_event("gc", "shim")
            gc_att = r.timing.attached_to_floor("gc")
            if gc_floor and gc_noop and gc_att and gc_att.value > ATTACHED_BOUND:
                text = (f"gc: CPython's own `gc.callbacks` dispatch costs {gc_noop.median:.0f} ns per event with a "
                        f"callback that does nothing (it builds an info dict and a phase string per call), "
                        f"{gc_noop.median / gc_floor.median:.2f}x the uprobe floor ({gc_floor.median:.0f} ns) by "
                        f"itself, so no gc probe fed by `gc.callbacks` can be within {ATTACHED_BOUND}x of the floor.")
                if r.cg and r.cg["workloads"].get("gc", {}).get("shim_to_noop"):
                    g = r.cg["workloads"]["gc"]
                    text += (f" The shim's share is ours: {g['shim_per_event'] - g['noop_per_event']:.0f} "
                             f"instructions per event over the no-op callback ({g['shim_to_noop']:.2f}x).")
                notes.append(text)
            for w in r.timing.workloads():
                att = r.timing.per_event(w, "attached")
                shim = r.timing.per_event(w, "shim")
                floor = r.timing.floor(w)
                ratio = r.timing.attached_to_floor(w)
                if w == "gc" or not (att and shim and floor and ratio):
                    continue
                in_situ = att.median - shim.median
                notes.append(f"{w}: attached {att.median:.0f} ns/event = shim {shim.median:.0f} + "
                             f"{in_situ:.0f} for the uprobe hit in the running interpreter, against "
                             f"{floor.median:.0f} in the C loop ({in_situ / floor.median:.2f}x).")
            theirs = r.timing.per_event("call", "cpython-attached")
            ours_ratio = r.timing.attached_to_cpython("call")
            paired = r.timing.companion("call", "cpython-attached", "pydtrace")
            shim = r.timing.per_event("call", "shim")
            if theirs and ours_ratio and paired:
                ours = analysis.Figure.of(paired["per_event_ns"])
                own = Path(r.timing.get("call", "cpython-attached").get("interpreter_object") or "?").name
                premium = ours.median - theirs.median
                text = (f"call, the interpreter's own `function__entry`: {theirs.median:.0f} ns per call with "
                        f"bpftrace attached to it by the interpreter's path (`usdt:.../{own}:python:function__entry`"
                        f", `-p`, no dtrace imported); pydtrace's, attached in the same rounds, {ours.median:.0f} ns "
                        f"({ours_ratio.value:.2f}x), each event counted once by its consumer.")
                if shim:
                    text += (f" pydtrace's premium, {premium:.0f} ns per call, is "
                             f"{'within' if premium <= shim.median else 'more than'} its shim's {shim.median:.0f} ns "
                             f"(its sys.monitoring callback and the qualified name, arg3, which CPython's probe lacks).")
                notes.append(text)
            obj = r.timing.get("object", "shim")
            if obj and tuple(obj["probes"]) == workloads.INSTANCE_PROBES:
                notes.append("object: the instance probes' dispatch floor is the no-op callback on CALL, C_RETURN "
                             "and C_RAISE (what instance-new switches on); the delete probes replace the classes' "
                             "`tp_dealloc` and have no dispatch of their own, so the shim's ratio to that floor "
                             "includes the whole deallocation hook and is not like for like.")
            floors = {name: analysis.Figure.of(info.get("per_event_ns"))
                      for (name, mode), info in r.timing.by_key.items() if mode == "floor"}
            if floors.get("floor-entry") and floors.get("floor-entry-nop5"):
                a, b = floors["floor-entry"], floors["floor-entry-nop5"]
                notes.append(f"A 5-byte `nop` at the probe site instead of sys/sdt.h's 1-byte `nop` costs "
                             f"{b.median:.0f} ns per hit instead of {a.median:.0f} ({b.median / a.median:.2f}x) on "
                             f"this kernel, which patches a hit 5-byte nop into a call to its uprobe trampoline "
                             f"(optimized uprobes, x86_64) instead of trapping each time. pydtrace keeps the "
                             f"1-byte `nop` all the same: with a 5-byte one, a forked child of a traced process "
                             f"crashed here (it inherits the patched call but not the trampoline's mapping; "
                             f"tests/test_hardening.py's fork tests catch it).")
        if notes:
            out.append(f"Python {r.tag}:")
            out.append("")
            out += [f"- {n}" for n in notes]
            out.append("")
    return out


def display_path(path: str | None) -> str:
    """A path as the report shows it: relative to the checkout where it is inside (no machine's
    own folders in a committed report)."""
    if not path:
        return "?"
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return Path(path).name


def run_lines(machine: dict[str, Any], runs: list[Run]) -> list[str]:
    """When, where and on what a run measured, as a list of the page's header."""
    lines = [f"- Date: {machine['date']}; commit {machine['commit']}",
             f"- Machine: {machine['cpu']}, {machine['cores']} cores, Linux {machine['kernel']} ({machine['machine']}); "
             f"load average {machine['load_before'][0]:.2f} at the start, "
             f"{machine.get('load_after', [0])[0]:.2f} at the end (other jobs shared the machine)",
             f"- Tools: {machine['bpftrace']}; {machine['valgrind']}"]
    for r in runs:
        built = ", built --with-dtrace" if r.info.get("with_dtrace") else ""
        lines.append(f"- Python {r.tag} ({display_path(r.info.get('executable'))}{built}): pydtrace-rs "
                     f"{r.info.get('pydtrace')}, pyusdt {r.info.get('pyusdt') or 'not installed'}; timings took "
                     f"{r.info.get('timing_minutes', 0):.1f} min")
    return lines


HOW_MEASURED = [
    "## How it is measured", "",
    "- Every timed figure comes from two processes run side by side, round by round: the subject "
    "(a workload in one mode) and a bare interpreter running the same workload; the order alternates "
    "each round. Each process times its own rounds. A round's cost per event is (subject − bare) / "
    "events; figures are medians over rounds with the interquartile range.",
    "- The clock is the measured thread's CPU time (`time.thread_time_ns`, `CLOCK_THREAD_CPUTIME_ID`): "
    "it includes the kernel's uprobe trap and the consumer's BPF program (they run in the traced "
    "thread), and excludes time spent waiting for a CPU that another job holds, which on this shared "
    "2-core machine would otherwise dominate the spread. Wall-clock figures are recorded too.",
    "- The attached mode attaches a real `bpftrace -p PID` counting the workload's probes, with the "
    "two-sided handshake of the tests (its `BEGIN` line, then `dtrace.wait_for_consumer`); the C uprobe "
    "floor (`benches/floor/probe_floor.c`) runs under the same program in the same rounds, so their "
    "ratio is taken round by round. pyusdt is attached the same way, with pydtrace attached beside it "
    "in the same rounds. On an interpreter that declares the workload's probes itself, bpftrace attaches "
    "ours as the tools do there (by address, asked for through a lease: docs/interpreter-probes.md).",
    "- On a CPython that declares `function__entry` itself (3.15 and later built `--with-dtrace`), the "
    "call workload also runs without dtrace under bpftrace counting the interpreter's own probe "
    "(`usdt:INTERPRETER:python:function__entry` with `-p`; the handshake's second side reads the "
    "interpreter's semaphore in the process's memory), with pydtrace attached and the C floor beside it "
    "in the same rounds.",
    "- The dispatch floor is `dtrace._native._testing.noop_callback()` (a native METH_FASTCALL function that does "
    "nothing, the probe callbacks' calling convention) registered for exactly the events the probe "
    "uses, under the same tool id; for gc, appended to `gc.callbacks`.",
    "- Instruction counts: see the callgrind section.",
    "",
]

RERUNNING = [
    "## Rerunning", "",
    "```",
    "python benches/report.py --python .venv-3.12/bin/python --python .venv-3.13/bin/python",
    "python benches/report.py --section --python .venv-3.14/bin/python --python .venv-3.15/bin/python"
    "   # the section of interpreters built --with-dtrace",
    "python benches/report.py --quick          # fewer, shorter rounds",
    "pytest benches --benchmark-only          # the timings only, with a summary table at the end",
    "python benches/callgrind.py              # the instruction counts only",
    "python benches/scope.py --python .venv-3.12/bin/python --python .venv-3.13/bin/python"
    "   # the Scoped tracing section",
    "sudo .venv-3.12/bin/python benches/tool_overhead.py --per-event --markdown   # the counting tools on call-heavy code",
    "```", "",
    "Needs root and bpftrace for the attached modes (they skip otherwise), a C compiler and "
    "`sys/sdt.h` (Debian: systemtap-sdt-dev) for the floor, valgrind for the instruction counts, "
    "and `pip install pyusdt` for the comparison.", "",
]


def results_of(runs: list[Run], how_measured: list[str] = ()) -> list[str]:
    """Targets, ``how_measured``, timings, instruction counts and findings of one run, as the
    page's sections."""
    lines = targets_section(runs) + [""] + list(how_measured)
    lines += ["## Timings", ""]
    for r in runs:
        lines += workload_section(r)
    lines += callgrind_section(runs)
    lines += findings_section(runs)
    return lines


def write_report(results: Path, output: Path, section: bool = False) -> None:
    """BENCHMARKS.md from the run in ``results``, keeping the sections measured apart; or, with
    ``section``, only the section of interpreters built --with-dtrace from that run."""
    machine = json.loads((results / "machine.json").read_text())
    tags = sorted(p.stem.removeprefix("python-") for p in results.glob("python-*.json"))
    runs = [Run(results, tag) for tag in tags]
    if section:
        begin, end = sections.WITH_DTRACE
        names = " and ".join(r.tag.rsplit(".", 1)[0] for r in runs)
        lines = [begin, f"## Interpreters built --with-dtrace: Python {names}", "",
                 "Written by `python benches/report.py --section` from a run of its own (the page's other "
                 "figures come from the run above), measured the same way (see \"How it is measured\"). "
                 "These interpreters (Debian's) declare provider `python` themselves "
                 "(docs/interpreter-probes.md): 3.14 the gc, import and audit probes, 3.15 `function__entry` "
                 "and `function__return` too.", ""]
        lines += run_lines(machine, runs) + [""]
        lines += ["#" + line if line.startswith("#") else line for line in results_of(runs)]
        lines.append(end)
        sections.splice(output, sections.WITH_DTRACE, lines, before=sections.SCOPE[0])
        print(f"==> wrote its section of {output}")
        return
    lines = ["# Benchmarks", "",
             "Written by `python benches/report.py` from one run; rerun it to check these figures "
             "(see the end of this page).", ""]
    lines += run_lines(machine, runs) + [""]
    lines += results_of(runs, HOW_MEASURED)
    for markers in sections.OWNED:  # measured apart: kept as they are
        lines += sections.kept(output, markers)
    lines += RERUNNING
    output.write_text("\n".join(lines))
    print(f"==> wrote {output}")


def main() -> None:
    parser = sections.run_arguments(__doc__, "the report")
    parser.add_argument("--only-callgrind", action="store_true",
                        help="measure the instruction counts again into --results, keeping its timings")
    parser.add_argument("--section", action="store_true",
                        help="write the run as the section of interpreters built --with-dtrace (3.14, 3.15), "
                             "keeping the rest of the page")
    args = parser.parse_args()
    if args.from_dir:
        write_report(Path(args.from_dir), Path(args.output), args.section)
        return
    results = Path(args.results) if args.results else Path(tempfile.mkdtemp(prefix="pydtrace-bench-"))
    results.mkdir(parents=True, exist_ok=True)
    if args.only_callgrind:
        for python in args.python or [sys.executable]:
            measure(os.path.abspath(python), results, args.quick, True, with_timing=False)
        write_report(results, Path(args.output), args.section)
        return
    machine = machine_info()
    for python in args.python or [sys.executable]:
        python = os.path.abspath(python)  # callgrind runs it from a temporary directory
        measure(python, results, args.quick, not args.no_callgrind)
    machine["load_after"] = os.getloadavg()
    (results / "machine.json").write_text(json.dumps(machine, indent=2))
    print(f"==> raw results in {results}")
    write_report(results, Path(args.output), args.section)


if __name__ == "__main__":
    main()
