"""Reading bpftrace programs: their clauses and attach points, with comments and strings set aside.

Used by ``run`` (a user's own program: which probes it names, where its BEGIN
is, the ``@TARGET@`` placeholder) and by ``interpreter`` (the tools' programs,
with clauses added for an interpreter's own probes). Not a full bpftrace
parser: enough of its grammar to find the clauses of a program bpftrace
accepts, and positions that map one to one onto the program's text, so that
what is changed is changed in place and bpftrace's messages keep their line
numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

#: bpftrace's probe types (0.17), long and short names.
PROBE_TYPES = (
    "usdt", "U", "uprobe", "u", "uretprobe", "ur", "kprobe", "k", "kretprobe", "kr",
    "tracepoint", "t", "rawtracepoint", "rt", "profile", "p", "interval", "i", "software", "s",
    "hardware", "h", "watchpoint", "w", "asyncwatchpoint", "aw", "kfunc", "f", "kretfunc", "fr",
    "iter", "it",
)
#: One attach point: BEGIN, END, or TYPE:... up to a blank, a comma or a brace.
_ATTACH_POINT = re.compile(
    r"(?:BEGIN|END)(?![\w:])|(?:" + "|".join(sorted(PROBE_TYPES, key=len, reverse=True)) + r"):[^\s,{}]*"
)


def mask(text: str) -> str:
    """``text`` with the inside of comments and string literals replaced by blanks (newlines
    kept), so that positions in it are positions in ``text``."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
        elif c == '"':
            end = i + 1
            while end < n and text[end] != '"' and text[end] != "\n":
                end += 2 if text[end] == "\\" else 1
            end = min(end + 1, n)
            # The quotes stay: an empty string is still a string.
            for j in range(i + 1, end - 1):
                if out[j] != "\n":
                    out[j] = " "
            i = end
            continue
        else:
            i += 1
            continue
        for j in range(i, end):
            if out[j] != "\n":
                out[j] = " "
        i = end
    return "".join(out)


@dataclass
class AttachPoint:
    start: int
    end: int
    text: str

    @property
    def kind(self) -> str:
        return self.text.split(":", 1)[0]


@dataclass
class Clause:
    """``ATTACH_POINT, ... [/PREDICATE/] { BODY }``: positions in the program's text."""

    start: int
    brace: int  # the body's opening brace
    end: int  # just after the body's closing brace
    attach_points: list[AttachPoint] = field(default_factory=list)

    def closed(self, text: str) -> bool:
        """Whether the body has its closing brace."""
        return mask(text)[self.end - 1:self.end] == "}" and self.end > self.brace + 1


def clauses(text: str) -> list[Clause]:
    """The program's probe clauses, in order. What else stands at the top level (``#include``,
    struct definitions) is passed over. A brace left open runs to the end (bpftrace will say
    what is wrong)."""
    code = mask(text)
    found = []
    position, n = 0, len(code)
    while position < n:
        brace = code.find("{", position)
        if brace < 0:
            break
        end = _matching_brace(code, brace)
        header_start = _header_start(code, position, brace)
        header = code[header_start:brace]
        points = []
        for match in _ATTACH_POINT.finditer(header):
            before = header[: match.start()]
            # Attach points come first, separated by commas; a predicate (/.../) ends them.
            if before.strip() and not before.rstrip().endswith(","):
                break
            points.append(AttachPoint(header_start + match.start(), header_start + match.end(), match.group()))
            if not header[match.end():].lstrip().startswith(","):
                break
        if points:
            found.append(Clause(header_start, brace, end, points))
        position = end
    return found


def _header_start(code: str, position: int, brace: int) -> int:
    """Where the header of the clause whose body opens at ``brace`` begins: after the previous
    clause, a semicolon or a preprocessor line."""
    start = position
    for match in re.finditer(r";|^[ \t]*#[^\n]*\n", code[position:brace], re.M):
        start = position + match.end()
    while start < brace and code[start].isspace():
        start += 1
    return start


def _matching_brace(code: str, brace: int) -> int:
    depth = 0
    for i in range(brace, len(code)):
        if code[i] == "{":
            depth += 1
        elif code[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(code)


@dataclass
class UsdtProbe:
    """A ``usdt:PATH:PROVIDER:NAME`` attach point, split (provider "" where the point names none)."""

    path: str
    provider: str
    name: str


def usdt(point: AttachPoint) -> UsdtProbe | None:
    """The parts of a usdt attach point, or None for another kind."""
    if point.kind not in ("usdt", "U"):
        return None
    parts = point.text.split(":")[1:]
    if len(parts) == 3:
        return UsdtProbe(*parts)
    if len(parts) == 2:
        return UsdtProbe(parts[0], "", parts[1])
    return None


def names_matching(pattern: str, names: list[str]) -> list[str]:
    """The probe names a bpftrace name pattern (``*`` and ``?`` wildcards) matches."""
    return [name for name in names if fnmatchcase(name, pattern)]


def replace_spans(text: str, replacements: list[tuple[int, int, str]]) -> str:
    """``text`` with each (start, end) span replaced; spans must not overlap."""
    out, last = [], 0
    for start, end, new in sorted(replacements):
        out.append(text[last:start])
        out.append(new)
        last = end
    out.append(text[last:])
    return "".join(out)


def rename_argument(text: str, start: int, end: int, old: str, new: str) -> str:
    """``text[start:end]`` with the identifier ``old`` (outside comments and strings) as ``new``."""
    piece, code = text[start:end], mask(text)[start:end]
    spans = [(m.start(), m.end(), new) for m in re.finditer(rf"(?<![\w$@]){re.escape(old)}(?!\w)", code)]
    return replace_spans(piece, spans)
