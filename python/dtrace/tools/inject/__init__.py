"""Loading pydtrace-rs into a running Python process that has not loaded it (``-p PID --inject``).

- ``loader``: the offer, the checks (privileges, Yama), and the two ways in: ``sys.remote_exec``
  (3.14 and later) and gdb (3.12, 3.13), with the report the injected code leaves.
- ``gdb_inject``: the gdb side, a script run inside gdb with gdb's own Python: not imported.

May import: ``dtrace.tools.errors`` and ``proc``; never ``command``, ``render`` or the tools.
"""
