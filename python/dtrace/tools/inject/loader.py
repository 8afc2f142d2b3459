"""``-p PID`` on a Python process that has not loaded the probes: load them (``--inject``).

The tools trace the probes of pydtrace-rs's shared object, so the process must have imported
``dtrace``. When it has not, the tool asks (on a terminal) or, with ``--inject``, goes ahead and
runs ``import dtrace`` in it, under the GIL, at a point where the interpreter runs code of its
own accord (where it runs signal handlers and pending calls):

- CPython 3.14 and later: ``sys.remote_exec(pid, script)`` (PEP 768), the interpreter's own way.
- CPython 3.12 and 3.13: gdb (batch mode, ``gdb.py``), with the script ``gdb_inject.py`` beside
  this file, which says what it does step by step.

The code that runs in the target is ``program.py`` (see ``payload.py``), the same for both ways: it
imports the target's own pydtrace-rs, or else this tool's copy when the tool's interpreter has
the same version and ABI (checked here, and again in the target against the extension suffixes
its import system accepts), without adding anything to ``sys.path``. It reports back what it did.
docs/injection.md has the details, and why each step is safe.
"""

from __future__ import annotations

import errno
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from dtrace.tools.errors import ToolError
from dtrace.tools.inject.gdb import GDB_MARGIN, gdb_path, with_gdb
from dtrace.tools.inject.payload import SAFE_POINT_TIMEOUT, THROUGH, code, outcome, parse_report
from dtrace.tools.inject.ptrace import check_privileges, ptrace_explanation
from dtrace.tools.proc import procfs, pyprocess


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
    tracer = procfs.tracer_pid(pid)
    if tracer:
        raise ToolError(f"process {pid} is already traced by process {tracer} ({procfs.command_name(tracer)}): "
                        "a process can have only one ptrace tracer (a debugger, strace); detach it first")
    current = procfs.state(pid)
    if current in ("T", "t"):
        # gdb would let it run on: a process stopped by job control (or held by a debugger) stays as it is.
        raise ToolError(f"process {pid} is stopped (Ctrl-Z, SIGSTOP, or a debugger holds it): continue it first")
    if current in (None, "Z", "X"):
        raise procfs.gone(pid)
    offered = offered_package(process)
    report = with_remote_exec(process, offered) if how == "remote_exec" else with_gdb(process, offered, debugger)
    outcome(process, report, offered, how)


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
        if not procfs.alive(pid):
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
                    return parse_report(pid, text)
                if not procfs.alive(pid):
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
