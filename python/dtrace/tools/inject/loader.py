"""``-p PID`` on a Python process that has not loaded the probes: load them (``--inject``).

The tools trace the probes of pydtrace-rs's shared object, so the process must have imported
``dtrace``. When it has not, the tool asks (on a terminal) or, with ``--inject``, goes ahead and
runs ``import dtrace`` in it, under the GIL, at a point where the interpreter runs code of its
own accord (where it runs signal handlers and pending calls):

- CPython 3.14 and later: ``sys.remote_exec(pid, script)`` (PEP 768), the interpreter's own way.
- CPython 3.12 and 3.13: gdb (batch mode), with the script ``gdb_inject.py`` beside this file,
  which says what it does step by step.

The code that runs in the target is :data:`CODE` (see :func:`code`), the same for both ways: it
imports the target's own pydtrace-rs, or else this tool's copy when the tool's interpreter has
the same version and ABI (checked here, and again in the target against the extension suffixes
its import system accepts), without adding anything to ``sys.path``. It reports back what it did.
docs/injection.md has the details, and why each step is safe.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dtrace.tools.errors import ToolError
from dtrace.tools.proc import procfs, pyprocess
from dtrace.tools.proc.elf import ElfFile, load_bias

#: Seconds to wait for the main thread of the target to reach a point where it runs code.
SAFE_POINT_TIMEOUT = float(os.environ.get("PYDTRACE_INJECT_TIMEOUT", "10"))
#: Seconds gdb may take beyond that (start, attach, the import itself) before the tool says so.
GDB_MARGIN = 60.0
GDB_SCRIPT = Path(__file__).resolve().parent / "gdb_inject.py"

#: The code run in the target. ``ORIGIN``, ``OFFERED`` and ``REPORT_PATH`` (the lines that set
#: them to None) are filled in by :func:`code` with Python literals. It runs once, in a namespace
#: of its own (nothing is added to the program's), and leaves its report (bytes) in
#: ``__pydtrace_report__``.
CODE = '''\
# pydtrace-rs (python -m dtrace --inject) loads its probes into this process: once, in a
# namespace of its own, with the GIL, where the interpreter runs signal handlers and pending
# calls. See docs/injection.md of pydtrace-rs.


def load(sys, offered):
    """Import the program's own pydtrace-rs, or else the tool's copy at ``offered``."""
    import os
    import _imp

    suffixes = _imp.extension_suffixes()

    def native(directory):
        for suffix in suffixes:
            if os.path.isfile(os.path.join(directory, "_native" + suffix)):
                return os.path.join(directory, "_native" + suffix)
        return None

    def ours(directory):
        return os.path.isfile(os.path.join(directory, "__init__.py")) and any(
            name.startswith("_native") for name in os.listdir(directory))

    module = sys.modules.get("dtrace")
    if module is not None:
        if getattr(module, "library_path", None) is None:
            return dict(status="conflict", error=f"another module named dtrace is loaded: {module!r}")
        source = "already"
    else:
        spec = None
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is not None:
                spec = find_spec("dtrace", None)
                if spec is not None:
                    break
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if spec is not None and not any(ours(directory) for directory in locations):
            return dict(status="conflict", error=f"another module named dtrace is importable: {spec.origin}")
        if any(native(directory) for directory in locations):
            source = "program"
            module = __import__("dtrace")
        elif offered is not None and native(offered) is not None:
            import importlib.util

            source = "tool"
            spec = importlib.util.spec_from_file_location(
                "dtrace", os.path.join(offered, "__init__.py"), submodule_search_locations=[offered])
            module = importlib.util.module_from_spec(spec)
            sys.modules["dtrace"] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                if sys.modules.get("dtrace") is module:
                    del sys.modules["dtrace"]
                raise
        else:
            return dict(status="missing", found=spec.origin if spec is not None else None,
                        offered=offered, suffixes=suffixes, executable=sys.executable)
    native_module = getattr(module, "_native", None)
    armed = bool(native_module is not None and native_module.is_armed())
    if source != "already" and armed and hasattr(native_module, "set_origin"):
        native_module.set_origin(ORIGIN)
    return dict(status="loaded", source=source, library=module.library_path(),
                version=getattr(module, "__version__", None), available=module.available,
                reason=module.unavailable_reason, armed=armed)


def remove_script(os):
    """sys.remote_exec: the interpreter has read the script; remove it (and keep the tool's
    report file: written below if the tool still waits for it). The tool names them NAME.py and
    NAME.report."""
    try:
        os.unlink(REPORT_PATH[: -len(".report")] + ".py")
    except OSError:
        pass


def write_report(os, text):
    """The report, into the file the tool made, if the tool still waits (it removes the file when
    it gives up): never a new file."""
    try:
        fd = os.open(REPORT_PATH, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return
    try:
        os.write(fd, text + b"\\n")
    finally:
        os.close(fd)


def hand_on(sys, error, script):
    """sys.remote_exec reports an exception that ends its script as unraisable: the program would
    never see it. A thread waits until the main thread has left this script (code object
    ``script``), then raises the same exception there, asynchronously: at the main thread's next
    instruction, where the program's own signal handler would have raised it."""
    import _thread

    main = _thread.get_ident()  # the script runs on the main thread
    error = error.with_traceback(None)

    class Handed(BaseException):
        def __new__(cls, *args):
            return error  # what CPython instantiates for an asynchronous exception: this one

    def inside():
        frame = sys._current_frames().get(main)
        while frame is not None:
            if frame.f_code is script:
                return True
            frame = frame.f_back
        return False

    def later():
        pause = _thread.allocate_lock()
        pause.acquire()
        while inside():
            pause.acquire(timeout=0.001)
        try:
            import ctypes
        except ImportError:
            if isinstance(error, KeyboardInterrupt):
                _thread.interrupt_main()
            return
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(main), ctypes.py_object(Handed))

    _thread.start_new_thread(later, ())


def run():
    import os
    import sys

    report = dict(origin=ORIGIN)
    handed = None
    if ORIGIN == "remote_exec":
        remove_script(os)
    try:
        try:
            report.update(load(sys, OFFERED))
        except Exception as error:
            report.update(status="error", error=f"{type(error).__name__}: {error}")
    except BaseException as error:
        # Raised by a signal handler of the program that ran meanwhile (KeyboardInterrupt,
        # SystemExit): it goes on to the program.
        report.update(status="interrupted", error=type(error).__name__)
        handed = error
    text = repr(report).encode("ascii", "backslashreplace")
    if REPORT_PATH is not None:
        write_report(os, text)
    if handed is not None and ORIGIN == "remote_exec":
        hand_on(sys, handed, sys._getframe(1).f_code)
        handed = None
    return text, handed


ORIGIN = None
OFFERED = None
REPORT_PATH = None
__pydtrace_report__, handed = run()
if handed is not None:
    raise handed
'''


def code(origin: str, offered: str | None, report_path: str | None = None) -> str:
    """The exact source run in the target."""
    text = CODE
    for name, literal in (("ORIGIN", origin), ("OFFERED", offered), ("REPORT_PATH", report_path)):
        line = f"\n{name} = None\n"
        assert text.count(line) == 1
        text = text.replace(line, f"\n{name} = {literal!r}\n")
    return text


def _parse_report(pid: int, text: str) -> dict:
    """The report the code left in process ``pid`` (the repr of a dict), or ToolError."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ToolError(f"unreadable report from process {pid}: {text!r}") from None


def offered_package(process: pyprocess.PythonProcess) -> str | None:
    """This tool's own dtrace package, if the target's interpreter can load it: same version
    (major.minor) and neither free-threaded. The target checks the ABI again (its extension
    suffixes) before it loads anything from there."""
    import dtrace

    if dtrace.library_path() is None:  # also on a free-threaded build: dtrace does not load _native there
        return None
    if process.minor != sys.version_info[:2] or process.free_threaded:
        return None
    return str(Path(dtrace.__file__).resolve().parent)


# --- Privileges ------------------------------------------------------------------------------

YAMA = "/proc/sys/kernel/yama/ptrace_scope"
YAMA_SCOPES = {
    0: "0 (classic): a process of the same user, or any process with CAP_SYS_PTRACE (root)",
    1: "1 (restricted): only a descendant of the debugger (or a process that allowed it with "
       "prctl(PR_SET_PTRACER)), or any process with CAP_SYS_PTRACE (root)",
    2: "2 (admin-only): only with CAP_SYS_PTRACE (root)",
    3: "3 (no attach): no process may be attached at all, not even by root, until the next boot",
}


def yama_scope() -> int | None:
    try:
        with open(YAMA) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def ptrace_explanation(pid: int) -> str:
    """Why attaching to ``pid`` may be refused, and what each Yama setting allows."""
    scope = yama_scope()
    lines = ["Injecting needs the rights to attach a debugger (ptrace) to the process, on top of "
             "tracing's: root (CAP_SYS_PTRACE), or its owner where Yama allows it."]
    if scope is None:
        lines.append(f"This kernel has no Yama ({YAMA} is missing): the classic rule holds, same user or root.")
    else:
        lines.append(f"Here Yama's {YAMA} is {YAMA_SCOPES.get(scope, str(scope))}.")
    lines.append("Yama's ptrace_scope values: " + "; ".join(YAMA_SCOPES.values()) + ".")
    lines.append("In a container, root also needs CAP_SYS_PTRACE (docker run --cap-add SYS_PTRACE) "
                 "and a seccomp profile that allows ptrace.")
    return "\n".join(lines)


def check_privileges(process: pyprocess.PythonProcess) -> None:
    """Refuse early where ptrace cannot work; gdb's own refusal is explained the same way."""
    scope = yama_scope()
    if scope == 3:
        raise ToolError(f"cannot inject into process {process.pid}: ptrace is disabled.\n{ptrace_explanation(process.pid)}")
    if os.geteuid() != 0 and not _has_ptrace_capability():
        try:
            owner = os.stat(f"/proc/{process.pid}").st_uid
        except OSError:
            owner = None
        if owner != os.geteuid() or scope in (1, 2):
            raise ToolError(f"cannot inject into process {process.pid}: Permission denied.\n"
                            f"{ptrace_explanation(process.pid)}")


def _has_ptrace_capability() -> bool:
    return procfs.has_capabilities(19)  # CAP_SYS_PTRACE


# --- Consent ---------------------------------------------------------------------------------


def ask(process: pyprocess.PythonProcess, how: str, describe: str) -> bool:
    """On a terminal: ask the user whether to load the probes into the process."""
    prompt = (f"pydtrace: {describe} runs {process.describe()} and has not loaded the probes.\n"
              f"Load them now? This runs `import dtrace` in it, through {how} (see docs/injection.md). [y/N] ")
    try:
        sys.stderr.write(prompt)
        sys.stderr.flush()
        answer = sys.stdin.readline()
    except (OSError, KeyboardInterrupt):
        return False
    return answer.strip().lower() in ("y", "yes")


#: How the code gets in (:func:`method`), as the messages name it.
THROUGH = {"gdb": "gdb", "remote_exec": "sys.remote_exec"}


def method(process: pyprocess.PythonProcess) -> str:
    """``remote_exec`` (CPython 3.14+: the interpreter's own way) or ``gdb`` (3.12, 3.13)."""
    return "remote_exec" if process.version >= (3, 14) else "gdb"


def load_probes(pid: int, inject: bool, describe: str, not_loaded: str, gdb: str | None = None) -> None:
    """Load pydtrace-rs into process ``pid``: asked on a terminal, at once with ``inject``.
    ``not_loaded`` is the message for a process whose owner must arm it (no terminal, no
    --inject); ``gdb`` the debugger chosen with --gdb (:func:`gdb_path`). Raises ToolError, with
    the reason, when the probes cannot or may not be loaded."""
    process = pyprocess.identify(pid)
    pyprocess.check_supported(process)
    how = method(process)
    debugger = gdb_path(gdb) if how == "gdb" else None  # before anything: a missing gdb is said first
    if not inject:
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise ToolError(not_loaded)
        if not ask(process, THROUGH[how], describe):
            raise ToolError(f"not loading the probes into process {pid}; {not_loaded.split(': ', 1)[-1]}")
    check_privileges(process)
    tracer = tracer_pid(pid)
    if tracer:
        raise ToolError(f"process {pid} is already traced by process {tracer} ({procfs.command_name(tracer)}): "
                        "a process can have only one ptrace tracer (a debugger, strace); detach it first")
    current = state(pid)
    if current in ("T", "t"):
        # gdb would let it run on: a process stopped by job control (or held by a debugger) stays as it is.
        raise ToolError(f"process {pid} is stopped (Ctrl-Z, SIGSTOP, or a debugger holds it): continue it first")
    if current in (None, "Z", "X"):
        raise procfs.gone(pid)
    offered = offered_package(process)
    report = with_remote_exec(process, offered) if how == "remote_exec" else with_gdb(process, offered, debugger)
    outcome(process, report, offered, how)


def outcome(process: pyprocess.PythonProcess, report: dict, offered: str | None, how: str) -> None:
    """Say what the code did in the target; ToolError unless the probes are there now."""
    pid = process.pid
    status = report.get("status")
    if status == "loaded":
        if not report.get("available"):
            raise ToolError(f"pydtrace-rs was loaded into process {pid} but cannot work there: {report.get('reason')}")
        where = {"program": "the program's own", "tool": "this tool's", "already": "the already loaded"}.get(
            report.get("source"), "")
        note = f" ({report['note']})" if report.get("note") else ""
        print(f"pydtrace: loaded {where} pydtrace-rs {report.get('version')} into process {pid} through "
              f"{THROUGH[how]}: {report.get('library')}{note}", file=sys.stderr, flush=True)
        return
    if status == "missing":
        ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
        python = report.get("executable") or process.executable
        install = f"install pydtrace-rs where the process's Python finds it ({python} -m pip install pydtrace-rs)"
        if report.get("offered") is None and offered is None:
            raise ToolError(
                f"process {pid} runs {process.describe()}, which cannot import pydtrace-rs, and this tool's copy "
                f"is for Python {ours} ({sys.executable}): {install}, or run the tool with a Python "
                f"{pyprocess.version_text(process.minor)} that has it")
        raise ToolError(
            f"process {pid} runs {process.describe()}, which cannot import pydtrace-rs, and this tool's copy "
            f"({offered}) does not fit it (it loads extension modules ending in "
            f"{', '.join(report.get('suffixes') or [])}): {install}")
    if status == "conflict":
        raise ToolError(f"cannot load pydtrace-rs into process {pid}: {report.get('error')}")
    if status == "interrupted":
        raise ToolError(f"loading the probes into process {pid} was interrupted: a signal handler of the program "
                        f"raised {report.get('error')} meanwhile (passed on to the program); try again")
    raise ToolError(f"loading pydtrace-rs into process {pid} failed in the process: {report.get('error')}")


# --- 3.12 and 3.13: gdb ----------------------------------------------------------------------

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
        except (OSError, ValueError):
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
    before = state(pid)
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
        import signal

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
        if not _running(pid):
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
    report = _parse_report(pid, last["report"])
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


def state(pid: int) -> str | None:
    """The process's state letter (R, S, T...), None when it is gone."""
    fields = procfs.status(pid)
    if fields is None or "State" not in fields:
        return None
    return fields["State"].split()[0]


def tracer_pid(pid: int) -> int:
    """The process that ptrace-traces ``pid`` (a debugger), 0 for none."""
    fields = procfs.status(pid)
    if fields is None or "TracerPid" not in fields:
        return 0
    try:
        return int(fields["TracerPid"].split()[0])
    except ValueError:
        return 0


def _running(pid: int) -> bool:
    return state(pid) not in (None, "Z", "X")


def _check_not_left_stopped(pid: int, before: str | None, stopped_by: int | None = None) -> None:
    """A safety net: a process that was not stopped before must not stay stopped (unless someone
    else stopped it meanwhile: ``stopped_by``)."""
    after = state(pid)
    if after == "T" and before != "T" and not stopped_by:
        import signal

        os.kill(pid, signal.SIGCONT)
        print(f"pydtrace: process {pid} was left stopped by gdb; it was continued (SIGCONT)", file=sys.stderr)


# --- 3.14 and later: sys.remote_exec (PEP 768) ------------------------------------------------


def with_remote_exec(process: pyprocess.PythonProcess, offered: str | None) -> dict:
    """Run the code in the target with ``sys.remote_exec``; the code's report, or ToolError.

    The script and its report live in the target's /tmp (reached through /proc/PID/root, so that
    a process in another mount namespace sees them; held open as a directory, so that they can be
    removed after the process is gone), created by the tool, owned by the target's user, readable
    by no one else. The target runs the script when its main thread next runs Python code, which
    may be long after the tool stopped waiting: so the script stays until the target has run it
    (the code removes it first thing), and the tool, when it stops waiting, removes only the report
    file, which tells the code that no one reads its report any more.
    """
    import secrets

    pid = process.pid
    uid, gid = _owner(pid)
    name = f"pydtrace-inject-{pid}-{secrets.token_hex(4)}"  # the target's PID: whose script it is
    inside = f"/tmp/{name}"
    script, report = name + ".py", name + ".report"
    try:
        tmp = os.open(f"/proc/{pid}/root/tmp", os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        if not _running(pid):
            raise procfs.gone(pid) from None
        raise ToolError(f"cannot reach the /tmp of process {pid}: {error}") from None
    sent = False
    try:
        for file, text in ((script, code("remote_exec", offered, inside + ".report")), (report, "")):
            try:
                fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=tmp)
            except OSError as error:
                raise ToolError(f"cannot write the script for process {pid} into its /tmp: {error}") from None
            try:
                os.write(fd, text.encode())
                os.fchown(fd, uid, gid)
            finally:
                os.close(fd)
        _remote_exec(process, inside + ".py")
        sent = True
        deadline = time.monotonic() + SAFE_POINT_TIMEOUT
        try:
            while time.monotonic() < deadline:
                text = _read_report(report, tmp)
                if text is not None:
                    return _parse_report(pid, text)
                if not _running(pid):
                    sent = False  # nothing will run the script now
                    # The code removes its script first thing: gone, it ran.
                    when = "before the injected code ran" if _exists(script, tmp) else "while the injected code ran"
                    raise ToolError(f"process {pid} exited during the injection, {when}")
                select.select([], [], [], 0.02)
        except KeyboardInterrupt:
            if _exists(script, tmp):
                print(f"pydtrace: process {pid} runs the script ({inside}.py) when its main thread next runs "
                      "Python code, and loads the probes then", file=sys.stderr, flush=True)
            raise
        raise ToolError(
            f"process {pid} has not run the script within {SAFE_POINT_TIMEOUT:g} s: sys.remote_exec runs it "
            "when the process's main thread next runs Python code, and that thread runs none now (it waits "
            f"in C: a sleep, a lock, I/O). The script stays in its /tmp ({inside}.py) until then; when it "
            "runs, it removes itself and loads the probes. `python -m dtrace list -p "
            f"{pid}` says whether they are loaded; try the tool again then")
    finally:
        # Until the target has run the script, the script stays: the target would fail to open it
        # (FileNotFoundError on its stderr) and never load the probes. The report goes: that tells
        # the code, when it runs, that no one waits for it.
        for file in (report,) if sent and _exists(script, tmp) else (report, script):
            try:
                os.unlink(file, dir_fd=tmp)
            except OSError:
                pass
        os.close(tmp)


def _exists(file: str, directory: int) -> bool:
    try:
        os.stat(file, dir_fd=directory, follow_symlinks=False)
    except OSError:
        return False
    return True


def _remote_exec(process: pyprocess.PythonProcess, script: str) -> None:
    pid = process.pid
    if sys.version_info >= (3, 14):
        try:
            sys.remote_exec(pid, script)  # type: ignore[attr-defined]
        except PermissionError as error:
            raise ToolError(f"sys.remote_exec({pid}) was refused: {error}\n{ptrace_explanation(pid)}") from None
        except (OSError, RuntimeError) as error:
            raise ToolError(f"sys.remote_exec({pid}) failed: {error} (remote debugging disabled in the process, "
                            "with -X disable_remote_debug or PYTHON_DISABLE_REMOTE_DEBUG?)") from None
        return
    # This tool runs on an older Python: the target's own interpreter asks for it.
    done = subprocess.run(
        [process.executable, "-I", "-c", "import sys; sys.remote_exec(int(sys.argv[1]), sys.argv[2])", str(pid), script],
        capture_output=True, text=True, timeout=SAFE_POINT_TIMEOUT + GDB_MARGIN,
    )
    if done.returncode != 0:
        raise ToolError(f"sys.remote_exec({pid}) through {process.executable} failed:\n{done.stderr.strip()}")


def _owner(pid: int) -> tuple[int, int]:
    fields = procfs.status(pid)
    if fields is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), f"/proc/{pid}/status")
    uid = int(fields["Uid"].split()[0]) if "Uid" in fields else 0
    gid = int(fields["Gid"].split()[0]) if "Gid" in fields else 0
    return uid, gid


def _read_report(file: str, directory: int) -> str | None:
    """The report in ``file`` of the open ``directory``, once the code has written all of it."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
    except OSError:
        return None
    try:
        data = os.read(fd, 1 << 16).decode(errors="replace")
    finally:
        os.close(fd)
    return data.strip() if data.endswith("\n") else None
