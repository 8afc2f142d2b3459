"""Output a person reads at a glance: aligned tables, histograms, short paths, durations."""

from __future__ import annotations

import os
from typing import Any, Sequence, TextIO


def is_cut(name: str, strlen: int) -> bool:
    """Whether ``name`` reached the tracer's string limit (``strlen`` includes the NUL)."""
    return len(name.encode()) >= strlen - 1


def name(text: str, strlen: int) -> str:
    """A name as read by the tracer, marked when it may have been cut."""
    return text + "..." if is_cut(text, strlen) else text


def path(text: str) -> str:
    """A file name, relative to the working directory when it is below it."""
    if not text.startswith("/"):
        return text  # <frozen importlib._bootstrap>, <string>, ...
    try:
        relative = os.path.relpath(text)
    except ValueError:
        return text
    return text if relative.startswith("..") else relative


def duration(ns: float) -> str:
    """``ns`` nanoseconds, in the unit that reads best."""
    for unit, size in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= size:
            return f"{ns / size:.3g} {unit}" if ns < 100 * size else f"{ns / size:.0f} {unit}"
    return f"{ns:.0f} ns"


def table(out: TextIO, headers: Sequence[str], rows: Sequence[Sequence[Any]], left: Sequence[str] = ()) -> None:
    """Columns aligned: to the right, but the columns named in ``left`` to the left."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    last = len(headers) - 1

    def line(values: Sequence[str]) -> str:
        parts = []
        for i, (value, width) in enumerate(zip(values, widths)):
            if i == last and headers[i] in left:
                parts.append(value)
            elif headers[i] in left:
                parts.append(value.ljust(width))
            else:
                parts.append(value.rjust(width))
        return "  ".join(parts).rstrip()

    out.write(line(headers) + "\n")
    for row in cells:
        out.write(line(row) + "\n")


def top(rows: list, count: int) -> tuple[list, int]:
    """The first ``count`` rows (all for 0) and how many were left out."""
    if count <= 0 or len(rows) <= count:
        return rows, 0
    return rows[:count], len(rows) - count


def _bound(value: int) -> str:
    for suffix, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value >= size and value % size == 0:
            return f"{value // size}{suffix}"
    return str(value)


def histogram(out: TextIO, buckets: list[dict[str, int]], width: int = 40) -> None:
    """A power-of-two histogram as bpftrace draws one: ``[min, max+1)  count |@@@@  |``.

    ``buckets`` are bpftrace's JSON buckets: ``{"min": m, "max": M, "count": n}``
    (the last may lack "max"; empty buckets inside the range are kept).
    """
    rows = [b for b in buckets if "count" in b]
    while rows and rows[0]["count"] == 0:
        rows.pop(0)
    while rows and rows[-1]["count"] == 0:
        rows.pop()
    if not rows:
        out.write("    (no events)\n")
        return
    most = max(b["count"] for b in rows)
    labels = []
    for b in rows:
        low = b.get("min", 0)
        if "max" not in b:
            labels.append(f"[{_bound(low)}, ...)")
        elif b["max"] == low:
            labels.append(f"[{_bound(low)}]")
        else:
            labels.append(f"[{_bound(low)}, {_bound(b['max'] + 1)})")
    label_width = max(len(label) for label in labels)
    count_width = max(len(str(b["count"])) for b in rows)
    for label, b in zip(labels, rows):
        bar = "@" * round(b["count"] * width / most) if b["count"] else ""
        out.write(f"    {label.ljust(label_width)}  {str(b['count']).rjust(count_width)} |{bar.ljust(width)}|\n")


def buckets_total(buckets: list[dict[str, int]]) -> int:
    return sum(b.get("count", 0) for b in buckets)
