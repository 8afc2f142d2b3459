"""Busy processes in the shapes a user finds a Python process in: nothing in them helps a consumer.

The one definition of these shapes for the tests and benchmarks that attach to a process that runs
on its own (tests/test_attach.py, tests/test_inject.py, benches/attach_latency.py). It is a
program, run by path under the interpreter under test (which may have no pydtrace-rs at all, and
neither tests/ nor benches/ on its path)::

    python tests/workloads/busy.py SHAPE [--import-dtrace] [--calls N] [--wait-for PROBE]
                                         [--on-dtrace-import exit|interrupt]
                                         [--fork-on-sighup] [--fork-until-loaded]

It imports dtrace only with ``--import-dtrace`` (``--inject`` loads it from outside). Once set up
it prints ``READY {json}`` (its ``pid``; ``library``, the probe object, with ``--import-dtrace``;
``port`` where it listens) and runs :func:`spin` without end in its shape. On request, SIGUSR1
(the phase under a consumer) or SIGUSR2 (without), one thread of the shape runs :func:`phase`: it
waits until ``--wait-for``'s probe is live (if the dtrace module is loaded), calls :func:`marked`
``--calls`` times and prints ``DONE {json}``: what an injection must have left as it was, the
threads' progress, and without a consumer the probes still enabled once they went idle.

Every line is printed whole (:func:`say`); no name is added to ``__main__`` after READY (the tests
check that an injection adds none).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

#: The calls a shape's threads make: counts[0] the main thread's (or the one task's), 1 and 2 the
#: workers'. A test compares two phases' counts to see that the threads ran on.
counts = [0, 0, 0]
#: sys.path as it was at start: an injection must leave it so.
PATH0 = list(sys.path)
#: Set by a request's signal; cleared by the thread that runs the phase.
requested = threading.Event()
#: Per request, in order: whether it is the phase under a consumer (SIGUSR1).
traced: list[bool] = []
#: Set up by main(): the options, and the names of __main__ at READY.
SETTINGS: dict = {"calls": 0, "wait_for": None, "baseline": frozenset()}
_said = threading.Lock()


def say(*words) -> None:
    """One whole line, from any thread (print() writes its words one by one)."""
    with _said:
        sys.stdout.write(" ".join(str(word) for word in words) + "\n")
        sys.stdout.flush()


def spin(n):
    return n + 1


def marked(n):
    return n * 2


def phase(under_consumer: bool) -> dict:
    """The marked calls, once ``--wait-for``'s probe is live (under a consumer, with the dtrace
    module loaded); and what must be unchanged."""
    module = sys.modules.get("dtrace")
    wait_for = SETTINGS["wait_for"]
    live = bool(under_consumer and wait_for and module is not None and module.wait_for_consumer(wait_for, timeout=60))
    for i in range(SETTINGS["calls"]):
        marked(i)
    idle = None
    if not under_consumer and module is not None and hasattr(module, "enabled_probes"):
        # After the consumer left: the probes still enabled once they are off again (or 30 s).
        deadline = time.monotonic() + 30
        while module.enabled_probes() and time.monotonic() < deadline:
            time.sleep(0.001)
        idle = sorted(module.enabled_probes())
    main = sys.modules["__main__"]
    return dict(
        live=live,
        dtrace=getattr(module, "__file__", None),
        main_added=sorted(set(vars(main)) - SETTINGS["baseline"]),
        path_same=sys.path == PATH0,
        last_exc=repr(getattr(sys, "last_exc", None)),
        counts=list(counts),
        idle=idle,
    )


def serve() -> None:
    """Run the requested phase in this thread and print its ``DONE`` line."""
    requested.clear()
    say("DONE", json.dumps(phase(traced.pop(0))))


def _on_request(signum, frame) -> None:
    traced.append(signum == signal.SIGUSR1)
    requested.set()


def ready(**facts) -> None:
    """Note __main__'s names, then say READY with the pid and ``facts``."""
    SETTINGS["baseline"] = frozenset(vars(sys.modules["__main__"]))
    module = sys.modules.get("dtrace") if SETTINGS.get("import_dtrace") else None
    if module is not None:
        facts["library"] = module.library_path()
    say("READY", json.dumps({"pid": os.getpid(), **facts}))


def start(target, *args) -> None:
    threading.Thread(target=target, args=args, daemon=True).start()


def spin_and_serve() -> None:
    """The main thread's loop: Python without end, never releasing the GIL by itself."""
    while True:
        counts[0] = spin(counts[0])
        if requested.is_set():
            serve()


def serving_worker() -> None:
    """A thread that only waits for requests and runs the phase."""
    while True:
        requested.wait()
        serve()


# --- The shapes ---------------------------------------------------------------------------------


def cpu_bound() -> None:
    """The main thread runs Python and never releases the GIL by itself; no other thread."""
    ready()
    spin_and_serve()


def busy_threads() -> None:
    """The main thread and two more run Python without end; each checks its own arithmetic."""

    def worker(me):
        while True:
            n = counts[me]
            if spin(n) != n + 1:
                say("WRONG", me)
            counts[me] = n + 1

    for me in (1, 2):
        start(worker, me)
    ready()
    spin_and_serve()


def writing() -> None:
    """The main thread runs Python and writes a line every ~2 ms (it releases the GIL for I/O)."""
    out = open(os.devnull, "w")
    ready()
    deadline = time.monotonic()
    while True:
        counts[0] = spin(counts[0])
        now = time.monotonic()
        if now >= deadline:
            out.write("tick\n")
            out.flush()
            deadline = now + 0.002
        if requested.is_set():
            serve()


def lock_wait() -> None:
    """The main thread waits on a lock for good (blocked in C); two threads run Python."""

    def worker(me):
        while True:
            counts[me] = spin(counts[me])
            if me == 1 and requested.is_set():
                serve()

    for me in (1, 2):
        start(worker, me)
    ready()
    threading.Event().wait()


def sleep() -> None:
    """The main thread sleeps in C (time.sleep) and says how long each sleep lasted (``SLEPT``):
    every sleep must last as long as asked. A thread waits to run the phase."""
    start(serving_worker)
    ready()
    while True:
        started = time.monotonic()
        time.sleep(0.7)
        counts[0] += 1
        say("SLEPT", time.monotonic() - started)


def asyncio_loop() -> None:
    """An asyncio loop: a task that computes and yields, one that sleeps and runs the phase."""
    import asyncio

    async def ticker():
        while True:
            for _ in range(200):
                counts[0] = spin(counts[0])
            await asyncio.sleep(0)

    async def phaser():
        while True:
            await asyncio.sleep(0.001)
            if requested.is_set():
                serve()

    async def main():
        await asyncio.gather(ticker(), phaser())

    ready()
    asyncio.run(main())


def asyncio_server() -> None:
    """An idle asyncio server (its loop blocked in epoll_wait): it echoes lines; ``phase`` runs the
    phase under a consumer, ``status`` without, and the answer is the ``DONE`` line."""
    import asyncio

    async def handle(reader, writer):
        while line := await reader.readline():
            counts[0] += 1
            if line in (b"phase\n", b"status\n"):
                writer.write(("DONE " + json.dumps(phase(line == b"phase\n")) + "\n").encode())
            else:
                writer.write(b"echo " + line)
            await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ready(port=server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def accept() -> None:
    """The main thread blocks in accept(); each connection gets a line, ``hello N``."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    ready(port=server.getsockname()[1])
    while True:
        connection, _ = server.accept()
        counts[0] += 1
        connection.sendall(b"hello %d\n" % counts[0])
        connection.close()


def _step(x):
    # The check is in a function: CPython 3.14 leaves the backward jump that follows an `if` in a
    # loop out of the enclosing try's exception table, so an exception raised by the eval breaker
    # there (the program's own Ctrl-C too) would pass its `except` by.
    if requested.is_set():
        serve()
    return spin(x)


def busy_catching_ctrl_c() -> None:
    """As cpu-bound, and the program's own handler of KeyboardInterrupt says ``GOT`` and runs on."""
    ready()
    x = 0
    while True:
        try:
            while True:
                x = _step(x)
        except KeyboardInterrupt:
            say("GOT KeyboardInterrupt")


def sleep_catching_ctrl_c() -> None:
    """The main thread sleeps an hour at a time; its handler of KeyboardInterrupt says ``GOT``."""
    start(serving_worker)
    ready()
    while True:
        try:
            time.sleep(3600)
        except KeyboardInterrupt:
            say("GOT KeyboardInterrupt")


def subinterpreter() -> None:
    """The main thread runs a sub-interpreter's code for good: it sleeps there (blocked in a call
    CPython retries, whose PyErr_CheckSignals comes in the sub-interpreter); the sub-interpreter
    says READY, so the main thread is in it."""
    try:
        import _interpreters as interpreters  # 3.13
    except ImportError:
        import _xxsubinterpreters as interpreters  # 3.12
    sub = interpreters.create()
    interpreters.run_string(sub, "import json, os, time\nprint('READY', json.dumps({'pid': os.getpid()}), flush=True)\n"
                                 "while True:\n    time.sleep(3600)\n")


def holds_the_gil() -> None:
    """The main thread blocks in C holding the GIL (read() through ctypes.PyDLL, which keeps it)
    until a byte comes through the pipe whose write end READY names (``pipe``; write it through
    /proc/PID/fd): no Python code runs in the process meanwhile. Then ``AFTER`` says whether
    dtrace got loaded, and it sleeps."""
    import ctypes

    read_end, write_end = os.pipe()
    ready(pipe=write_end)
    buffer = ctypes.create_string_buffer(1)
    ctypes.PyDLL(None).read(read_end, buffer, 1)
    for _ in range(100000):  # Python code again: a pending call left queued runs here
        pass
    with open("/proc/self/maps") as maps:
        mapped = "dtrace/_native" in maps.read()
    say("AFTER", json.dumps({"dtrace": "dtrace" in sys.modules, "maps": mapped}))
    time.sleep(100)


SHAPES = {
    "cpu-bound": cpu_bound,
    "busy-threads": busy_threads,
    "writing": writing,
    "lock-wait": lock_wait,
    "sleep": sleep,
    "asyncio": asyncio_loop,
    "asyncio-server": asyncio_server,
    "accept": accept,
    "busy-catching-ctrl-c": busy_catching_ctrl_c,
    "sleep-catching-ctrl-c": sleep_catching_ctrl_c,
    "subinterpreter": subinterpreter,
    "holds-the-gil": holds_the_gil,
}
#: Shapes that take no requests: no signal handler of theirs.
NO_REQUESTS = {"holds-the-gil"}


# --- What some tests add to a shape -----------------------------------------------------------


def on_dtrace_import(action: str) -> None:
    """An audit hook for the moment something imports dtrace (the injected code, say): ``exit``
    ends the process (os._exit(7)); ``interrupt`` raises SIGINT once, so the program's handler
    (KeyboardInterrupt) runs inside that code."""
    interrupted = []

    def hook(event, args):
        if event != "import" or args[0] != "dtrace":
            return
        if action == "exit":
            os._exit(7)
        if not interrupted:
            interrupted.append(1)
            signal.raise_signal(signal.SIGINT)

    sys.addaudithook(hook)


def fork_on_sighup() -> None:
    """SIGHUP makes the main thread fork a child that says ``CHILD PID`` and sleeps."""

    def fork_child(signum, frame):
        child = os.fork()
        if child == 0:
            say("CHILD", os.getpid())
            time.sleep(100)
            os._exit(0)

    signal.signal(signal.SIGHUP, fork_child)


def fork_until_loaded() -> None:
    """A thread forks children until dtrace is loaded, each of which runs Python code for a moment
    and exits 0 (a child that inherited a debugger's breakpoint would die of SIGTRAP: it says
    ``CHILD-ENDED STATUS``); counts[1] counts them."""
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)  # fork() in a process with threads

    def forker():
        while "dtrace" not in sys.modules:
            child = os.fork()
            if child == 0:
                for i in range(20000):
                    spin(i)
                time.sleep(0.01)
                os._exit(0)
            _, status = os.waitpid(child, 0)
            counts[1] += 1
            if status != 0:
                say("CHILD-ENDED", status)

    start(forker)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--import-dtrace", action="store_true", help="import dtrace before READY")
    parser.add_argument("--calls", type=int, default=1500, help="calls of marked() in a phase")
    parser.add_argument("--wait-for", help="a probe the phase under a consumer waits for")
    parser.add_argument("--on-dtrace-import", choices=["exit", "interrupt"])
    parser.add_argument("--fork-on-sighup", action="store_true")
    parser.add_argument("--fork-until-loaded", action="store_true")
    options = parser.parse_args()
    SETTINGS.update(calls=options.calls, wait_for=options.wait_for, import_dtrace=options.import_dtrace)
    if options.on_dtrace_import:
        on_dtrace_import(options.on_dtrace_import)
    if options.shape not in NO_REQUESTS:
        signal.signal(signal.SIGUSR1, _on_request)
        signal.signal(signal.SIGUSR2, _on_request)
    if options.import_dtrace:
        import dtrace  # noqa: F401  (armed from here on)
    if options.fork_on_sighup:
        fork_on_sighup()
    if options.fork_until_loaded:
        fork_until_loaded()
    SHAPES[options.shape]()


if __name__ == "__main__":
    main()
