"""Ready-made tracing tools on the probes: ``python -m dtrace TOOL`` (or ``pydtrace TOOL``).

Each tool is a bpftrace program (Linux) or D program (macOS, illumos) under
``dtrace/scripts/``, and a module here that starts it and prints its report:

- ``cli`` and ``options``: the command line, parsed into one typed ``Options``
  (checked at parse time: usage errors exit 2).
- ``runner``: the target (``-p PID``, or ``-c COMMAND`` held at start-up until
  the tracer is attached), and the tracer's process and its output; how the
  tracer is stopped (``Stopper``) and dies with the tool.
- ``tracers``: bpftrace and DTrace: finding them, their command lines, their
  output as events; ``ToolError``, the errors a user can act on.
- ``base``: what tools share: the script and its variants, the run, the end
  of a ``-c`` command and its exit status.
- one module per tool (``run``: the user's own program); ``report``: tables and
  histograms; ``flamegraph``: SVG; ``elfnotes``: the probes of an object and their
  semaphores; ``programs``: reading bpftrace programs; ``interpreter``: the
  probes an interpreter built ``--with-dtrace`` fires itself, added to a program.
"""

from dtrace.tools.base import ScriptTool
from dtrace.tools.calls import Calls
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
