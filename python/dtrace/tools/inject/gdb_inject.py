"""Load pydtrace-rs into a running CPython 3.12 or 3.13: the gdb side of ``--inject``.

Not imported by the package: ``python -m dtrace`` (dtrace/tools/inject/gdb.py) runs it inside gdb,
with gdb's own Python, and reads the ``PYDTRACE-INJECT {json}`` lines it prints. Its parameters
come in the environment variable PYDTRACE_INJECT (JSON):

- ``pid``; ``code``: the Python source run in the target; ``timeout``: seconds to wait for a
  safe point; ``abort_fd``: a pipe from the tool, where a byte or end of file gives up the wait;
- ``functions``: the address in the process of every function called (the tool reads them from
  the ELF symbols and /proc/PID/maps, so that gdb reads no symbols of the interpreter: a build
  with debug information takes seconds to load, with the process stopped);
- ``python_object``: the file that holds the interpreter (libpython or the executable).

What it does to the target (docs/injection.md says why each step is safe, and how each is
undone):

0. Attach (every thread stops). Before any register of the process changes, prove in its main
   thread that gdb can write back every register set an inferior call writes and restores: a
   general register and one of the extended state (x86-64: the XSAVE area, which gdb writes
   whole), each written with another value, read back from the process, then written back and
   read back again. A gdb that cannot (Debian 12's gdb 13.1 on CPUs with AMX: "Couldn't write
   extended state status") would leave an inferior call's registers in the process; it fails
   the first write, which changes nothing: refused, the process untouched.
1. Check that the interpreter is initialized and not finalizing.
2. In the main thread: map one anonymous page (``mmap``), write the code into it, and queue a
   pending call ``Py_AddPendingCall(PyErr_CheckSignals, NULL)``: at its next eval-breaker check
   the main thread calls ``PyErr_CheckSignals()``, which runs the handlers of signals that came
   (there were none: the interpreter has just run them) and returns 0.
3. If the main thread is blocked in a system call made by CPython's own code (``time.sleep``,
   ``select``, a lock's wait...), that call returns EINTR, as it does when a signal handler
   runs: CPython then calls ``PyErr_CheckSignals()`` (or, in a lock's wait,
   ``Py_MakePendingCalls()``, which makes the queued call) and retries.
4. A breakpoint on ``PyErr_CheckSignals()``, for the main thread; the process runs on until it
   is hit there, or until ``timeout`` passes: then the process is
   stopped with SIGSTOP (gdb swallows it), the breakpoint is removed, the page unmapped, and
   gdb detaches, nothing run; the queued call stays as harmless as a signal check.
5. At the breakpoint (the main thread holds the GIL there) if the main thread runs the main
   interpreter (``PyInterpreterState_Get() == PyInterpreterState_Main()``; a sub-interpreter's
   call is let pass: pydtrace-rs cannot load there), with the breakpoint gone:
   ``PyGILState_Ensure()``, put aside any exception set (``PyErr_GetRaisedException``),
   ``PyRun_String(code)`` in a new dictionary, read the report the code left there
   (``__pydtrace_report__``, bytes), drop the dictionary, restore the exception,
   ``PyGILState_Release()``. An exception the code lets through (only one that a signal handler
   of the program raised while it ran) goes to the program: ``PyErr_CheckSignals`` returns -1
   with it set, as when a handler raises there.
6. Detach.
"""

import json
import os
import signal
import sys
import threading
import time

import gdb

PARAMS = json.loads(os.environ["PYDTRACE_INJECT"])
PID = int(PARAMS["pid"])
CODE = PARAMS["code"].encode()
REPORT_KEY = b"__pydtrace_report__"
TIMEOUT = float(PARAMS.get("timeout", 10.0))
ABORT_FD = PARAMS.get("abort_fd")
FUNCTIONS = {name: int(address) for name, address in PARAMS["functions"].items()}
PYTHON_OBJECT = PARAMS["python_object"]

#: The C types of the functions called, as gdb casts them.
SIGNATURES = {
    "mmap": "long (*)(void *, unsigned long, int, int, int, long)",
    "munmap": "int (*)(void *, unsigned long)",
    "Py_IsInitialized": "int (*)(void)",
    "Py_IsFinalizing": "int (*)(void)",
    "Py_AddPendingCall": "int (*)(void *, void *)",
    "PyGILState_Ensure": "int (*)(void)",
    "PyGILState_Release": "void (*)(int)",
    "PyErr_GetRaisedException": "long (*)(void)",
    "PyErr_SetRaisedException": "void (*)(void *)",
    "PyErr_Clear": "void (*)(void)",
    "PyDict_New": "long (*)(void)",
    "PyRun_String": "long (*)(char *, int, void *, void *)",
    "PyDict_GetItemString": "long (*)(void *, char *)",
    "PyBytes_AsString": "long (*)(void *)",
    "PyBytes_Size": "long (*)(void *)",
    "Py_DecRef": "void (*)(void *)",
    "PyInterpreterState_Get": "long (*)(void)",
    "PyInterpreterState_Main": "long (*)(void)",
    "PyThreadState_GetUnchecked": "long (*)(void)",
    "PyThreadState_GetInterpreter": "long (*)(void *)",
}

#: Linux's restart codes of an interrupted system call (kernel-internal errno values) that reach
#: user space as EINTR when a signal handler runs: ERESTARTSYS, ERESTARTNOHAND,
#: ERESTART_RESTARTBLOCK. ERESTARTNOINTR (-513) must never become EINTR: left alone.
RESTARTABLE = (-512, -514, -516)
EINTR = 4
PROT_READ_WRITE = 3
MAP_PRIVATE_ANONYMOUS = 0x22
PY_FILE_INPUT = 257


def emit(kind, **fields):
    sys.stdout.write("PYDTRACE-INJECT " + json.dumps(dict(kind=kind, **fields)) + "\n")
    sys.stdout.flush()


class Failure(Exception):
    """A step failed; the message says which, for the user."""


class Unprovable(Exception):
    """gdb cannot write back a register set of the process: nothing was changed in it."""


class Damaged(Exception):
    """gdb wrote a register of the process and could not put its value back."""


class Exited(Exception):
    """The process exited while gdb was attached."""


def alive():
    """Whether the process is still there (gdb may not have seen its exit yet)."""
    if gdb.selected_inferior().pid == 0:
        return False
    try:
        with open(f"/proc/{PID}/status") as status:
            return not any(line.startswith("State:") and line.split()[1] in ("Z", "X") for line in status)
    except OSError:
        return False


def exit_status():
    """How the process ended, as gdb saw it ("status 7", "killed by SIGKILL"), or None."""
    for variable, text in (("$_exitcode", "status {}"), ("$_exitsignal", "killed by signal {}")):
        try:
            value = gdb.parse_and_eval(variable)
            if value.type.code != gdb.TYPE_CODE_VOID:
                number = int(value)
                if "signal" in text:
                    try:
                        return f"killed by {signal.Signals(number).name}"
                    except ValueError:
                        pass
                return text.format(number)
        except (gdb.error, RuntimeError):
            pass
    return None


def evaluate(expression):
    try:
        return gdb.parse_and_eval(expression)
    except gdb.error as error:
        if not alive():
            raise Exited() from None
        raise Failure(f"{expression}: {error}") from None


def call(function, *arguments):
    """Call ``function`` in the process, in the selected thread; its result as an int (None for void)."""
    pointer = f"(({SIGNATURES[function]}){FUNCTIONS[function]:#x})"
    result = evaluate(f"{pointer}({', '.join(str(a) for a in arguments)})")
    return None if SIGNATURES[function].startswith("void ") else int(result)


def register(name):
    return int(evaluate(f"${name}"))


ARCH = ""


def x86_64():
    return ARCH in ("i386:x86-64", "x86_64")


#: Per architecture (as gdb names it): a 64-bit part of a general register and one of the
#: extended state, as gdb names them. gdb writes a register set whole (x86-64: the general
#: registers with PTRACE_SETREGS, the XSAVE area, x87, SSE, AVX, AVX-512, AMX, PKRU, with
#: PTRACE_SETREGSET), so one register of each set shows that the set can be written back.
#: The aarch64 entry is untested (the project's machine is x86-64).
PROOF_REGISTERS = {
    "i386:x86-64": ("$r11", "$xmm0.v2_int64[0]"),
    "aarch64": ("$x9", "$v0.d.s[0]"),
}


def read_back(expression):
    """A register's value as the process holds it: gdb's cached copy is dropped first (after a
    write, gdb keeps the value written, whether or not it reached the process)."""
    try:
        gdb.execute("maintenance flush register-cache", to_string=True)
    except gdb.error:
        gdb.execute("flushregs", to_string=True)  # its name before gdb 12
    return int(evaluate(expression))


def signed64(value):
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


def prove_registers():
    """In the selected (main) thread, before any register of the process changes: write another
    value into each register of PROOF_REGISTERS, read it back from the process, write the old
    value back, read it back. A write of the value a register already holds is skipped by gdb
    and would prove nothing. Unprovable (nothing changed) when the first write fails or does not
    reach the process; Damaged when the old value cannot be put back."""
    names = PROOF_REGISTERS.get(ARCH)
    if names is None:
        raise Unprovable(f"gdb's registers of architecture {ARCH} are not known to this tool, so it cannot show "
                         "first that gdb can write them back")
    for expression in names:
        old = read_back(expression)
        other = signed64(old ^ 0x5A5A5A5A5A5A5A5A)
        try:
            gdb.execute(f"set var {expression} = {other}", to_string=True)
        except gdb.error as error:
            if read_back(expression) == old:
                raise Unprovable(f"writing {expression[1:]} failed: {error}") from None
            put_back(expression, old, error)
            raise Unprovable(f"writing {expression[1:]} failed: {error}") from None
        written = read_back(expression)
        put_back(expression, old, None)
        if written != other:
            raise Unprovable(f"a value written into {expression[1:]} did not reach the process")


def put_back(expression, old, first_error):
    """Write ``old`` back into a register (a few tries); Damaged if it does not stay there."""
    error = first_error
    for _ in range(3):
        try:
            gdb.execute(f"set var {expression} = {old}", to_string=True)
            if read_back(expression) == old:
                return
        except gdb.error as failure:
            error = failure
    raise Damaged(f"gdb wrote {expression[1:]} of its main thread and could not write its value back "
                  f"({old:#x}): {error}")


class Anchor(gdb.Breakpoint):
    """A breakpoint at the entry of ``PyErr_CheckSignals``, for the main thread: where the
    interpreter runs signal handlers, at its own safe points (the eval breaker, the retry of a
    system call that a signal interrupted)."""

    hit = False

    def __init__(self):
        super().__init__(f"*{FUNCTIONS['PyErr_CheckSignals']:#x}", internal=True)
        self.silent = True

    def stop(self):
        if Anchor.hit or gdb.selected_thread().ptid[1] != PID:
            return False  # only the main thread runs signal handlers and pending calls
        Anchor.hit = True
        return True


class Watchdog:
    """Gives up the wait for a safe point after TIMEOUT seconds, or when the tool says so (a byte
    or end of file on ABORT_FD). The decision is taken in gdb's own thread (gdb.post_event), so
    that it cannot cross a breakpoint hit: the process is stopped only while it still runs on."""

    def __init__(self):
        self.waiting = False
        self.reason = None
        self.done = threading.Event()

    def start(self):
        threading.Thread(target=self._clock, daemon=True).start()
        if ABORT_FD is not None:
            threading.Thread(target=self._listen, daemon=True).start()

    def _clock(self):
        if not self.done.wait(TIMEOUT):
            self._fire("timeout")

    def _listen(self):
        try:
            os.read(int(ABORT_FD), 1)
        except OSError:
            pass
        self._fire("aborted")

    def _fire(self, reason):
        if not self.done.is_set():
            gdb.post_event(lambda: self._stop(reason))

    def _stop(self, reason):
        if self.waiting and not Anchor.hit and self.reason is None and alive():
            self.reason = reason
            os.kill(PID, signal.SIGSTOP)  # gdb stops on it and does not pass it on (nopass)


def main_thread():
    for thread in gdb.selected_inferior().threads():
        if thread.ptid[1] == PID:
            return thread
    raise Failure("its main thread has exited (only the main thread runs the interpreter's pending calls)")


def libc_like(path):
    base = os.path.basename(path or "")
    return base.startswith(("libc.so", "libpthread", "ld-musl", "libc.musl"))


def blocked_in_cpython_call():
    """If the main thread (selected) sits in an interrupted system call that CPython's own code
    made (which retries after EINTR, PEP 475): the name of the libc function, else None.
    x86-64 only: elsewhere gdb does not expose the register that says a call was interrupted."""
    if not x86_64() or register("orig_rax") < 0 or register("rax") not in RESTARTABLE:
        return None
    # Unwinding out of libc needs its symbols (only those: the caller's address is enough).
    gdb.execute("sharedlibrary libc", to_string=True)
    frame = gdb.newest_frame()
    name = frame.name() or "?"
    while frame is not None and libc_like(gdb.solib_name(frame.pc())):
        try:
            frame = frame.older()
        except gdb.error:
            return None
    if frame is None:
        return None
    caller = gdb.solib_name(frame.pc())
    if caller is None:  # the executable: an interpreter linked statically
        caller = gdb.selected_inferior().progspace.filename or ""
    if os.path.realpath(caller) == os.path.realpath(PYTHON_OBJECT) or "/lib-dynload/" in caller:
        return name
    return None


def run_code(page, key):
    """At the anchor (main thread, GIL held, a safe point): run the code in a new namespace.
    Returns (the report, or None; whether an exception was handed to the program)."""
    state = call("PyGILState_Ensure")
    saved = call("PyErr_GetRaisedException")
    report = None
    escaped = 0
    namespace = call("PyDict_New")
    if namespace:
        result = call("PyRun_String", page, PY_FILE_INPUT, namespace, namespace)
        if result:
            call("Py_DecRef", result)
        else:
            escaped = call("PyErr_GetRaisedException")
        item = call("PyDict_GetItemString", namespace, key)  # borrowed; sets no exception
        if item:
            text = call("PyBytes_AsString", item)
            if text:
                report = bytes(gdb.selected_inferior().read_memory(text, call("PyBytes_Size", item)))
            else:
                call("PyErr_Clear")
        call("Py_DecRef", namespace)
    else:
        call("PyErr_Clear")  # MemoryError
    handed = False
    if saved:
        call("PyErr_SetRaisedException", saved)
        if escaped:
            call("Py_DecRef", escaped)
    elif escaped:
        call("PyErr_SetRaisedException", escaped)
        handed = True
    call("PyGILState_Release", state)
    return report, handed


def describe_main_thread():
    """Where the main thread is, for the message: its innermost frames (libraries if unnamed)."""
    names = []
    frame = gdb.newest_frame()
    while frame is not None and len(names) < 4:
        names.append(frame.name() or os.path.basename(gdb.solib_name(frame.pc()) or "??"))
        try:
            frame = frame.older()
        except gdb.error:
            break
    return " <- ".join(names)


def sigstop_sender():
    """At a stop by SIGSTOP: the process that sent it (None if gdb cannot tell)."""
    try:
        info = gdb.parse_and_eval("$_siginfo")
        if int(info["si_signo"]) != signal.SIGSTOP:
            return None
        return int(info["_sifields"]["_kill"]["si_pid"])
    except (gdb.error, RuntimeError):
        return None


def inject():
    global ARCH
    for setting in (
        "set pagination off",
        "set confirm off",
        "set width 0",
        # A signal that stops an inferior call unwinds it (gdb's default leaves the frame there).
        "set unwindonsignal on",
        # Signals reach the program as they would without gdb, and stop nothing.
        "handle all nostop noprint pass",
        "handle SIGINT nostop noprint pass",
        # Except SIGSTOP, which would stop a call gdb makes: kept, while gdb waits (below), or lost.
        "handle SIGSTOP nostop noprint nopass",
    ):
        gdb.execute(setting, to_string=True)
    attached = time.monotonic()  # the process stops during the attach: counted from here
    try:
        gdb.execute(f"attach {PID}", to_string=True)
    except gdb.error as error:
        emit("attach_failed", message=str(error))
        return
    emit("step", step="attached")
    anchors = []
    page = size = 0
    started = False  # whether the code was started in the process
    queued = False  # whether the pending call was queued (it cannot be taken back; harmless)
    restart = None  # the interrupted system call's restart code, while it is changed and not yet run on
    stopped_by = None  # a SIGSTOP that another process sent meanwhile: sent again after the detach
    try:
        ARCH = gdb.selected_inferior().architecture().name()
        main_thread().switch()
        prove_registers()
        emit("step", step="proven")
        if not call("Py_IsInitialized"):
            raise Failure("its interpreter is not initialized (yet, or any more)")
        if call("Py_IsFinalizing"):
            raise Failure("its interpreter is shutting down")
        main_interpreter = call("PyInterpreterState_Main")
        # Running a sub-interpreter's bytecode now? (Its thread state, if it has one attached: a TLS
        # read, safe anywhere.) Then the main interpreter's pending call waits for it to come back.
        current = call("PyThreadState_GetUnchecked")
        in_subinterpreter = bool(current) and call("PyThreadState_GetInterpreter", current) != main_interpreter
        size = (len(CODE) + len(REPORT_KEY) + 2 + 4095) // 4096 * 4096
        page = call("mmap", 0, size, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS, -1, 0)
        if page in (-1, 0):
            page = 0
            raise Failure("mmap failed in the process")
        gdb.selected_inferior().write_memory(page, CODE + b"\0" + REPORT_KEY + b"\0")
        key = page + len(CODE) + 1
        if call("Py_AddPendingCall", FUNCTIONS["PyErr_CheckSignals"], 0) != 0:
            raise Failure("its queue of pending calls is full")
        queued = True
        blocked = blocked_in_cpython_call()
        if blocked:
            # The last change before the process runs on (an inferior call would restore it); put
            # back below if the process does not run on.
            restart = register("rax")
            gdb.execute(f"set var $rax = {-EINTR}", to_string=True)
        anchors.append(Anchor())
        gdb.execute("handle SIGSTOP stop print nopass", to_string=True)
        emit("waiting", blocked=blocked)
        watchdog = Watchdog()
        watchdog.start()
        watchdog.waiting = True
        resumed = time.monotonic()
        try:
            while True:
                restart = None
                gdb.execute("continue", to_string=True)
                if not alive():
                    raise Exited()
                if not Anchor.hit:
                    sender = sigstop_sender()
                    if watchdog.reason is None and sender is not None and sender != os.getpid():
                        stopped_by = sender  # someone else's SIGSTOP: the process stops after the detach
                        continue
                    break  # given up (our SIGSTOP)
                main_thread().switch()
                if call("PyInterpreterState_Get") == main_interpreter:
                    break
                # The main thread runs a sub-interpreter's code, where pydtrace-rs cannot load: wait on.
                in_subinterpreter = True
                Anchor.hit = False
        finally:
            watchdog.waiting = False
            watchdog.done.set()
            # A SIGSTOP sent just as the breakpoint was hit must not stop what follows.
            gdb.execute("handle SIGSTOP nostop noprint nopass", to_string=True)
        for anchor in anchors:
            anchor.delete()
        anchors = []
        main_thread().switch()
        if not Anchor.hit:
            emit("no_safe_point", reason=watchdog.reason or "stopped", blocked=blocked, where=describe_main_thread(),
                 subinterpreter=in_subinterpreter)
            return  # the page is unmapped below; the queued call stays a mere signal check
        hit = time.monotonic()
        started = True
        emit("step", step="running")
        report, handed = run_code(page, key)
        ran = time.monotonic()
        call("munmap", page, size)  # compiled and run: nothing refers to the page any more
        page = 0
        if handed:
            # The program's own exception (from its signal handler): the function raises it, as it would have.
            gdb.execute("return (int) -1", to_string=True)
        # How long the process was stopped (before it ran on to the safe point), how long it took
        # to get there, and how long the code ran (the other threads run on meanwhile).
        emit("ran", blocked=blocked, handed=handed,
             report=report.decode("ascii", "replace") if report is not None else None,
             stopped_ms=round((resumed - attached) * 1000, 1), wait_ms=round((hit - resumed) * 1000, 1),
             code_ms=round((ran - hit) * 1000, 1))
    except Unprovable as reason:
        emit("unprovable", message=str(reason))
    except Damaged as damage:
        emit("damaged", message=str(damage))
    except Exited:
        emit("exited", started=started, status=exit_status())
    except Failure as failure:
        emit("failed", message=str(failure), started=started)
    except gdb.error as error:
        if alive():
            emit("failed", message=f"gdb: {error}", started=started)
        else:
            emit("exited", started=started, status=exit_status())
    finally:
        left = []
        for anchor in anchors:
            try:
                anchor.delete()
            except (gdb.error, RuntimeError):
                pass
        if alive():
            if restart is not None:  # never run on
                # The system call restarts as it would have (the EINTR was never seen).
                try:
                    main_thread().switch()
                    gdb.execute(f"set var $rax = {restart}", to_string=True)
                    if read_back("$rax") != restart:
                        left.append("its interrupted system call returns EINTR (CPython retries it)")
                except (Failure, Exited, gdb.error):
                    left.append("its interrupted system call returns EINTR (CPython retries it)")
            if page:
                try:
                    main_thread().switch()
                    call("munmap", page, size)
                except (Failure, Exited, gdb.error):
                    left.append(f"a page of {size} bytes mapped at {page:#x} (the code, not run)")
            if queued and not started:
                left.append("a queued call of PyErr_CheckSignals (the signal check the interpreter makes anyway)")
            try:
                gdb.execute("detach", to_string=True)
            except gdb.error as error:
                emit("detach_failed", message=str(error))
            if stopped_by is not None:
                os.kill(PID, signal.SIGSTOP)  # as it would have been: stopped
            emit("left", left=left, stopped_by=stopped_by)
        elif gdb.selected_inferior().pid != 0:
            # It exited and gdb has not taken note yet: let it (a detach would trip over the
            # threads that are gone). The process is gone already; SIGKILL changes nothing.
            try:
                gdb.execute("kill", to_string=True)
            except gdb.error:
                pass

try:
    inject()
except Exception as error:  # gdb's Python: a report line instead of a traceback
    emit("failed", message=f"internal error in the gdb script: {type(error).__name__}: {error}")
