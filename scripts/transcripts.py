#!/usr/bin/env python3
"""Regenerate the tools' transcripts in docs/tools/*.md from the tools themselves, so they cannot go stale.

Usage (as root, with bpftrace)::

    scripts/transcripts.py VENV [FILE.md ...]     default: every page of docs/tools

A transcript is a fenced block whose lines starting with ``# `` are commands typed at a root
prompt; the lines up to the next command are its output. Each command that runs the tools
(``.venv/bin/python -m dtrace ...``, a pipe after it allowed) is run again and its output
replaced; ``# echo $?`` gets the status of the command before it; any other command (``# cat
calls.bt``) and its output are kept as written.

The commands run in a scratch directory that holds ``.venv`` (a link to VENV) and ``examples``
(a link to the checkout's), so paths print as the pages show them. ``-p 1473`` is the process the
pages describe (docs/tools/README.md): ``PYDTRACE=1 .venv/bin/python examples/fetch.py 100000``,
started for the run; ``-p 23857`` the same program started without ``PYDTRACE`` (the pages of the
tools that read any process's frames: where, flame --sample, run with @PYSTACK@). Their real PIDs
are written back as 1473 and 23857, and a tool attached to either without ``-d`` is sent SIGTERM
after three seconds, as the pages say. Paths of the standard library are
shortened to ``.../lib/pythonX.Y/``, the venv's to ``.venv``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
DOCUMENTED_PID = "1473"
#: The same program started without PYDTRACE: no probes, frames read from outside.
UNPREPARED_PID = "23857"
TARGET = ".venv/bin/python examples/fetch.py 100000"
TOOL = re.compile(r"^\.venv/bin/python -m dtrace\b")
#: Seconds a tool attached by -p without -d runs before SIGTERM (docs/tools/README.md says three).
ATTACHED_FOR = 3.0


def base_prefix(python: str) -> str:
    """Where the venv's Python is installed (its standard library and libpython are below)."""
    return subprocess.run([python, "-c", "import sys; print(sys.base_prefix)"],
                          capture_output=True, text=True, check=True).stdout.strip()


def run(command: str, work: Path, pids: dict[str, str], short: list[tuple[str, str]]) -> tuple[str, int]:
    """The output (stdout and stderr as a terminal shows them) and status of one command; ``pids``
    maps each documented PID to the real one."""
    real = command
    for documented, pid in pids.items():
        real = re.sub(rf"\b{documented}\b", pid, real)
    process = subprocess.Popen(["bash", "-c", real], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        if any(f"-p {documented}" in command for documented in pids) and " -d " not in command:
            try:
                out, _ = process.communicate(timeout=ATTACHED_FOR)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGTERM)
                out, _ = process.communicate(timeout=120)
        else:
            out, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for documented, pid in pids.items():
        out = re.sub(rf"\b{pid}\b", documented, out)
    for long, brief in short:
        out = out.replace(long + "/", brief + "/")
    return out, process.returncode


def _shape(line: str) -> str:
    """A line without its numbers and indentation: what stays the same from run to run."""
    return re.sub(r"\s+", " ", re.sub(r"\d+", "", line)).strip()


def elide(output: str, written: list[str]) -> str:
    """``output`` cut as the page cut the transcript it replaces: where ``...`` lines leave lines
    out, as many lines first and last as the page shows, and each excerpt between found again by
    its first line's shape (numbers aside); an excerpt that is not found is left out."""
    if not any(line.rstrip("\n") == "..." for line in written):
        return output
    parts: list[list[str]] = [[]]
    for line in written:
        if line.rstrip("\n") == "...":
            parts.append([])
        else:
            parts[-1].append(line)
    new = output.splitlines(keepends=True)
    head, tail, middles = parts[0], parts[-1], parts[1:-1]
    kept = new[:len(head)]
    position = len(head)
    end = len(new) - len(tail)
    for excerpt in middles:
        if not excerpt:
            continue
        found = next((j for j in range(position, end) if _shape(new[j]) == _shape(excerpt[0])), None)
        if found is None:
            continue
        kept += ["...\n"] + new[found:found + len(excerpt)]
        position = found + len(excerpt)
    return "".join(kept + ["...\n"] + new[max(end, position):])


def regenerate(page: Path, work: Path, pids: dict[str, str], short: list[tuple[str, str]]) -> bool:
    """Rewrite the transcripts of one page; returns whether it changed."""
    text = page.read_text()
    out, inside, status = [], False, 0
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            inside = not inside
            out.append(line)
            i += 1
            continue
        command = line[2:].rstrip("\n") if inside and line.startswith("# ") else None
        if command is None:
            out.append(line)
            i += 1
            continue
        # This command's output: the lines up to the next command or the block's end.
        end = i + 1
        while end < len(lines) and not lines[end].startswith("# ") and not lines[end].startswith("```"):
            end += 1
        out.append(line)
        if command == "echo $?":
            out.append(f"{status}\n")
        elif TOOL.match(command):
            print(f"{page.name}: {command}", file=sys.stderr)
            output, status = run(command, work, pids, short)
            output = output if output.endswith("\n") or not output else output + "\n"
            out.append(elide(output, lines[i + 1:end]))
        else:
            out.extend(lines[i + 1:end])
        i = end
    new = "".join(out)
    if new != text:
        page.write_text(new)
    return new != text


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    venv = Path(argv[0]).resolve()
    pages = [Path(p).resolve() for p in argv[1:]] or sorted((CHECKOUT / "docs" / "tools").glob("*.md"))
    python = str(venv / "bin" / "python")
    work = Path(tempfile.mkdtemp(prefix="pydtrace-transcripts-"))
    # Machine paths as the pages show them: the scratch directory's and the venv's as .venv,
    # the installed Python's as ... (.../lib/python3.12/).
    short = [(str(work / ".venv"), ".venv"), (str(venv), ".venv"), (str(work), "."),
             (base_prefix(python), "...")]
    (work / ".venv").symlink_to(venv)
    (work / "examples").symlink_to(CHECKOUT / "examples")
    env = {**os.environ, "PYDTRACE": "1"}
    target = subprocess.Popen(TARGET.split(), cwd=work, env=env, stdout=subprocess.DEVNULL)
    unprepared_env = {name: value for name, value in os.environ.items() if not name.startswith("PYDTRACE")}
    unprepared = subprocess.Popen(TARGET.split(), cwd=work, env=unprepared_env, stdout=subprocess.DEVNULL)
    try:
        # The tools check that the process has loaded the probe object: wait for its import of dtrace.
        deadline = time.monotonic() + 30
        while "dtrace/_native" not in Path(f"/proc/{target.pid}/maps").read_text():
            if time.monotonic() > deadline or target.poll() is not None:
                raise SystemExit(f"{TARGET} did not load dtrace")
            time.sleep(0.05)
        pids = {DOCUMENTED_PID: str(target.pid), UNPREPARED_PID: str(unprepared.pid)}
        for page in pages:
            changed = regenerate(page, work, pids, short)
            print(f"{page.relative_to(CHECKOUT)}: {'rewritten' if changed else 'unchanged'}", file=sys.stderr)
    finally:
        for process in (target, unprepared):
            process.terminate()
            process.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
