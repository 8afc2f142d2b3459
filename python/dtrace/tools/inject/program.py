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
        os.write(fd, text + b"\n")
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


# Filled in by the injector (dtrace/tools/inject/payload.py: code()) with the run's values; as
# they stand here, the module can be imported (by the tests) without running anything.
ORIGIN = None
OFFERED = None
REPORT_PATH = None
if ORIGIN is not None:
    __pydtrace_report__, handed = run()
    if handed is not None:
        raise handed
