"""The native part of :mod:`dtrace`: probe definitions, the enablement watcher and the callbacks.

Use the :mod:`dtrace` package; this module is its implementation and may change.
"""

from collections.abc import Callable
from types import ModuleType

__version__: str
#: All probes, as DTrace spells them (``"function-entry"``), in the provider file's order.
PROBE_NAMES: list[str]
#: Each probe's arguments as CPython's provider declares them (``"char *filename, ..."``), in the same order.
PROBE_ARGUMENTS: list[str]
#: The probes this build can hook into the interpreter.
ARMABLE_PROBES: frozenset[str]
#: The probes this build never arms in this interpreter version (DTrace spelling), each with the reason.
UNSUPPORTED_PROBES: dict[str, str]

def backend_available() -> bool:
    """Whether this build has a probe mechanism (Linux SDT notes, or DTrace)."""

def enabled_probes() -> frozenset[str]:
    """The probes a consumer enables and that are hooked in now."""

def interpreter_probes() -> frozenset[str]:
    """The probes this interpreter declares itself (built ``--with-dtrace``: gc, import and audit,
    and function entry and return from 3.15), read from its SDT notes. Such a probe is left to the
    interpreter while a consumer enables the interpreter's copy (docs/interpreter-probes.md)."""

def interpreter_firing() -> frozenset[str]:
    """The declared probes the interpreter fires now: a consumer raised its own semaphore."""

def interpreter_objects() -> tuple[list[tuple[str, str]], str | None]:
    """Each probe the interpreter declares with the object that declares it, as ``(name, path)``
    pairs; and why its notes could not be read, or None."""

def consumer_probes() -> frozenset[str]:
    """The probes a consumer enables now (their semaphores are raised), hooked in yet or not."""

def wait_for_consumer(names: list[str], timeout: float | None = None) -> bool:
    """Block until the named probes (any, if ``names`` is empty) are live.

    False when ``timeout`` seconds pass first or the probes are not armed;
    ValueError for an unknown name or a negative timeout.
    """

def arm(force: list[str] = ..., scope: str | None = None) -> None:
    """Start the watcher thread; ``force`` names probes to arm without a consumer (benchmarks only);
    ``scope`` is the base scope (``PYDTRACE_SCOPE``): when malformed, it is ignored with one
    RuntimeWarning."""

def scope() -> tuple[list[str], list[str], list[int]] | None:
    """The scope in force: (module names, file globs, PIDs of the tools whose leases make it), or
    None while every code object fires the function and line probes."""

def parse_scope(text: str) -> tuple[list[str], list[str]]:
    """Parse a scope as ``PYDTRACE_SCOPE`` and the tools' channel do: (module names, file globs).
    Entries are separated by commas or newlines: ``module:NAME``, ``file:GLOB``, or unprefixed (a
    file glob when it holds ``/ * ? [ \\ <``, else a module name). ValueError if malformed."""

def is_armed() -> bool:
    """Whether the watcher thread runs in this process."""

def set_origin(origin: str) -> None:
    """Record how the module came into this process: ``"gdb"`` or ``"remote_exec"`` when
    ``python -m dtrace --inject`` loaded it, ``""`` when the program imported it. The watcher
    thread's name says it (``pydtrace-watchG``, ``pydtrace-watchR``; ``pydtrace-watche`` for an
    import), for tools that look from outside (``python -m dtrace list -p PID``)."""

def before_fork() -> None:
    """``os.register_at_fork(before=...)``: stop and join the watcher thread."""

def after_fork_parent() -> None:
    """``os.register_at_fork(after_in_parent=...)``: start it again (on 3.13, once ``os.fork()``
    has returned to its caller, where CPython counts the threads after the hooks)."""

def after_fork_child() -> None:
    """``os.register_at_fork(after_in_child=...)``: start it again."""

def at_exit() -> None:
    """``atexit``: stop the watcher thread for good before the interpreter finalizes."""

def getenv(name: str) -> str | None:
    """The environment variable ``name`` as ``os.environ.get(name)`` gives it, read from the C environment."""


class _Testing(ModuleType):
    """``dtrace._native._testing``: the hooks of tests, benchmarks and diagnostics (counters and
    switches of the native module), not part of the API.

    Built on first use: reach it as ``from dtrace._native import _testing`` or as
    ``dtrace._native._testing`` after ``import dtrace``. It is not in ``sys.modules``, so
    ``import dtrace._native._testing`` does not work (``_native`` is not a package).
    """

    @staticmethod
    def scope_covers(text: str, modules: list[str], filename: str) -> bool:
        """Whether scope ``text`` covers code run under the module names ``modules`` (``__name__``, and
        ``__spec__.name`` for ``__main__``) from file ``filename`` (tests of the scope rule)."""

    @staticmethod
    def scope_stats() -> tuple[int, int]:
        """(scope verdicts decided, ``sys.monitoring.DISABLE``s returned) in this process: code out of
        scope calls back once per code location, then not again until the scope changes."""

    @staticmethod
    def scope_channel_layout() -> list[tuple[str, int]]:
        """Offsets and sizes of the scope channel (the ``pydtrace_scope_channel`` symbol), for the tests
        that check the tools' side (``dtrace.tools.proc.scope``) against it."""

    @staticmethod
    def noop_callback() -> object:
        """A new native callable with the probe callbacks' calling convention that does nothing:
        the dispatch floor that benchmarks compare the probes with."""

    @staticmethod
    def watcher_stats() -> tuple[int, int, int]:
        """(times the watcher thread read the semaphores, times it took the GIL itself, times the main
        thread applied a change for it in a pending call) in this process."""

    @staticmethod
    def report_internal_error(name: str, what: str) -> None:
        """Report an internal error of probe ``name`` as the callbacks do (for tests): the probe is
        switched off, with one RuntimeWarning, until no consumer enables it and one does again."""

    @staticmethod
    def name_cache_entries() -> int:
        """How many code objects carry a name-cache entry now (entries go with their code objects)."""

    @staticmethod
    def cfunction_cache_stats() -> tuple[int, int]:
        """(entries in the C function probes' name cache now, names worked out for it so far)."""

    @staticmethod
    def hooked_classes() -> int:
        """How many classes carry the instance-delete hook now (0 while no delete probe is live)."""

    @staticmethod
    def monitoring_tool_id() -> int | None:
        """The ``sys.monitoring`` tool id the probes hold, if they have claimed one."""

    @staticmethod
    def aggregate_flush(requester: int = 0) -> None:
        """Report what the aggregate probes gathered, now, as a flush that process ``requester``
        asked for (0: none); tools ask through ``pydtrace_flush_requests``."""

    @staticmethod
    def aggregate_stats() -> tuple[int, int, int]:
        """(what is gathered: bits 1 calls, 2 times, 4 lines, 8 the call tree; code objects with
        unreported counts; call-tree nodes)."""

#: The hooks of tests, benchmarks and diagnostics (see :class:`_Testing`), built on first use.
_testing: _Testing
