"""Ready-made tracing tools on the probes: ``python -m dtrace TOOL`` (or ``pydtrace TOOL``).

Each tool is a bpftrace program (Linux) or D program (macOS, illumos) under ``dtrace/scripts/``,
and a module here that starts it and prints its report. The package, by layer, each importing
only the layers below it (each subpackage's docstring says which):

- here, the top: ``cli`` (the command line: ``python -m dtrace TOOL``, the only module that knows
  every tool, from ``TOOLS`` below), and the tools, one module each: ``listing`` (list),
  ``calls``, ``flow``, ``lines``, ``gc``, ``objnew``, ``objdel``, ``where``, ``flame``, ``run``
  (the user's own program).
- ``command/``: what every command stands on: ``options``, ``tracers``, ``engine`` (the tracer
  process: start, read, stop, reap), ``runner`` (the target, a tool's session), ``base``
  (``Command`` and ``ScriptTool``), ``programs``, ``interpreter``, ``aggregate``, ``children``.
- ``inject/``: loading pydtrace-rs into a running process (``loader``; ``gdb_inject``, run in gdb).
- ``proc/``: what is read from another process: ``procfs`` (``/proc/PID/*``), ``elf`` (its ELF
  objects), ``pyprocess`` (its interpreter), ``pystack`` (its Python stacks), ``scope`` (the
  scope channel's lease).
- ``render/``: output: ``report`` (tables, histograms), ``flamegraph`` (SVG, speedscope, folded).
- ``errors``: ``ToolError`` and ``UsageError`` (what the command line prints, and its exit
  status) and ``warn``; imports nothing of the package.

``import dtrace`` imports none of this: the tools load only when one runs.
"""

from dtrace.tools.calls import Calls
from dtrace.tools.command.base import ScriptTool
from dtrace.tools.flame import Flame
from dtrace.tools.flow import Flow
from dtrace.tools.gc import GC
from dtrace.tools.lines import Lines
from dtrace.tools.listing import List
from dtrace.tools.objdel import ObjDel
from dtrace.tools.objnew import ObjNew
from dtrace.tools.run import Run
from dtrace.tools.where import Where

#: Every tool, by name, in the order of the help: the prototypes the command line is built from
#: (each run gets a fresh object of the tool's class).
TOOLS = {tool.name: tool for tool in (List(), Calls(), Flow(), Lines(), GC(), ObjNew(), ObjDel(), Where(), Flame(),
                                      Run())}
#: The tools that run a bundled script (all but list and run), by name.
SCRIPT_TOOLS = {name: tool for name, tool in TOOLS.items() if isinstance(tool, ScriptTool)}
