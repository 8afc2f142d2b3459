"""What every command stands on: its options, the tracers, the tracer engine, the target, the bases.

- ``options``: the command line parsed into one typed ``Options`` (usage errors exit 2).
- ``tracers``: bpftrace and DTrace: finding them, their command lines, their output as events.
- ``engine``: the one way to start, read, stop (SIGINT, again if missed, SIGKILL) and reap a
  tracer process, and its constants.
- ``runner``: the target (``-p PID``, or ``-c COMMAND`` held at start-up until the tracer is
  attached), and a tool's ``Session``: the engine's output read as events.
- ``base``: ``Command`` (every ``python -m dtrace NAME``) and ``ScriptTool`` (a tool that runs a
  bundled script: its variants, the run from start to report, the end of a ``-c`` command).
- ``programs``: reading bpftrace programs; ``interpreter``: the probes an interpreter built
  ``--with-dtrace`` fires itself, and the program rewritten to attach to ours by address.
- ``aggregate``: asking a process for flushes while it counts inside itself.
- ``children``: following the Python processes a ``-c`` command starts, or a ``-p`` process
  starts from now on (``--children``).

May import: ``dtrace.tools.errors``, ``proc``, ``inject`` and ``render``; never the tools above it
(``dtrace.tools``' own modules) nor ``cli``.
"""
