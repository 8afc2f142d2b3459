"""``list``: the probes of a process, which are enabled right now, and the probe object's path."""

from __future__ import annotations

import sys

from dtrace import _native
from dtrace.tools.command import interpreter, runner, tracers
from dtrace.tools.command.base import Command
from dtrace.tools.errors import ToolError
from dtrace.tools.proc import elf, procfs, pyprocess, scope
from dtrace.tools.render import report

#: The arguments of each probe, from the provider's contract (provider/pydtrace.d, compiled in).
ARGUMENTS = dict(zip((name.replace("-", "__") for name in _native.PROBE_NAMES), _native.PROBE_ARGUMENTS))


def unsupported(library: str | None) -> dict[str, str]:
    """The probes the build of pydtrace-rs at ``library`` never fires, with why; known only for this
    Python's own build (another process may run another Python version)."""
    import dtrace

    if dtrace._native is None or library != dtrace.library_path():
        return {}
    return dict(getattr(dtrace._native, "UNSUPPORTED_PROBES", {}))


class List(Command):
    name = "list"
    summary = "the probes of a process, which are enabled now, and the probe object's path"
    description = (
        "List the probes of provider python in a process (-p), in a command started for it (-c), or, "
        "with neither, in the probe object this Python would load: their arguments, whether a consumer "
        "enables them right now (its semaphore is raised), which object fires them (pydtrace-rs, or an "
        "interpreter built --with-dtrace that fires some itself), and the probe object's path, which "
        "scripts of your own can name: usdt:PATH:python:function__entry. Needs no tracer; reading "
        "whether probes are enabled needs the rights to read the process's memory (root or its owner)."
    )
    examples = """\
examples:
  python -m dtrace list                          the installed probe object and its probes
  python -m dtrace list -p 4711                  the probes of a process, enabled or not
  python -m dtrace list -c "python3 app.py"      start a command, list, and let it run untraced
"""
    intervals = False
    needs_target = False

    def run(self, args, out=sys.stdout) -> int:
        if args.script:
            out.write("# list runs no tracer program; it reads the probe object's SDT notes.\n"
                      "# The same with bpftrace (PATH: the probe object):\n"
                      "bpftrace -l 'usdt:PATH:python:*'\n")
            return 0
        if not sys.platform.startswith("linux"):
            return self.run_dtrace(args, out)
        if args.argv:
            target = runner.start(args.argv, args.startup_timeout)
            try:
                self.show(target.pid, target.library, out)
            except BaseException:
                target.stop()
                raise
            target.abandon()  # the command runs on untraced
            out.flush()
            return self.command_status(target.process.wait())
        if args.pid is not None:
            procfs.check_running(args.pid)
            if procfs.probe_object(args.pid) is None:  # a Python process without the probes
                out.write(f"{runner.Target(args.pid, None).describe()}\n")
                out.write("".join(f"{line}\n" for line in pyprocess.summary(args.pid, None)))
                return 0
            target = runner.attach(args.pid)
            self.show(target.pid, target.library, out)
            return 0
        import dtrace

        if dtrace.library_path() is None:
            raise ToolError(f"the probe object cannot be loaded here: {dtrace.unavailable_reason}")
        self.show(None, dtrace.library_path(), out)
        return 0

    def show(self, pid: int | None, library: str | None, out) -> None:
        if library is None:
            raise ToolError(f"process {pid} reported no probe object")
        ours = elf.read(library)
        if ours is None:
            raise ToolError(f"{library} has no SDT probes")
        declared = interpreter.declared(pid, library) if pid is not None else {}
        enabled = elf.semaphores(pid, ours) if pid is not None else None
        # The interpreter's own semaphores, for the probes it declares too.
        theirs: dict[str, int] | None = {}
        for path in sorted(set(declared.values())):
            obj = elf.read(path)
            values = elf.semaphores(pid, obj) if obj is not None else None
            if values is None:
                theirs = None
                break
            theirs.update(values)
        asked = scope.asked_probes(pid, library) if declared else {}
        if pid is not None:
            out.write(f"{runner.Target(pid, library).describe()}\n")
            out.write("".join(f"{line}\n" for line in pyprocess.summary(pid, library)))
            armed = pyprocess.watcher_running(pid)
            out.write("probes armed: " + {True: "yes (its watcher thread runs)",
                                          False: "no (PYDTRACE=0?): nothing fires",
                                          None: "unknown"}[armed] + "\n")
            in_force = scope.describe(pid, library)
            if in_force is not None:
                out.write(f"scope: {in_force}\n")
        out.write(f"probe object: {library}\n\n")
        rows = []
        order = list(ARGUMENTS)
        for probe in sorted(ours.probes, key=lambda p: order.index(p.name) if p.name in order else len(order)):
            if probe.provider != "python":
                continue
            state = _count(enabled, probe.name)
            row = [probe.name, ARGUMENTS.get(probe.name, probe.arguments), state]
            if declared:
                row.append(_count(theirs, probe.name) if probe.name in declared else "")
            row.append(_fired_by(probe.name, declared, enabled, theirs, asked))
            rows.append(row)
        headers = ["PROBE", "ARGUMENTS", "ENABLED"] + (["INTERPRETER'S"] if declared else []) + ["FIRED BY"]
        if pid is None:
            rows = [row[:2] for row in rows]
            headers = headers[:2]
        report.table(out, headers, rows, left=headers)
        if pid is not None and enabled is None:
            out.write("\n(whether probes are enabled needs the rights to read the process's memory: run with sudo)\n")
        elif pid is not None:
            out.write("\nENABLED: whether a consumer enables the probe now (its semaphore in the probe object), "
                      "and how many.\n")
        off = unsupported(library)
        for reason in sorted(set(off.values())):
            names = ", ".join(name.replace("-", "__") for name, why in sorted(off.items()) if why == reason)
            out.write(f"\nnever fired by this build (Python {sys.version_info[0]}.{sys.version_info[1]}): {names}: {reason}\n")
        if declared:
            out.write(
                "INTERPRETER'S: the same for the copy that the interpreter declares itself (built --with-dtrace: "
                f"{', '.join(sorted(set(declared.values())))}).\n"
                "FIRED BY: a probe both declare is fired once: by the interpreter while a consumer enables its "
                "copy, otherwise by pydtrace-rs (while a consumer enables ours, or a tool asked for it: the tools "
                "attach to it by address there, since bpftrace 0.17's -p cannot tell the two apart).\n")
            out.write(f"\nusdt:{library}:python:PROBE names a probe in bpftrace (system-wide: add a pid "
                      "predicate); with -p PID, `python -m dtrace run` attaches a program the tools' way.\n")
        else:
            out.write(f"\nusdt:{library}:python:PROBE names a probe in bpftrace; with -p PID, usdt::python:PROBE.\n")

    def run_dtrace(self, args, out) -> int:
        """macOS and illumos (UNTESTED): DTrace lists the probes of a process itself."""
        tracer = tracers.DTrace()
        if args.pid is None and not args.argv:
            raise ToolError("on this platform, list needs -p PID or -c COMMAND")
        target = runner.start(args.argv, args.startup_timeout) if args.argv else runner.attach(args.pid)
        import subprocess

        try:
            listing = subprocess.run([tracer.executable(), "-l", "-p", str(target.pid), "-n", "python$target:::"],
                                     capture_output=True, text=True)
        finally:
            target.abandon()
        out.write(listing.stdout)
        if listing.returncode:
            raise ToolError(f"dtrace -l failed: {listing.stderr.strip()}")
        out.write("(DTrace cannot show here which probes a consumer enables)\n")
        return 0


def _count(semaphores: dict[str, int] | None, name: str) -> str:
    """A semaphore's reading for the table: "yes (N)", "no", or "-" where it cannot be read."""
    if semaphores is None:
        return "-"
    count = semaphores.get(name, 0)
    return f"yes ({count})" if count else "no"


def _fired_by(name: str, declared: dict[str, str], ours: dict[str, int] | None,
              theirs: dict[str, int] | None, asked: dict[str, list[int]] | None) -> str:
    """Who fires probe ``name`` now, by the rule of dtrace/_native's watcher (src/interpreter.rs)."""
    if name not in declared:
        return "pydtrace-rs"
    tools = (asked or {}).get(name)
    if tools:
        return f"pydtrace-rs (asked by tool {', '.join(map(str, tools))})"
    if theirs is None or ours is None:
        return "interpreter or pydtrace-rs"
    if theirs.get(name):
        return "interpreter"
    if ours.get(name):
        return "pydtrace-rs"
    return "nobody now"
