"""Whether the tool may attach a debugger (ptrace) to a process: Yama's setting, the capability, the
owner; and how to say why not. gdb attaches with ptrace, and ``sys.remote_exec`` follows ptrace's
rules too.
"""

from __future__ import annotations

import os

from dtrace.tools.errors import ToolError
from dtrace.tools.proc import procfs, pyprocess

YAMA = "/proc/sys/kernel/yama/ptrace_scope"


YAMA_SCOPES = {
    0: "0 (classic): a process of the same user, or any process with CAP_SYS_PTRACE (root)",
    1: "1 (restricted): only a descendant of the debugger (or a process that allowed it with "
       "prctl(PR_SET_PTRACER)), or any process with CAP_SYS_PTRACE (root)",
    2: "2 (admin-only): only with CAP_SYS_PTRACE (root)",
    3: "3 (no attach): no process may be attached at all, not even by root, until the next boot",
}


def yama_scope() -> int | None:
    try:
        with open(YAMA) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def ptrace_explanation(pid: int) -> str:
    """Why attaching to ``pid`` may be refused, and what each Yama setting allows."""
    scope = yama_scope()
    lines = ["Injecting needs the rights to attach a debugger (ptrace) to the process, on top of "
             "tracing's: root (CAP_SYS_PTRACE), or its owner where Yama allows it."]
    if scope is None:
        lines.append(f"This kernel has no Yama ({YAMA} is missing): the classic rule holds, same user or root.")
    else:
        lines.append(f"Here Yama's {YAMA} is {YAMA_SCOPES.get(scope, str(scope))}.")
    lines.append("Yama's ptrace_scope values: " + "; ".join(YAMA_SCOPES.values()) + ".")
    lines.append("In a container, root also needs CAP_SYS_PTRACE (docker run --cap-add SYS_PTRACE) "
                 "and a seccomp profile that allows ptrace.")
    return "\n".join(lines)


def check_privileges(process: pyprocess.PythonProcess) -> None:
    """Refuse early where ptrace cannot work; gdb's own refusal is explained the same way."""
    scope = yama_scope()
    if scope == 3:
        raise ToolError(f"cannot inject into process {process.pid}: ptrace is disabled.\n{ptrace_explanation(process.pid)}")
    if os.geteuid() != 0 and not _has_ptrace_capability():
        try:
            owner = os.stat(f"/proc/{process.pid}").st_uid
        except OSError:
            owner = None
        if owner != os.geteuid() or scope in (1, 2):
            raise ToolError(f"cannot inject into process {process.pid}: Permission denied.\n"
                            f"{ptrace_explanation(process.pid)}")


def _has_ptrace_capability() -> bool:
    return procfs.has_capabilities(19)  # CAP_SYS_PTRACE
