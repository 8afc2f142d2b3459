"""Everything read from (or written into) another process, from outside, without stopping it (Linux).

- ``procfs``: the one reader of ``/proc/PID/*``: maps, stat, status, command line, executable,
  environment, threads; whether a process runs and which probe object it mapped.
- ``elf``: the one ELF reader: an object's SDT probes and semaphores, dynamic symbols,
  initialized data, and where a process loaded it (the load bias).
- ``pyprocess``: which interpreter a process runs, and how pydtrace-rs got into it.
- ``pystack``: the Python stack read from the interpreter's frames (and the bpftrace walk that
  reads it in the kernel).
- ``scope``: the scope channel: the lease a tool writes into ``/proc/PID/mem``.

May import: ``dtrace.tools.errors`` and each other (procfs nothing else of the package);
never ``command``, ``inject``, ``render`` or the tools.
"""
