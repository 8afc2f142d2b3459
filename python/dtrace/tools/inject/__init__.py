"""Loading pydtrace-rs into a running Python process that has not loaded it (``-p PID --inject``).

- ``loader``: the offer (asked on a terminal, or ``--inject``), the choice of a way in, and the
  ``sys.remote_exec`` way (3.14 and later).
- ``gdb``: the gdb way (3.12, 3.13); ``gdb_inject``: its gdb side, a script run inside gdb with
  gdb's own Python (not imported).
- ``ptrace``: whether the tool may attach to the process (Yama, capabilities), and why not.
- ``payload``: what runs in the target, ``program.py`` read as text with the run's values, and the
  report it leaves, read back; ``program``: that program, a module of its own (imported only by
  the tests: as it stands in the file, it runs nothing).

May import: ``dtrace.tools.errors``, ``proc`` and each other (loader the others, gdb payload and
ptrace); never ``command``, ``render`` or the tools. ``program`` imports nothing at all.
"""
