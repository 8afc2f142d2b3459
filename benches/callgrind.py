"""Deterministic figures: instruction counts from ``valgrind --tool=callgrind``.

Timings on a shared 2-core machine are noisy; instruction counts are not
(repeatable to about 0.1% here). This measures, per Python:

- ``import dtrace`` over a bare interpreter start (and, for scale, a small C
  extension of the standard library, and pyusdt);
- per workload, the instructions of one run of the workload in each mode
  (bare, idle, the no-op dispatch floor, shim), counted only inside the
  measured call: the driver warms the workload up, then runs it once through
  ctypes (``PyObject_CallObject``, called by libffi's ``ffi_call``), and
  callgrind collects only inside ``ffi_call`` (:data:`MEASURED`), in the main
  thread (``--separate-threads=yes``). ``ffi_call`` is a symbol every build
  exports (distributions strip the interpreter's static functions), and
  nothing else calls it in these processes;
- the watcher thread's instructions per poll while idle.

Run directly (``python benches/callgrind.py [--quick] [--json OUT]``) or from report.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHES))

import workloads  # noqa: E402

MODES = ("bare", "disarmed", "idle", "noop", "shim")
#: Runs of a measurement that died of SIGTRAP before it is given up (see _callgrind).
TRIES = 5
#: Callgrind's options that count the measured call of DRIVER only.
MEASURED = ["--collect-atstart=no", "--toggle-collect=ffi_call"]
#: For the object workload: the instance probes' two halves on their own, since only the
#: instance-new half has a dispatch floor (CALL, C_RETURN, C_RAISE).
SPLIT_MODES = {"shim-new": ("instance-new-start", "instance-new-done"),
               "shim-delete": ("instance-delete-start", "instance-delete-done")}

DRIVER = r"""
import os, sys
sys.path.insert(0, {benches!r})
mode, name, n = {mode!r}, {name!r}, {n!r}
import workloads
if "dtrace" in sys.modules:
    raise SystemExit("dtrace imported in a bare interpreter")
w = workloads.WORKLOADS[name]
if mode == "disarmed":
    import dtrace
    assert not dtrace._native.is_armed()
elif mode in ("idle", "shim"):
    import dtrace
    assert dtrace._native.is_armed()
    if mode == "shim":
        assert dtrace.wait_for_consumer(*w.probes, timeout=600), dtrace.enabled_probes()
elif mode in ("shim-new", "shim-delete"):
    import dtrace
    assert dtrace.wait_for_consumer(*os.environ["PYDTRACE_FORCE"].split(","), timeout=600)
elif mode == "noop":
    from dtrace import _native
    sys.path.insert(0, {benches!r})
    import child
    child.register_floor(_native._testing.noop_callback(), w.probes)
import ctypes
measured = ctypes.pythonapi.PyObject_CallObject
measured.restype = ctypes.py_object
measured.argtypes = [ctypes.py_object, ctypes.py_object]
w.function(n)  # warm-up: specialisation, the probes' name caches
measured(w.function, (n,))  # the measured run: callgrind collects inside ffi_call only
sys.stdout.flush()
os._exit(0)  # finalization is not measured (and must not be able to fail the measurement)
"""


def valgrind_available() -> str | None:
    if shutil.which("valgrind") is None:
        return "valgrind is not installed (Debian: apt-get install valgrind)"
    return None


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYDTRACE", "PYUSDT"))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: bytecode caches are used
    env["PYTHONHASHSEED"] = "0"
    env.update(extra)
    return env


def _own_instructions(path: Path) -> tuple[int, list[tuple[str, int]]]:
    """Instructions executed in pydtrace's shared object (``_native``), from a callgrind file,
    and its functions that executed the most."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", str(path)],
                         capture_output=True, text=True).stdout
    total = 0
    functions: list[tuple[str, int]] = []
    for line in out.splitlines():
        match = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)\[(.*)\]\s*$", line)
        if match and "/dtrace/_native" in match.group(3):
            count = int(match.group(1).replace(",", ""))
            total += count
            functions.append((match.group(2).strip().removeprefix("???:"), count))
    functions.sort(key=lambda f: -f[1])
    return total, functions[:4]


def _callgrind(argv: list[str], env: dict[str, str], options: list[str]) -> dict[str, int]:
    """Runs ``argv`` under callgrind; returns instructions per thread (1 = main), 'total', and
    'own_main': the main thread's instructions inside pydtrace's shared object."""
    with tempfile.TemporaryDirectory(prefix="pydtrace-cg-") as directory:
        out = Path(directory) / "cg.out"
        command = ["valgrind", "--tool=callgrind", "-q", "--separate-threads=yes",
                   f"--callgrind-out-file={out}", *options, *argv]
        for _ in range(TRIES):
            result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=directory)
            # A uprobe that another process's consumer put on the same interpreter file (system-wide,
            # by path) is an int3 in the code valgrind translates: the run dies of SIGTRAP. Again.
            if result.returncode == 0 or "SIGTRAP" not in result.stderr:
                break
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed under callgrind: {result.stderr[-2000:]}")
        counts: dict[str, int] = {}
        for path in sorted(Path(directory).glob("cg.out*")):
            match = re.search(r"-(\d+)$", path.name)
            thread = str(int(match.group(1))) if match else "1"
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("totals:") or line.startswith("summary:"):
                    counts[thread] = int(line.split()[1])
                    break
        counts["total"] = sum(v for k, v in counts.items() if k.isdigit())
        main = [p for p in Path(directory).glob("cg.out*") if p.name.endswith("-01") or p.name == "cg.out"]
        counts["own_main"], counts["own_top"] = _own_instructions(main[0]) if main else (-1, [])  # type: ignore[assignment]
        counts["stdout"] = result.stdout.strip()  # type: ignore[assignment]
        return counts


def import_costs(python: str) -> dict[str, Any]:
    """Instructions of interpreter start-ups that import something, and of a bare start-up."""
    cases = {
        "bare start (python -c pass)": ("pass", {}),
        "import dtrace (armed)": ("import dtrace", {}),
        "import dtrace with PYDTRACE=0 (not armed)": ("import dtrace", {"PYDTRACE": "0"}),
        "import _json (a small C extension of the standard library)": ("import _json", {}),
        "import pyusdt": ("import pyusdt", {}),
        # What dtrace's own import pulls in, when it does (see modules_imported_by_dtrace).
        "import __future__": ("import __future__", {}),
        "import warnings": ("import warnings", {}),
    }
    out: dict[str, Any] = {}
    for label, (code, extra) in cases.items():
        if code == "import pyusdt":
            probe = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('pyusdt') is not None)"],
                                   capture_output=True, text=True, env=_env())
            if probe.stdout.strip() != "True":
                continue
        counts = _callgrind([python, "-c", code], _env(**extra), [])
        out[label] = {"main": counts["1"], "total": counts["total"]}
    base = out["bare start (python -c pass)"]
    for label, value in out.items():
        value["over_bare_main"] = value["main"] - base["main"]
        value["over_bare_total"] = value["total"] - base["total"]
    return out


def modules_imported_by_dtrace(python: str) -> list[str]:
    """The modules that ``import dtrace`` loads beyond a bare start (dtrace's own excluded)."""
    code = ("import sys; before = set(sys.modules); import dtrace; "
            "print(' '.join(sorted(m for m in set(sys.modules) - before if not m.startswith('dtrace'))))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True, env=_env()).stdout.split()


def watcher_cost(python: str) -> dict[str, Any]:
    """The idle watcher thread's instructions per poll (semaphore read and condvar wait)."""
    code = ("import dtrace, time; time.sleep(0.5); "
            "print(*dtrace._native._testing.watcher_stats())")
    counts = _callgrind([python, "-c", code], _env(), [])
    # watcher_stats(): (polls, times the watcher took the GIL, changes handed off to the main thread)
    polls, gil, handed_off = (int(x) for x in str(counts["stdout"]).split()[-3:])
    threads = {k: v for k, v in counts.items() if k.isdigit() and k != "1"}
    watcher = max(threads.values()) if threads else 0
    return {"polls": polls, "gil_acquisitions": gil, "handed_off": handed_off, "instructions": watcher,
            "per_poll": watcher / polls if polls else None}


def workload_run(python: str, name: str, mode: str, n: int) -> tuple[int, int, list]:
    """Main-thread instructions of one run of workload ``name`` in ``mode``, and how many of
    them were in pydtrace's shared object (and its top functions)."""
    workload = workloads.WORKLOADS[name]
    extra: dict[str, str] = {}
    if mode == "shim":
        extra["PYDTRACE_FORCE"] = ",".join(workload.probes)
    elif mode in SPLIT_MODES:
        extra["PYDTRACE_FORCE"] = ",".join(SPLIT_MODES[mode])
    if mode in ("noop", "disarmed"):
        extra["PYDTRACE"] = "0"
    code = DRIVER.format(benches=str(BENCHES), mode=mode, name=name, n=n)
    counts = _callgrind([python, "-c", code], _env(**extra),
                        MEASURED)
    return counts["1"], counts["own_main"], counts["own_top"]


def event_counts(python: str, name: str, n: int) -> dict[str, int]:
    proc = subprocess.run([python, str(BENCHES / "child.py"), name, "count", ""], input=f"count {n}\n",
                          capture_output=True, text=True, env=_env())
    for line in proc.stdout.splitlines():
        if line.startswith("COUNT "):
            return json.loads(line[6:])
    raise RuntimeError(f"counting {name} failed: {proc.stderr}")


def unsupported_probes(python: str) -> dict[str, str]:
    """The probes pydtrace never arms on ``python``, each with the reason."""
    code = "import json, dtrace; print(json.dumps(dict(dtrace._native.UNSUPPORTED_PROBES)))"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, env=_env(PYDTRACE="0"))
    if done.returncode != 0:
        raise RuntimeError(f"{python}: {done.stderr}")
    return json.loads(done.stdout)


def measure(python: str, quick: bool = False, jobs: int = 2) -> dict[str, Any]:
    """Every deterministic figure for ``python``. A mode that forces a probe this interpreter's
    build never arms (``UNSUPPORTED_PROBES``) is left out, with the reason in ``unsupported``."""
    result: dict[str, Any] = {"python": subprocess.run(
        [python, "-c", "import sys; print('.'.join(map(str, sys.version_info[:3])))"],
        capture_output=True, text=True).stdout.strip()}
    unsupported = unsupported_probes(python)
    if unsupported:
        result["unsupported"] = unsupported
    result["import"] = import_costs(python)
    result["imported_by_dtrace"] = modules_imported_by_dtrace(python)
    result["watcher"] = watcher_cost(python)
    runs: dict[str, dict[str, Any]] = {}
    tasks = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for name, workload in workloads.WORKLOADS.items():
            n = max(1, workload.n_callgrind // (4 if quick else 1))
            runs[name] = {"n": n, "probes": list(workload.probes)}
            modes = MODES + (tuple(SPLIT_MODES) if workload.probes == workloads.INSTANCE_PROBES else ())
            forced = {"shim": workload.probes, **SPLIT_MODES}
            modes = tuple(m for m in modes if not set(forced.get(m, ())) & set(unsupported))
            for mode in modes:
                tasks[(name, mode)] = pool.submit(workload_run, python, name, mode, n)
            tasks[(name, "count")] = pool.submit(event_counts, python, name, n)
        for (name, mode), future in tasks.items():
            if mode == "count":
                runs[name]["counts"] = future.result()
            else:
                runs[name][mode], runs[name][mode + "_own"], top = future.result()
                if top:
                    runs[name][mode + "_top"] = top
    for name, run in runs.items():
        workload = workloads.WORKLOADS[name]
        counts = run["counts"]
        if workload.events_per_n is not None:
            events = round(workload.events_per_n * run["n"])
        else:  # a collection fires gc-start and gc-done once each
            events = sum(counts["gc"] if p in workloads.GC_PROBES else counts[p] for p in workload.probes)
        run["events"] = events
        bare = run["bare"]
        run["idle_ratio"] = run["idle"] / bare
        run["idle_to_disarmed"] = run["idle"] / run["disarmed"]
        if events:
            run["idle_per_event"] = (run["idle"] - bare) / events
            run["noop_per_event"] = (run["noop"] - bare) / events
        if events and "shim" in run:
            run["shim_per_event"] = (run["shim"] - bare) / events
            run["shim_to_noop"] = (run["shim"] - bare) / (run["noop"] - bare) if run["noop"] != bare else None
            run["shim_own_per_event"] = run["shim_own"] / events
        if "shim-new" in run:
            # Each half fires half of the workload's instance events.
            half = events / 2
            run["new_noop_per_event"] = (run["noop"] - bare) / half
            run["new_shim_per_event"] = (run["shim-new"] - bare) / half
            run["new_shim_to_noop"] = (run["shim-new"] - bare) / (run["noop"] - bare)
        if "shim-delete" in run:
            run["delete_shim_per_event"] = (run["shim-delete"] - bare) / (events / 2)
    result["workloads"] = runs
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    reason = valgrind_available()
    if reason:
        raise SystemExit(reason)
    figures = measure(args.python, args.quick, args.jobs)
    text = json.dumps(figures, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
