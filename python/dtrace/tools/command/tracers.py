"""The tracers: bpftrace (Linux) and DTrace (macOS, illumos). How to find one, run a program with
it, and read its output as the same events for both."""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator

from dtrace.tools.errors import ToolError
from dtrace.tools.proc import procfs


def decode_json_line(line: str) -> Any:
    """One line of ``bpftrace -f json`` output, decoded (json.JSONDecodeError if it is no JSON).

    bpftrace 0.17 writes each byte >= 0x80 of a string as ``\\uffffffXX`` (a sign-extended
    char): those bytes are put back and the strings decoded as UTF-8, what cannot be
    decoded (a name cut in the middle of a character) replaced by U+FFFD. Later releases
    (0.27) erase every space from a map's keys (``"<frozenimportlib._bootstrap>"``): the one
    space CPython writes into file names itself, that of a frozen module's ``<frozen NAME>``,
    is put back (:func:`_fix_keys`). The tests read bpftrace's output with this function too.
    """
    if "\\uffffff" not in line:
        event = json.loads(line)
    else:
        event = _fix_bytes(json.loads(_HIGH_BYTE.sub(r"\\u00\1", line)))
    if isinstance(event, dict) and event.get("type") in ("map", "hist", "stats") and isinstance(event.get("data"), dict):
        event["data"] = {name: _fix_keys(value) for name, value in event["data"].items()}
    return event


@dataclass
class Event:
    """One thing the tracer printed, the same for both tracers.

    kind: ``printf`` (text), ``map`` (name, data: {key tuple: value}), ``time``
    (text: the end of an interval), ``lost`` (count), ``map_full`` (count),
    ``helper_error`` (text).
    """

    kind: str
    name: str = ""
    data: Any = None


class Tracer:
    """A tracer program: how to find it, run a script with it, and read its output.

    The program run is the one named by ``--tracer-path``, else by ``PYDTRACE_BPFTRACE`` /
    ``PYDTRACE_DTRACE`` (a bpftrace newer than the distribution's, say), else the first on PATH.
    """

    name = ""
    dialect = ""  # script file suffix: "bt" or "d"
    install_hint = ""

    def __init__(self, path: str | None = None) -> None:
        variable = f"PYDTRACE_{self.name.upper()}"
        #: The executable asked for, and who asked (--tracer-path or the environment variable);
        #: None: the first on PATH.
        self.path, self.source = (path, "--tracer-path") if path else (os.environ.get(variable) or None, variable)

    def executable(self) -> str:
        if self.path is not None:
            found = shutil.which(self.path)
            if found is None:
                raise ToolError(f"{self.source} names {self.path!r}, which is not an executable file")
            return found
        path = shutil.which(self.name)
        if path is None:
            raise ToolError(f"{self.name} is not installed. {self.install_hint}")
        return path

    def check_privileges(self) -> None:
        if os.geteuid() != 0:
            command = shlex.join([sys.executable, "-m", "dtrace", *sys.argv[1:]])
            raise ToolError(
                f"Permission denied: {self.name} needs root to attach probes. Run:\n    sudo {command}"
            )

    def argv(self, program: str, pid: int, arguments: list[str]) -> list[str]:
        raise NotImplementedError

    def environment(self, strlen: int, max_keys: int, streaming: bool) -> dict[str, str]:
        return dict(os.environ)

    def events(self, line: str, keys: dict[str, int], hists: frozenset[str]) -> Iterator[Event]:
        """The events in one line of the tracer's output; ``keys`` gives each map's key arity."""
        raise NotImplementedError

    def list_probes(self, probe: str, pid: int | None) -> list[str] | None:
        """The probes that ``probe`` names (in process ``pid``'s libraries, if given); None
        when the tracer cannot tell."""
        return None

    def leaving(self, line: str, signalled: bool) -> bool:
        """Whether this output line shows that the tracer has left its event loop (after a
        stop signal, if ``signalled``): a second SIGINT then would cut its last output short."""
        return signalled


CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39

#: bpftrace 0.17's JSON writes a byte >= 0x80 as \uffffffXX (a sign-extended char).
_HIGH_BYTE = re.compile(r"\\uffffff([0-9a-f]{2})")
_E2BIG = -7  # a map update failed: the map is full


class Bpftrace(Tracer):
    name = "bpftrace"
    dialect = "bt"
    install_hint = (
        "Install it: sudo apt-get install bpftrace (Debian, Ubuntu), sudo dnf install bpftrace "
        "(Fedora), sudo pacman -S bpftrace (Arch); see https://github.com/bpftrace/bpftrace"
    )

    def check_privileges(self) -> None:
        if os.geteuid() == 0 or procfs.has_capabilities(CAP_SYS_ADMIN) or procfs.has_capabilities(CAP_BPF, CAP_PERFMON):
            return
        super().check_privileges()

    def argv(self, program: str, pid: int, arguments: list[str]) -> list[str]:
        # -k reports failed map updates (a full map) as helper_error events.
        return [self.executable(), "-f", "json", "-k", "-p", str(pid), "-e", program, *arguments]

    def environment(self, strlen: int, max_keys: int, streaming: bool) -> dict[str, str]:
        env = dict(os.environ)
        # Each under 0.17's name and under the name later releases read (0.27 ignores the old ones).
        env["BPFTRACE_STRLEN"] = env["BPFTRACE_MAX_STRLEN"] = str(strlen)
        env["BPFTRACE_MAP_KEYS_MAX"] = env["BPFTRACE_MAX_MAP_KEYS"] = str(max_keys)
        if streaming:
            # Room between bursts and the reader: 0.17 has a perf buffer per CPU (4 MiB each);
            # from 0.19 on, the output goes through one ring buffer for all CPUs, of this many
            # pages in all (16 MiB: 4 MiB lost events of examples/workload.py's flow under 0.27).
            pages = "4096" if self.version() >= (0, 19) else "1024"
            env.setdefault("BPFTRACE_PERF_RB_PAGES", pages)
        return env

    def version(self) -> tuple[int, int]:
        """The bpftrace's release (``bpftrace --version``: "bpftrace v0.27.1"), as (0, 27);
        (0, 0) when it does not say."""
        if not hasattr(self, "_version"):
            try:
                done = subprocess.run([self.executable(), "--version"], capture_output=True, text=True, timeout=60)
                found = re.search(r"v(\d+)\.(\d+)", done.stdout)
            except (OSError, subprocess.SubprocessError):
                found = None
            self._version = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
        return self._version

    def list_probes(self, probe: str, pid: int | None) -> list[str] | None:
        argv = [self.executable(), "-l", probe] + (["-p", str(pid)] if pid is not None else [])
        try:
            done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        kind = probe.split(":", 1)[0] + ":"
        return [line for line in done.stdout.splitlines() if line.startswith(kind)]

    def leaving(self, line: str, signalled: bool) -> bool:
        # In JSON mode bpftrace prints two blank lines once it has left its event loop (its
        # probes detached, END run), before its maps; nothing else prints a blank line.
        return not line.strip()

    def events(self, line: str, keys: dict[str, int], hists: frozenset[str]) -> Iterator[Event]:
        if not line.strip():
            return
        try:
            event = decode_json_line(line)
        except json.JSONDecodeError:
            yield Event("printf", data=line + "\n")
            return
        if not isinstance(event, dict):
            yield Event("printf", data=line + "\n")
            return
        kind, data = event.get("type"), event.get("data")
        if kind == "printf":
            yield Event("printf", data=data)
        elif kind in ("map", "hist", "stats"):
            for name, value in data.items():
                yield Event("map", name, _split_keys(value, keys.get(name, 1), kind))
        elif kind == "time":
            yield Event("time", data=data.strip())
        elif kind == "lost_events":
            # 0.17: {"data": {"events": N}}; 0.27: {"count": N}.
            yield Event("lost", data=data.get("events", 0) if isinstance(data, dict) else event.get("count", 0))
        elif kind == "helper_error":
            if event.get("helper") == "map_lookup_elem" and event.get("retcode") == 0:
                return  # later releases (0.27) report a lookup of an absent key, read as 0 on purpose
            if event.get("helper") == "map_update_elem" and event.get("retcode") == _E2BIG:
                yield Event("map_full", data=1)
            else:
                yield Event("helper_error", data=f"{event.get('helper')} returned {event.get('retcode')}")


def _fix_bytes(value: Any) -> Any:
    """Strings with bytes >= 0x80 (see _HIGH_BYTE) as UTF-8 text."""
    if isinstance(value, str):
        try:
            return value.encode("latin-1").decode("utf-8", errors="replace")
        except UnicodeEncodeError:
            return value
    if isinstance(value, dict):
        return {_fix_bytes(k): _fix_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fix_bytes(v) for v in value]
    return value


#: A frozen module's file name as bpftrace 0.27's JSON writes it in a map key, without its space.
_FROZEN_WITHOUT_SPACE = re.compile(r"<frozen(?=[^\s>,])")


def _fix_keys(value: Any) -> Any:
    """A map's entries with the space of ``<frozen NAME>`` put back in their keys, where a
    bpftrace that erases spaces from keys (0.27) took it out. Other spaces in keys (a path
    with a space) are lost under such a bpftrace: docs/tools/README.md says so."""
    if not isinstance(value, dict):
        return value
    return {_FROZEN_WITHOUT_SPACE.sub("<frozen ", key) if "<frozen" in key else key: item
            for key, item in value.items()}


def _split_keys(value: Any, arity: int, kind: str) -> dict[tuple[str, ...], Any]:
    """A map's entries by key tuple. bpftrace joins a key's parts with commas; every part
    but the first is free of commas in our maps (function names, numbers), so the split
    is from the right."""
    if kind == "hist" and isinstance(value, list) or not isinstance(value, dict):
        return {(): value}
    if kind == "stats" and set(value) >= {"count", "total"}:
        return {(): value}
    return {tuple(key.rsplit(",", arity - 1)) if arity > 1 else (key,): v for key, v in value.items()}


class DTrace(Tracer):
    """DTrace on macOS and illumos. UNTESTED: written to the same contract as the bpftrace path."""

    name = "dtrace"
    dialect = "d"
    install_hint = (
        "DTrace comes with macOS (/usr/sbin/dtrace; System Integrity Protection must allow it: "
        "csrutil enable --without dtrace) and illumos. On Linux, use --tracer bpftrace."
    )

    def executable(self) -> str:
        if sys.platform.startswith("linux"):
            raise ToolError(
                "DTrace is the tracer of macOS and illumos; on Linux the tools use bpftrace "
                "(--tracer bpftrace)"
            )
        return super().executable()

    def argv(self, program: str, pid: int, arguments: list[str]) -> list[str]:
        # dtrace -s reads a file; -n takes one probe description, so the program goes by file.
        path = _program_file(program, ".d")
        return [self.executable(), "-q", "-C", "-p", str(pid), "-s", path, *arguments]

    def __init__(self, path: str | None = None) -> None:
        super().__init__(path)
        self._hist: tuple[str, tuple[str, ...]] | None = None
        self._rows: list[tuple[int, int]] = []

    def events(self, line: str, keys: dict[str, int], hists: frozenset[str]) -> Iterator[Event]:
        # Our .d scripts print a map entry as "@name<TAB>key...<TAB>value", a histogram as a
        # line "@name<TAB>key..." and DTrace's quantize table, and "@time<TAB>..." at the end
        # of an interval; everything else is the program's printf output.
        if self._hist is not None:
            row = re.match(r"^\s*(-?\d+) \|[@ ]*\s+(\d+)$", line)
            if row:
                self._rows.append((int(row.group(1)), int(row.group(2))))
                return
            if not line.strip() or "Distribution" in line:
                return
            yield from self._flush_hist()
        if line.startswith("@time\t"):
            yield Event("time", data=line.split("\t", 1)[1].strip())
        elif line.startswith("@") and line.split("\t", 1)[0] in keys:
            name, *parts = line.split("\t")
            if name in hists:
                self._hist = (name, tuple(p for p in parts if p))
            else:
                value = parts[-1].strip()
                yield Event("map", name, {tuple(parts[:-1]): int(value) if re.fullmatch(r"-?\d+", value) else value})
        else:
            yield Event("printf", data=line + "\n")

    def _flush_hist(self) -> Iterator[Event]:
        if self._hist is None:
            return
        name, key = self._hist
        buckets = [
            {"min": low, "max": (self._rows[i + 1][0] - 1) if i + 1 < len(self._rows) else low, "count": count}
            for i, (low, count) in enumerate(self._rows)
            if count
        ]
        self._hist, self._rows = None, []
        yield Event("map", name, {key: buckets})

    def finish(self) -> Iterator[Event]:
        yield from self._flush_hist()


def _program_file(program: str, suffix: str) -> str:
    """A temporary file with ``program``, removed at exit."""
    fd, path = tempfile.mkstemp(prefix="pydtrace-", suffix=suffix)
    with os.fdopen(fd, "w") as f:
        f.write(program)
    atexit.register(os.unlink, path)
    return path


def choose_tracer(name: str | None, path: str | None = None) -> Tracer:
    """The tracer named, or the platform's: bpftrace on Linux, dtrace on macOS and illumos; run
    from ``path`` if given (see :class:`Tracer`)."""
    if name is None:
        name = "bpftrace" if sys.platform.startswith("linux") else "dtrace"
    return {"bpftrace": Bpftrace, "dtrace": DTrace}[name](path)
