"""The native part of :mod:`dtrace`: probe definitions, the enablement watcher and the callbacks.

Use the :mod:`dtrace` package; this module is its implementation and may change.
"""

__version__: str
#: All probes, as DTrace spells them (``"function-entry"``), in the provider file's order.
PROBE_NAMES: list[str]
#: The probes this build can hook into the interpreter.
ARMABLE_PROBES: frozenset[str]

def backend_available() -> bool:
    """Whether this build has a probe mechanism (Linux SDT notes, or DTrace)."""

def enabled_probes() -> frozenset[str]:
    """The probes a consumer enables and that are hooked in now."""

def interpreter_probes() -> frozenset[str]:
    """The probes this interpreter fires itself (built ``--with-dtrace``: gc, import and audit, and
    function entry and return from 3.15), which this module leaves to it."""

def consumer_probes() -> frozenset[str]:
    """The probes a consumer enables now (their semaphores are raised), hooked in yet or not."""

def wait_for_consumer(names: list[str], timeout: float | None = None) -> bool:
    """Block until the named probes (any, if ``names`` is empty) are live.

    False when ``timeout`` seconds pass first or the probes are not armed;
    ValueError for an unknown name or a negative timeout.
    """

def arm(force: list[str] = ...) -> None:
    """Start the watcher thread; ``force`` names probes to arm without a consumer (benchmarks only)."""

def is_armed() -> bool:
    """Whether the watcher thread runs in this process."""

def noop_callback() -> object:
    """A new native callable with the probe callbacks' calling convention that does nothing:
    the dispatch floor that benchmarks compare the probes with."""

def watcher_stats() -> tuple[int, int, int]:
    """(times the watcher thread read the semaphores, times it took the GIL itself, times the main
    thread applied a change for it in a pending call) in this process."""

def report_internal_error(name: str, what: str) -> None:
    """Report an internal error of probe ``name`` as the callbacks do (for tests): the probe is
    switched off, with one RuntimeWarning, until no consumer enables it and one does again."""

def name_cache_entries() -> int:
    """How many code objects carry a name-cache entry now (entries go with their code objects)."""

def hooked_classes() -> int:
    """How many classes carry the instance-delete hook now (0 while no delete probe is live)."""

def monitoring_tool_id() -> int | None:
    """The ``sys.monitoring`` tool id the probes hold, if they have claimed one."""

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
