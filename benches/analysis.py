"""From the paired measurements to the figures the issue asks for: ns/event and ratios to floors.

Input: the ``extra_info`` of each benchmark (harness.record), from a
pytest-benchmark JSON file or from the running session. Every figure is a
median over paired rounds; the spread given with it is the interquartile
range, and a ratio of two medians carries the range of the ratio of their
quartiles (``[q1_a / q3_b, q3_a / q1_b]``), which is wide on purpose: where
that range holds the target's bound, the timing cannot decide, and the
deterministic (callgrind) figure does (docs/decisions.md, 11).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

#: The floor loop that fires the probes each workload counts.
FLOOR_OF = {("function-entry",): "floor-entry", ("line",): "floor-line", ("gc-start", "gc-done"): "floor-gc",
            ("instance-new-start", "instance-new-done", "instance-delete-start", "instance-delete-done"): "floor-instance",
            ("cfunction-entry", "cfunction-return"): "floor-cfunction"}


@dataclass
class Figure:
    """A median with its interquartile range."""

    median: float
    q1: float
    q3: float

    @classmethod
    def of(cls, quartiles: dict[str, float] | None) -> Figure | None:
        if not quartiles:
            return None
        return cls(quartiles["median"], quartiles["q1"], quartiles["q3"])

    def ratio_to(self, other: Figure | None) -> Ratio | None:
        if other is None or other.median <= 0:
            return None
        lo = self.q1 / other.q3 if other.q3 > 0 else math.nan
        hi = self.q3 / other.q1 if other.q1 > 0 else math.inf
        return Ratio(self.median / other.median, min(lo, hi), max(lo, hi))

    def ns(self, digits: int = 1) -> str:
        return f"{self.median:.{digits}f} [{self.q1:.{digits}f}, {self.q3:.{digits}f}]"


@dataclass
class Ratio:
    value: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.value:.3f}x [{self.lo:.2f}, {self.hi:.2f}]"

    def decided(self, bound: float) -> bool | None:
        """True/False when the whole range is on one side of ``bound``; None inside the noise."""
        if self.hi <= bound:
            return True
        if self.lo > bound:
            return False
        return None


class Results:
    """The measurements of one run on one Python, by (workload, mode)."""

    def __init__(self, infos: Iterable[dict[str, Any]]) -> None:
        self.by_key: dict[tuple[str, str], dict[str, Any]] = {}
        for info in infos:
            if "workload" in info and "mode" in info:
                self.by_key[(info["workload"], info["mode"])] = info
        pythons = {info.get("python") for info in self.by_key.values()}
        self.python = ", ".join(sorted(p for p in pythons if p))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Results:
        return cls(b.get("extra_info", {}) for b in data.get("benchmarks", []))

    def workloads(self) -> list[str]:
        seen: list[str] = []
        for workload, _ in self.by_key:
            if not workload.startswith("floor-") and workload not in seen:
                seen.append(workload)
        return seen

    def get(self, workload: str, mode: str) -> dict[str, Any] | None:
        return self.by_key.get((workload, mode))

    def per_event(self, workload: str, mode: str) -> Figure | None:
        info = self.get(workload, mode)
        return Figure.of(info.get("per_event_ns")) if info else None

    def ratio(self, workload: str, mode: str) -> Figure | None:
        info = self.get(workload, mode)
        return Figure.of(info.get("ratio")) if info else None

    def companion(self, workload: str, mode: str, name: str) -> dict[str, Any] | None:
        info = self.get(workload, mode)
        return (info or {}).get("companions", {}).get(name)

    def floor(self, workload: str) -> Figure | None:
        """The C floor's cost per event, measured in the same rounds as the attached workload
        (or, failing that, in its own run)."""
        paired = self.companion(workload, "attached", "floor")
        if paired:
            return Figure.of(paired["per_event_ns"])
        info = self.get(workload, "bare") or self.get(workload, "attached") or {}
        name = FLOOR_OF.get(tuple(info.get("probes", ())))
        return self.per_event(name, "floor") if name else None

    def attached_to_floor(self, workload: str) -> Ratio | None:
        """Attached cost per event over the floor's, taken round by round."""
        paired = self.companion(workload, "attached", "floor")
        if paired and paired.get("subject_over_pair"):
            q = paired["subject_over_pair"]
            return Ratio(q["median"], q["q1"], q["q3"])
        attached = self.per_event(workload, "attached")
        return attached.ratio_to(self.floor(workload)) if attached else None

    def attached_to_pyusdt(self, workload: str) -> Ratio | None:
        """pydtrace's attached cost per event over pyusdt's, taken round by round."""
        return self._pydtrace_over_subject(workload, "pyusdt-attached")

    def attached_to_cpython(self, workload: str) -> Ratio | None:
        """pydtrace's attached cost per event over that of the interpreter's own probe (CPython
        3.15+ built --with-dtrace), taken round by round."""
        return self._pydtrace_over_subject(workload, "cpython-attached")

    def _pydtrace_over_subject(self, workload: str, mode: str) -> Ratio | None:
        """pydtrace (attached beside the subject of ``mode``) over that subject, per event."""
        paired = self.companion(workload, mode, "pydtrace")
        if paired and paired.get("subject_over_pair"):
            q = paired["subject_over_pair"]  # the subject over pydtrace: invert
            return Ratio(1 / q["median"], 1 / q["q3"], 1 / q["q1"])
        attached = self.per_event(workload, "attached")
        other = self.per_event(workload, mode)
        return attached.ratio_to(other) if attached and other else None

    def subject_to_floor(self, workload: str, mode: str) -> Ratio | None:
        """The subject of ``mode`` over the C floor measured beside it, per event, round by round."""
        paired = self.companion(workload, mode, "floor")
        q = paired.get("subject_over_pair") if paired else None
        return Ratio(q["median"], q["q1"], q["q3"]) if q else None

    def companion_to_floor(self, workload: str, mode: str, name: str) -> Ratio | None:
        """Companion ``name`` of ``mode`` over the C floor measured in the same rounds, per event,
        round by round (pydtrace and the floor both beside the interpreter's own probe)."""
        paired = self.companion(workload, mode, name)
        q = paired.get("over_floor") if paired else None
        return Ratio(q["median"], q["q1"], q["q3"]) if q else None

    def events(self, workload: str) -> float | None:
        info = self.get(workload, "bare")
        return info.get("events_per_round") if info else None

    def rows(self) -> list[dict[str, Any]]:
        """One row per workload with every derived figure."""
        out = []
        for w in self.workloads():
            row: dict[str, Any] = {"workload": w, "probes": (self.get(w, "bare") or {}).get("probes", [])}
            bare = self.get(w, "bare")
            row["bare_round_ms"] = bare["reference"]["median"] / 1e6 if bare else None
            row["events"] = self.events(w)
            row["bare_ns_per_event"] = (bare["reference"]["median"] / bare["events_per_round"]
                                        if bare and bare.get("events_per_round") else None)
            for mode in ("bare", "idle", "noop", "builtin", "shim", "pyusdt-idle", "attached", "attached-gc",
                         "pyusdt-attached", "cpython-attached"):
                row[mode] = {"per_event": self.per_event(w, mode), "ratio": self.ratio(w, mode)}
            noop = row["noop"]["per_event"]
            shim = row["shim"]["per_event"]
            attached = row["attached"]["per_event"]
            floor = self.floor(w)
            row["floor"] = floor
            row["shim_to_noop"] = shim.ratio_to(noop) if shim else None
            row["attached_to_floor"] = self.attached_to_floor(w)
            row["attached_to_pyusdt"] = self.attached_to_pyusdt(w)
            row["attached_to_cpython"] = self.attached_to_cpython(w)
            paired = self.companion(w, "pyusdt-attached", "pydtrace")
            row["pydtrace_beside_pyusdt"] = Figure.of(paired["per_event_ns"]) if paired else None
            out.append(row)
        return out


def summary_lines(results: Results) -> list[str]:
    """A compact text table (what the pytest session prints at its end)."""
    lines = [f"pydtrace-rs benchmarks, Python {results.python}: medians of paired rounds [IQR]"]
    lines.append(f"{'workload':8} {'A/A':>6} {'idle/bare':>18} {'noop ns/ev':>12} {'shim ns/ev':>12} {'shim/noop':>8} "
                 f"{'attached ns/ev':>15} {'floor ns/ev':>12} {'att/floor':>9} {'att/pyusdt':>10} {'gc-only/bare':>13}")

    def f(fig: Figure | None, digits: int = 1) -> str:
        return "-" if fig is None else f"{fig.median:.{digits}f}"

    def r(ratio: Ratio | None) -> str:
        return "-" if ratio is None else f"{ratio.value:.3f}"

    for row in results.rows():
        idle = row["idle"]["ratio"]
        idle_text = "-" if idle is None else f"{idle.median:.4f} [{idle.q1:.3f},{idle.q3:.3f}]"
        gc_only = row["attached-gc"]["ratio"]
        aa = row["bare"]["ratio"]
        lines.append(
            f"{row['workload']:8} {'-' if aa is None else f'{aa.median:.3f}':>6} {idle_text:>18} {f(row['noop']['per_event']):>12} {f(row['shim']['per_event']):>12} "
            f"{r(row['shim_to_noop']):>8} {f(row['attached']['per_event']):>15} {f(row['floor']):>12} "
            f"{r(row['attached_to_floor']):>9} {r(row['attached_to_pyusdt']):>10} "
            f"{'-' if gc_only is None else f'{gc_only.median:.4f}':>13}"
        )
    for row in results.rows():
        if row["attached_to_cpython"]:
            theirs = row["cpython-attached"]["per_event"]
            lines.append(f"{row['workload']}: the interpreter's own probe attached {f(theirs)} ns/event; pydtrace "
                         f"attached in the same rounds {r(row['attached_to_cpython'])}x that")
    floors = [(w, results.per_event(w, "floor")) for (w, mode) in results.by_key if mode == "floor"]
    if floors:
        lines.append("uprobe floors (C loop, ns/event): " + ", ".join(
            f"{w.removeprefix('floor-')} {fig.median:.1f} [{fig.q1:.1f}, {fig.q3:.1f}]" for w, fig in floors if fig))
    lines.append(f"(metric: {next(iter(results.by_key.values())).get('metric', 'wall')} time)")
    return lines
