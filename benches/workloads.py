"""The benchmark workloads: plain Python, no import of ``dtrace`` or of anything else.

Every workload is a function ``run(n)`` whose work grows linearly with ``n``,
and a :class:`Workload` entry saying which probes it exercises (what the
attached consumer counts) and how large a round is. The benchmark driver
(``child.py``) imports this module in every mode, so the module itself must
stay free of side effects: importing it must not import ``dtrace``.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass


# -- line-heavy: many short lines, one call per round -----------------------------------------

def lines(n):
    total = 0
    for i in range(n):
        total += i
        total ^= 0x5A5A
        total -= 3
    return total


# -- call-heavy: a tiny Python function called in a tight loop ----------------------------------

def _leaf(x):
    return x


def calls(n):
    leaf = _leaf
    for i in range(n):
        leaf(i)
        leaf(i)
        leaf(i)
        leaf(i)
    return n


# -- C-call-heavy: builtin functions and methods called in a tight loop ------------------------

def cfuncs(n):
    xs = [0]
    append, pop = xs.append, xs.pop
    for i in range(n):
        len(xs)
        abs(i)
        append(i)
        pop()
    return n


# -- objects: Python class instances created and freed by reference counting -------------------

class _Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y


class _Plain:
    pass


class _Slotted:
    __slots__ = ("a", "b")

    def __init__(self, a):
        self.a = a
        self.b = None


def objects(n):
    kept = None
    for i in range(n):
        p = _Point(i, i)
        q = _Plain()
        s = _Slotted(p)
        s.b = q
        kept = s
    return kept is not None


# -- gc-heavy: reference cycles, so the collector runs often ------------------------------------

class _Cell:
    __slots__ = ("other", "__weakref__")


#: The youngest generation's threshold while gc_heavy runs: a collection every few iterations,
#: so that the collector's own events are a measurable share of the work.
GC_THRESHOLD = 25


def gc_heavy(n):
    saved = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, *saved[1:])
    try:
        for _ in range(n):
            a = _Cell()
            b = _Cell()
            a.other = b
            b.other = a
            c = [a, b]
            c.append(c)
    finally:
        gc.set_threshold(*saved)
    return n


# -- mixed: small pyperformance-style kernels ---------------------------------------------------

def _nbody(steps):
    # A 3-body version of pyperformance's nbody: float arithmetic, few calls.
    bodies = [
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 39.47],
        [4.84, -1.16, -0.10, 0.606, 2.81, -0.02, 0.037],
        [8.34, 4.12, -0.40, -1.01, 1.82, 0.008, 0.011],
    ]
    pairs = [(bodies[i], bodies[j]) for i in range(3) for j in range(i + 1, 3)]
    dt = 0.01
    for _ in range(steps):
        for (b1, b2) in pairs:
            dx = b1[0] - b2[0]
            dy = b1[1] - b2[1]
            dz = b1[2] - b2[2]
            mag = dt * ((dx * dx + dy * dy + dz * dz) ** -1.5)
            m1 = b1[6] * mag
            m2 = b2[6] * mag
            b1[3] -= dx * m2
            b1[4] -= dy * m2
            b1[5] -= dz * m2
            b2[3] += dx * m1
            b2[4] += dy * m1
            b2[5] += dz * m1
        for b in bodies:
            b[0] += dt * b[3]
            b[1] += dt * b[4]
            b[2] += dt * b[5]
    return bodies[0][0]


def _eval_a(i, j):
    return 1.0 / ((i + j) * (i + j + 1) // 2 + i + 1)


def _spectral_norm(size):
    # pyperformance's spectral_norm, small: call-heavy numeric code.
    u = [1.0] * size
    for _ in range(2):
        v = [sum(_eval_a(i, j) * u[j] for j in range(size)) for i in range(size)]
        u = [sum(_eval_a(j, i) * v[j] for j in range(size)) for i in range(size)]
    return math.sqrt(sum(x * x for x in u))


def _fannkuch(n):
    # pyperformance's fannkuch: list slicing and swaps, no calls in the loop.
    count = list(range(1, n + 1))
    max_flips = 0
    m = n - 1
    r = n
    perm1 = list(range(n))
    while True:
        while r != 1:
            count[r - 1] = r
            r -= 1
        if perm1[0] != 0 and perm1[m] != m:
            perm = perm1[:]
            flips = 0
            k = perm[0]
            while k:
                perm[: k + 1] = perm[k::-1]
                flips += 1
                k = perm[0]
            max_flips = max(max_flips, flips)
        while r != n:
            perm1.insert(r, perm1.pop(0))
            count[r] -= 1
            if count[r] > 0:
                break
            r += 1
        else:
            return max_flips


class _Task:
    # A cut-down richards: objects, method calls and attribute access.
    def __init__(self, ident, prio, work):
        self.ident = ident
        self.prio = prio
        self.work = work
        self.done = 0

    def step(self):
        if self.work > self.done:
            self.done += 1
            return True
        return False


def _richards(rounds):
    tasks = [_Task(i, i % 3, rounds + i) for i in range(8)]
    steps = 0
    active = True
    while active:
        active = False
        for task in sorted(tasks, key=lambda t: t.prio):
            if task.step():
                steps += 1
                active = True
    return steps


def _fib(n):
    return n if n < 2 else _fib(n - 1) + _fib(n - 2)


def _pipeline(n):
    # Generators: every item resumes and yields through three frames.
    def numbers(k):
        for i in range(k):
            yield i

    def squares(items):
        for i in items:
            yield i * i

    def evens(items):
        for i in items:
            if not i & 1:
                yield i

    return sum(evens(squares(numbers(n))))


def _text(n):
    # String and dict work, like pyperformance's json/regex-free text kernels.
    words = {}
    for i in range(n):
        key = "w%d" % (i % 97)
        words[key] = words.get(key, 0) + len(key)
    return ",".join(sorted(words))


def mixed(n):
    out = 0.0
    for _ in range(n):
        out += _nbody(20)
        out += _spectral_norm(12)
        out += _fannkuch(6)
        out += _richards(6)
        out += _fib(12)
        out += _pipeline(120)
        out += len(_text(150))
    return out


@dataclass(frozen=True)
class Workload:
    """A workload, the probes its attached consumer counts, and its round sizes."""

    name: str
    function: object
    #: What the attached consumer counts (DTrace spelling); their events are the events per round.
    probes: tuple[str, ...]
    #: ``n`` for a round in the modes where no consumer runs (bare, idle, shim, dispatch floors).
    n_quiet: int
    #: ``n`` for a round under a consumer (a uprobe per event is 10 to 50 times slower).
    n_traced: int
    #: The probes of pyusdt that correspond to ``probes``, if it has any.
    pyusdt_probes: tuple[str, ...] = ()
    #: A scale for the deterministic (callgrind) runs, about 10 ms of work natively.
    n_callgrind: int = 0
    #: Whether the workload also runs with only the gc probes attached (to show it stays idle).
    gc_only_check: bool = False
    #: Whether the workload also runs under a consumer of the interpreter's own copy of its probes,
    #: where the interpreter declares them (CPython 3.15+ built --with-dtrace: function__entry).
    cpython_check: bool = False
    description: str = ""
    #: Events per unit of ``n`` where sys.monitoring cannot count them (the instance probes);
    #: the attached run checks it against the consumer's count.
    events_per_n: float | None = None


#: What a consumer of object creation and destruction attaches.
INSTANCE_PROBES = ("instance-new-start", "instance-new-done", "instance-delete-start", "instance-delete-done")
#: What a consumer of C function calls attaches.
CFUNCTION_PROBES = ("cfunction-entry", "cfunction-return")

WORKLOADS = {
    w.name: w
    for w in [
        Workload(
            "line", lines, ("line",), n_quiet=400_000, n_traced=25_000,
            pyusdt_probes=("LINE",), n_callgrind=40_000, gc_only_check=True,
            description="a loop of three short statements: 4 line events per iteration",
        ),
        Workload(
            "call", calls, ("function-entry",), n_quiet=250_000, n_traced=25_000,
            pyusdt_probes=("PY_START",), n_callgrind=25_000, gc_only_check=True, cpython_check=True,
            description="a loop calling a one-line Python function 4 times per iteration",
        ),
        Workload(
            "object", objects, INSTANCE_PROBES, n_quiet=120_000, n_traced=10_000,
            n_callgrind=15_000, events_per_n=12,
            description="create and free 3 instances of Python classes per iteration (2 with __init__); "
                        "each fires the 4 instance probes",
        ),
        Workload(
            "cfunc", cfuncs, CFUNCTION_PROBES, n_quiet=250_000, n_traced=12_500,
            n_callgrind=25_000, events_per_n=8,
            description="a loop calling 4 C functions per iteration (len, abs, a bound list.append and "
                        "list.pop); each fires cfunction-entry and cfunction-return",
        ),
        Workload(
            "gc", gc_heavy, ("gc-start", "gc-done"), n_quiet=120_000, n_traced=120_000,
            n_callgrind=15_000,
            description="build 2-object cycles and self-referencing lists: automatic collections",
        ),
        Workload(
            "mixed", mixed, ("function-entry",), n_quiet=24, n_traced=3,
            pyusdt_probes=("PY_START",), n_callgrind=2,
            description="nbody, spectral_norm, fannkuch, richards, fib, a generator pipeline, text",
        ),
    ]
}

#: Which sys.monitoring events serve each probe (arming.rs has the same table). The
#: instance-delete probes have no dispatch of their own (a deallocator in each class), so their
#: dispatch floor is that of the instance-new probes' events.
PROBE_EVENTS = {
    "function-entry": ("PY_START", "PY_RESUME", "PY_THROW"),
    "function-return": ("PY_RETURN", "PY_YIELD", "PY_UNWIND"),
    "line": ("LINE",),
    "instance-new-start": ("CALL", "C_RETURN", "C_RAISE"),
    "instance-new-done": ("CALL", "C_RETURN", "C_RAISE"),
    "cfunction-entry": ("CALL", "C_RETURN", "C_RAISE"),
    "cfunction-return": ("CALL", "C_RETURN", "C_RAISE"),
}
GC_PROBES = ("gc-start", "gc-done")
