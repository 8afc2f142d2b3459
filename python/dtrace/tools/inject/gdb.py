"""The gdb way in (CPython 3.12 and 3.13): gdb in batch mode runs ``gdb_inject.py`` (the gdb side,
run inside gdb with gdb's own Python); the addresses of the functions it calls are read here from
the ELF symbols and the process's maps, and its ``PYDTRACE-INJECT`` lines read back as the outcome.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

from dtrace.tools.errors import ToolError
from dtrace.tools.inject.payload import SAFE_POINT_TIMEOUT, code, outcome, parse_report
from dtrace.tools.inject.ptrace import ptrace_explanation
from dtrace.tools.proc import procfs, pyprocess
from dtrace.tools.proc.elf import ElfFile, load_bias

#: Seconds gdb may take beyond that (start, attach, the import itself) before the tool says so.
GDB_MARGIN = 60.0


GDB_SCRIPT = Path(__file__).resolve().parent / "gdb_inject.py"


#: The interpreter's functions the gdb script calls (or stops at), and libc's.
PYTHON_FUNCTIONS = (
    "Py_IsInitialized", "Py_AddPendingCall", "PyErr_CheckSignals", "PyGILState_Ensure",
    "PyGILState_Release", "PyErr_GetRaisedException", "PyErr_SetRaisedException", "PyErr_Clear", "PyDict_New",
    "PyRun_String", "PyDict_GetItemString", "PyBytes_AsString", "PyBytes_Size", "Py_DecRef",
    "PyInterpreterState_Get", "PyInterpreterState_Main", "PyThreadState_GetInterpreter",
)


#: The interpreter's functions that are public from 3.13, underscored in 3.12: each name's 3.12 one.
RENAMED_IN_3_13 = {"Py_IsFinalizing": "_Py_IsFinalizing", "PyThreadState_GetUnchecked": "_PyThreadState_UncheckedGet"}


LIBC_FUNCTIONS = ("mmap", "munmap")


def functions(process: pyprocess.PythonProcess) -> dict[str, int]:
    """Each function's address in the process; ToolError naming any that cannot be found."""
    found = {}
    missing = []
    for name in PYTHON_FUNCTIONS:
        address = process.address(name)
        if address is None:
            missing.append(name)
        else:
            found[name] = address
    for name, older in RENAMED_IN_3_13.items():
        address = process.address(name) or process.address(older)
        if address is None:
            missing.append(name)
        else:
            found[name] = address
    libc = None
    if process.libc is not None:
        try:
            libc = ElfFile(process.libc.readable_path(process.pid))
        except (OSError, ValueError, IndexError, struct.error):  # unreadable, or cut short
            libc = None
    bias = load_bias(procfs.mappings(process.pid), process.libc.path, libc) if libc else None
    for name in LIBC_FUNCTIONS:
        if libc is None or bias is None or name not in libc.symbols:
            missing.append(name)
        else:
            found[name] = bias + libc.symbols[name][0]
    if missing:
        raise ToolError(f"cannot inject into process {process.pid}: {', '.join(missing)} not found in "
                        f"{process.python_object} or its C library")
    return found


#: The environment variable that names the gdb to use (``--gdb PATH`` wins over it).
GDB_VARIABLE = "PYDTRACE_GDB"


#: What to do when the gdb cannot do it: the remedies, for the messages.
GDB_REMEDY = (f"use a gdb that can (a newer one) with --gdb PATH or {GDB_VARIABLE}=PATH, or run the program on "
              "Python 3.14 or later, where --inject uses the interpreter's own sys.remote_exec and needs no gdb")


def gdb_path(chosen: str | None = None) -> str:
    """The gdb to run: ``chosen`` (--gdb), else $PYDTRACE_GDB, else ``gdb`` on PATH; ToolError when
    it is not there."""
    given = chosen or os.environ.get(GDB_VARIABLE) or None
    source = "--gdb" if chosen else GDB_VARIABLE
    if given is not None:
        found = shutil.which(given)
        if found is None:
            raise ToolError(f"{source} names {given}, which is not an executable gdb")
        return found
    found = shutil.which("gdb")
    if found is None:
        raise ToolError("--inject needs gdb for Python 3.12 and 3.13: sudo apt-get install gdb (Debian, Ubuntu), "
                        f"sudo dnf install gdb (Fedora), or name one with --gdb PATH or {GDB_VARIABLE}=PATH")
    return found


def gdb_version(gdb: str) -> str:
    """gdb's version line (``GNU gdb (Debian 13.1-3) 13.1``), for the messages."""
    try:
        done = subprocess.run([gdb, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "version unknown"
    return (done.stdout.splitlines() or ["version unknown"])[0].strip()


def gdb_command(gdb: str) -> list[str]:
    return [
        gdb, "-batch", "-nx", "-q",
        # No symbol files beyond the minimum: the script calls functions by address.
        "-iex", "set auto-load off",
        "-iex", "set debuginfod enabled off",
        "-iex", "set auto-solib-add off",
    ]


def with_gdb(process: pyprocess.PythonProcess, offered: str | None, gdb: str | None = None) -> dict:
    """Run the code in the target through ``gdb`` (:func:`gdb_path`); the code's report, or ToolError.
    Every message says what was done to the process, as far as the tool knows it."""
    pid = process.pid
    gdb = gdb or gdb_path()
    argv = gdb_command(gdb)
    argv += ["-ex", f"symbol-file -readnever /proc/{pid}/exe", "-x", str(GDB_SCRIPT)]
    before = procfs.state(pid)
    abort_read, abort_write = os.pipe()
    parameters = {
        "pid": pid,
        "code": code("gdb", offered),
        "timeout": SAFE_POINT_TIMEOUT,
        "abort_fd": abort_read,
        "functions": functions(process),
        "python_object": process.python_object,
    }
    env = {**os.environ, "PYDTRACE_INJECT": json.dumps(parameters)}
    debug = bool(os.environ.get("PYDTRACE_INJECT_DEBUG"))
    if debug:
        print(f"pydtrace: running {' '.join(argv)}", file=sys.stderr, flush=True)
    try:
        returncode, lines, aborted = _run_gdb(argv, env, abort_read, abort_write, debug)
    finally:
        os.close(abort_write)
    records = []
    for line in lines:
        if line.startswith("PYDTRACE-INJECT "):
            try:
                records.append(json.loads(line[len("PYDTRACE-INJECT "):]))
            except json.JSONDecodeError:
                pass
    steps = [record.get("step") for record in records if record.get("kind") == "step"]
    left = next((record for record in reversed(records) if record.get("kind") == "left"), {})
    stopped_by = left.get("stopped_by")
    _check_not_left_stopped(pid, before, stopped_by)
    if stopped_by:
        print(f"pydtrace: process {pid} was stopped by process {stopped_by} ({procfs.command_name(stopped_by)}, "
              "SIGSTOP) during the injection: it is left stopped, as it would have been without the tool",
              file=sys.stderr, flush=True)
    stays = "; ".join(left.get("left") or [])
    stays = f"; what stays in it: {stays}" if stays else ""
    errors = "\n".join(line for line in lines if not line.startswith("PYDTRACE-INJECT ")).strip()
    crash = ""
    if returncode < 0:  # gdb itself died (an internal error aborts it, or someone killed it)
        crash = f"gdb died of {signal.Signals(-returncode).name}"
        detail = next((line for line in errors.splitlines() if "internal-error" in line), "")
        print(f"pydtrace: {crash} while attached to process {pid} {detail}".rstrip(), file=sys.stderr, flush=True)
    outcomes = [record for record in records if record.get("kind") not in ("step", "left", "waiting", "detach_failed")]
    if not outcomes:
        if "Python scripting is not supported" in errors:
            raise ToolError(f"this gdb ({gdb}) has no Python support, which --inject needs (Debian's gdb has it)")
        ended = crash or f"gdb failed (exit status {returncode})"
        if not steps:
            raise ToolError(f"{ended} before it attached to process {pid}: nothing was done to it:\n"
                            f"{errors or '(no message)'}")
        check = (f"check that it runs as it should (its output, its logs; `python -m dtrace list -p {pid}` shows "
                 "whether the probes got in)")
        if "proven" not in steps:
            raise ToolError(f"{ended} while it checked, in process {pid}, that it can write back its registers: a "
                            "register of its main thread may hold another value than before; " + check)
        if "running" not in steps:
            raise ToolError(f"{ended} while attached to process {pid}, before its code ran: the process may have "
                            "been left in the middle of a call gdb made, or with a breakpoint that stops it with "
                            "SIGTRAP; " + check)
        raise ToolError(f"{ended} while the code ran in process {pid}: it may be left in the middle of it; " + check)
    last = outcomes[-1]
    kind = last.get("kind")
    if kind == "attach_failed":
        message = last.get("message", "")
        if "not permitted" in message or "denied" in message.lower():
            raise ToolError(f"cannot attach gdb to process {pid}: {message}\n{ptrace_explanation(pid)}")
        if not procfs.alive(pid):
            raise ToolError(f"process {pid} exited before gdb could attach")
        raise ToolError(f"cannot attach gdb to process {pid}: {message}")
    if kind == "unprovable":
        raise ToolError(
            f"cannot inject into process {pid}: {gdb} ({gdb_version(gdb)}) cannot write back the registers that "
            f"calling a function in the process changes ({last.get('message')}), and would leave the process "
            "with them; nothing was changed in it. (Debian 12's gdb 13.1 fails so on CPUs with AMX, Intel's "
            f"servers since Sapphire Rapids.) Remedy: {GDB_REMEDY}")
    if kind == "damaged":
        raise ToolError(
            f"injecting into process {pid} through {gdb} ({gdb_version(gdb)}) went wrong before anything else was "
            f"done: {last.get('message')}. The process may misbehave from now on: check its output and logs, and "
            f"restart it if it does. Remedy: {GDB_REMEDY}")
    if kind == "exited":
        status = f" ({last['status']})" if last.get("status") else ""
        when = "while the injected code ran" if last.get("started") else "before the injected code ran"
        raise ToolError(f"process {pid} exited during the injection{status}, {when}")
    if kind == "failed":
        if last.get("started"):
            raise ToolError(f"loading the probes into process {pid} failed while its code ran: {last.get('message')}"
                            f"; `python -m dtrace list -p {pid}` shows whether the probes got in")
        raise ToolError(f"cannot load the probes into process {pid}: {last.get('message')}; nothing was run in it"
                        f"{stays}")
    if kind == "no_safe_point":
        if last.get("reason") == "aborted":
            print(f"pydtrace: nothing was run in process {pid}{stays}", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        if last.get("subinterpreter"):
            raise ToolError(
                f"process {pid}'s main thread runs a sub-interpreter's code, where pydtrace-rs cannot load (PyO3 "
                f"refuses sub-interpreters), and did not come back to the main interpreter within "
                f"{SAFE_POINT_TIMEOUT:g} s: nothing was run in it{stays}")
        raise ToolError(
            f"process {pid}'s main thread did not reach a point where it can run Python code within "
            f"{SAFE_POINT_TIMEOUT:g} s (it is in {last.get('where')}): nothing was run in it{stays}. It must be "
            "running Python code, or waiting in a call CPython can interrupt (sleep, select, a lock); try again "
            "later, or wait longer with PYDTRACE_INJECT_TIMEOUT=SECONDS")
    if kind != "ran":
        raise ToolError(f"gdb stopped unexpectedly ({kind}) while injecting into process {pid}:\n{errors}")
    if last.get("report") is None:
        raise ToolError(f"the code run in process {pid} left no report: it was interrupted"
                        + (" (an exception went on to the program)" if last.get("handed") else "")
                        + f"; `python -m dtrace list -p {pid}` shows whether the probes got in")
    report = parse_report(pid, last["report"])
    report["note"] = (f"the process was stopped {last.get('stopped_ms')} ms, the code ran "
                      f"{last.get('code_ms')} ms")
    if aborted:  # Ctrl-C came too late to keep the code from running: say what is there now
        outcome(process, report, offered, "gdb")
        raise KeyboardInterrupt
    return report


def _run_gdb(argv: list[str], env: dict[str, str], abort_read: int, abort_write: int,
             debug: bool) -> tuple[int, list[str], bool]:
    """Run gdb to its end: (its exit status, its output lines (stdout and stderr), whether the user
    pressed Ctrl-C). Ctrl-C asks gdb to give up the wait for a safe point (it then cleans up and
    detaches); gdb is never killed, which could leave the target in the middle of a call."""
    try:
        gdb = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=env, pass_fds=(abort_read,), start_new_session=True)
    finally:
        os.close(abort_read)
    lines: list[str] = []
    pending = b""
    aborted = warned = False
    deadline = time.monotonic() + SAFE_POINT_TIMEOUT + GDB_MARGIN
    output = gdb.stdout.fileno()
    while True:
        try:
            ready, _, _ = select.select([output], [], [], 0.5)
            if ready:
                chunk = os.read(output, 1 << 16)
                if not chunk:
                    break
                *complete, pending = (pending + chunk).split(b"\n")
                for raw in complete:
                    lines.append(raw.decode(errors="replace"))
                    if debug:
                        print(f"pydtrace: gdb: {lines[-1]}", file=sys.stderr, flush=True)
            elif not warned and time.monotonic() > deadline:
                warned = True
                print(f"pydtrace: gdb (PID {gdb.pid}) is still attached after {SAFE_POINT_TIMEOUT + GDB_MARGIN:g} s;"
                      " waiting for it (killing it could leave the process in the middle of a call)",
                      file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            if not aborted:
                aborted = True
                os.write(abort_write, b"x")
                print("pydtrace: giving up the injection; waiting for gdb to detach", file=sys.stderr, flush=True)
    if pending:
        lines.append(pending.decode(errors="replace"))
    while True:
        try:
            gdb.wait()
            break
        except KeyboardInterrupt:
            continue
    gdb.stdout.close()
    return gdb.returncode, lines, aborted


def _check_not_left_stopped(pid: int, before: str | None, stopped_by: int | None = None) -> None:
    """A safety net: a process that was not stopped before must not stay stopped (unless someone
    else stopped it meanwhile: ``stopped_by``)."""
    after = procfs.state(pid)
    if after == "T" and before != "T" and not stopped_by:
        os.kill(pid, signal.SIGCONT)
        print(f"pydtrace: process {pid} was left stopped by gdb; it was continued (SIGCONT)", file=sys.stderr)
