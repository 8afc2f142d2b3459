"""DTrace/USDT probes for CPython 3.12+: provider ``python``, as CPython declares it.

Importing this module arms the probes: bpftrace, perf, SystemTap or DTrace can
then trace Python function entry and return, lines and garbage collections of
this interpreter through the probes of the shared object :func:`library_path`
names. While no consumer is attached nothing is hooked into the interpreter;
when one attaches, just the events its probes need are switched on, within
about 20 ms, and switched off again when it leaves.

With ``PYDTRACE=1`` in the environment every interpreter of the environment
arms the probes at start-up, without code changes; ``PYDTRACE=0`` keeps them
disarmed even where this module is imported. ``PYDTRACE_SCOPE=app,*/jobs/*.py``
limits the function and line probes to some modules and files (see
:func:`scope`); the tools set a scope for their session with ``--module`` and
``--file``.
"""

# No `from __future__ import annotations`: it imports the __future__ module at run time,
# and `import dtrace` is kept cheap (see BENCHMARKS.md). The annotations are valid as they are.
import os as _os
import sys as _sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from dtrace._scope import Scope
del TYPE_CHECKING

__all__ = [
    "available",
    "enabled_probes",
    "wait_for_consumer",
    "probe_names",
    "library_path",
    "unavailable_reason",
    "scope",
    "Scope",
]

unavailable_reason: str | None
if "t" in getattr(_sys, "abiflags", ""):
    # A free-threaded build (3.14t and later; PyO3 builds for no earlier one). The native module
    # declares that it needs the GIL, and loading it would switch the GIL back on for the whole
    # process; its hooks are neither built nor tested for free threading. So it is not loaded.
    _native = None
    unavailable_reason = "free-threaded Python builds are not supported yet (the probes need the GIL)"
else:
    try:
        from dtrace import _native
    except ImportError as _error:  # a sub-interpreter (PyO3 refuses them), or a broken install
        _native = None
        unavailable_reason = f"the native module cannot be loaded here: {_error}"
    else:
        unavailable_reason = None if _native.backend_available() else "this platform has no USDT/DTrace probe mechanism"

#: True when probes can work in this interpreter: the native module loaded and
#: the platform has a probe mechanism (Linux SDT, or DTrace on macOS and
#: illumos). It stays True under ``PYDTRACE=0``, which only keeps the probes
#: disarmed.
available: bool = unavailable_reason is None

__version__: str = _native.__version__ if _native is not None else "0"


def probe_names() -> tuple[str, ...]:
    """All probes of provider ``python``, as DTrace spells them, in the provider file's order."""
    return tuple(_native.PROBE_NAMES) if _native is not None else ()


def library_path() -> str | None:
    """The path of the shared object that carries the probes (what bpftrace's ``usdt:PATH:...`` names)."""
    return _native.__file__ if _native is not None else None


def enabled_probes() -> frozenset[str]:
    """The probes a consumer enables now and that are live (hooked into the interpreter).

    Names are spelt as DTrace spells them (``"function-entry"``, ``"gc-start"``).
    Empty while no consumer is attached, when the probes are disarmed
    (``PYDTRACE=0``) or when ``available`` is False.
    """
    return _native.enabled_probes() if _native is not None else frozenset()


def wait_for_consumer(*names: str, timeout: float | None = None) -> bool:
    """Block until a consumer has enabled the named probes and they are live.

    With no names, waits until any probe is live. Returns True once they
    are, False when ``timeout`` seconds pass first, and False at once when the
    probes are not armed (``PYDTRACE=0``, or ``available`` is False) or a named
    probe is one this Python version does not support. A probe that an
    interpreter built ``--with-dtrace`` fires itself because the consumer
    enabled its own copy counts as live (docs/interpreter-probes.md). Names
    may be spelt ``"gc-start"`` or ``"gc__start"``; an unknown name raises
    ValueError. The GIL is released while waiting, and Ctrl-C interrupts it.

    Use it, together with the tracer's own start-up line (bpftrace's
    ``BEGIN``), to start a workload only when every event will be seen.
    """
    if _native is None:
        return False
    return _native.wait_for_consumer(list(names), timeout)


def scope() -> "Scope | None":
    """The scope in force, or None while every piece of code fires the probes.

    Code is in scope when the module that runs it (its frame's ``__name__``;
    for ``__main__`` also ``__spec__.name``) is one of ``modules`` or a submodule
    of one, or when its ``co_filename`` matches one of the ``files`` globs. Code
    out of scope fires no ``function__entry``, ``function__return`` or ``line``
    probe, and after its first event costs nothing. The gc, import, audit and
    instance probes are not scoped. The scope comes from ``PYDTRACE_SCOPE`` at
    start, or, while tools run with ``--module``/``--file``, from them (the union
    of their scopes), and goes back when they leave.
    """
    if _native is None:
        return None
    in_force = _native.scope()
    if in_force is None:
        return None
    from dtrace._scope import Scope

    return Scope(*in_force)


def _is_tool() -> bool:
    """Whether this process is ``python -m dtrace`` or ``pydtrace`` (known before ``sys.argv`` is)."""
    argv = getattr(_sys, "orig_argv", [])
    return argv[1:3] == ["-m", "dtrace"] or (len(argv) > 1 and _os.path.basename(argv[1]) == "pydtrace")


def _arm_from_environment() -> None:
    """Arm the probes unless ``PYDTRACE=0``; called once, at import."""
    # The variables are read through _native.getenv: os.environ.get raises and catches a KeyError
    # for each variable that is not set, a noticeable share of `import dtrace` (BENCHMARKS.md).
    if _native is None or not available or (_native.getenv("PYDTRACE") or "").strip() == "0":
        return
    if _is_tool():
        return  # the tools' own process (PYDTRACE=1 in its environment is for the command it starts)
    import atexit

    # Benchmarks only: PYDTRACE_FORCE=function-entry,line arms those probes
    # without a consumer, to measure the shim's own cost.
    forced = [name for name in (_native.getenv("PYDTRACE_FORCE") or "").replace(" ", "").split(",") if name]
    # PYDTRACE_SCOPE=app,*/jobs/*.py: only that code fires the function and line probes
    # (a malformed scope is ignored with a RuntimeWarning: the program never sees an error).
    base_scope = _native.getenv("PYDTRACE_SCOPE")
    try:
        _native.arm(forced, base_scope)
    except ValueError as error:
        import warnings  # only here: importing it costs more than the rest of `import dtrace`

        warnings.warn(f"pydtrace: PYDTRACE_FORCE ignored: {error}", RuntimeWarning, stacklevel=3)
        _native.arm([], base_scope)
    except RuntimeError as error:
        import warnings

        warnings.warn(f"pydtrace: probes not armed: {error}", RuntimeWarning, stacklevel=3)
        return
    # The watcher thread must be gone while the process forks (3.12+ warns
    # about forking with threads), and gone before the interpreter finalizes.
    _os.register_at_fork(
        before=_native.before_fork,
        after_in_parent=_native.after_fork_parent,
        after_in_child=_native.after_fork_child,
    )
    atexit.register(_native.at_exit)
    if _native.getenv(_FOLLOW_VARIABLE):
        _watch_forks()
    if _native.getenv(_STARTUP_VARIABLE):
        from dtrace._startup import wait_for_tool

        wait_for_tool()
    elif _native.getenv(_FOLLOW_VARIABLE):
        from dtrace._startup import follow_tool

        follow_tool()
    elif consumer := _native.consumer_probes():
        # A consumer attached before this process loaded the probe object (bpftrace by the
        # object's path, without -p: system-wide; the kernel raises the semaphores of every
        # process that maps the object, also of one that maps it later): the import returns
        # once those probes are live (one poll of the watcher, about 20 ms; at most 2 s), so
        # the program is traced from the line after it. Nothing is waited for otherwise.
        # (A probe the interpreter fires itself now reaches the consumer that way.)
        wanted = (consumer & _native.ARMABLE_PROBES) - _native.interpreter_firing()
        if wanted:
            _native.wait_for_consumer(sorted(wanted), 2.0)


#: Set by ``python -m dtrace TOOL -c COMMAND`` for the command it starts: the
#: file descriptors of a pipe to the tool and a pipe from it, ``"WFD,RFD"``.
_STARTUP_VARIABLE = "PYDTRACE_STARTUP"
#: Set by a tool for the command it starts: the path of the tool's socket where every Python
#: process of the command's tree reports (dtrace/tools/command/children.py).
_FOLLOW_VARIABLE = "PYDTRACE_FOLLOW"
#: What the environment held before a tool's ``-p PID --children`` lease put its socket there:
#: {variable: value, or None where it was not set}; None while no such lease is held. (Not
#: annotated: a module-level annotation is evaluated at import, a cost every process pays.)
_follow_saved = None
#: Whether the fork hook that reports forked children is registered (once per process).
_forks_watched = False


# (Comments, not docstrings, on these three: every `import dtrace` unmarshals a docstring.)
# A tool's ``-p PID --children`` lease came (``path``: its socket) or went (None): from then on
# the processes this one starts report to it, as a ``-c`` command's do, through
# ``PYDTRACE_FOLLOW`` and ``PYDTRACE=1`` in ``os.environ`` and the C environment (which
# ``os.environ`` keeps in step); when it goes, both are as they were. Called by the watcher's
# hand-off with the GIL (src/follow.rs): no import, no I/O.
def _follow_children(path):  # path: str | None (annotations are evaluated at import)
    global _follow_saved
    environ = _os.environ
    if path is not None:
        if _follow_saved is None:
            _follow_saved = {name: environ.get(name) for name in ("PYDTRACE", _FOLLOW_VARIABLE)}
        environ["PYDTRACE"] = "1"
        environ[_FOLLOW_VARIABLE] = path
        _watch_forks()
    elif _follow_saved is not None:
        for name, value in _follow_saved.items():
            if value is None:
                environ.pop(name, None)
            else:
                environ[name] = value
        _follow_saved = None


# Registers (once) the fork hook that makes a forked child report to the tool that follows this
# process's children, while one does.
def _watch_forks() -> None:
    global _forks_watched
    if not _forks_watched:
        _forks_watched = True
        # After the native hook registered at arming, which restarts the child's watcher.
        _os.register_at_fork(after_in_child=_report_forked)


# In a forked child: report to the tool that ``PYDTRACE_FOLLOW`` names, if any, before any of the
# child's own code runs. What the child inherited stays in its environment (its own children
# report too); a lease on the parent is not the child's to undo.
def _report_forked() -> None:
    global _follow_saved
    _follow_saved = None
    if _native.getenv(_FOLLOW_VARIABLE):
        from dtrace._startup import follow_tool

        follow_tool()



def __getattr__(name: str) -> object:
    """``Scope``, imported from ``dtrace._scope`` on first use (PEP 562): creating a class is
    among the dearest parts of ``import dtrace`` (BENCHMARKS.md), and few programs need it."""
    if name == "Scope":
        from dtrace._scope import Scope

        globals()["Scope"] = Scope
        return Scope
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "Scope"})


_arm_from_environment()
