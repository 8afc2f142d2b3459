"""cfunction-entry and cfunction-return under a real bpftrace: exact counts, arguments, pairing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tracing import STEP_TIMEOUT, Bpftrace, require_tracer, trace

CFUNCTION_PROBES = ["cfunction-entry", "cfunction-return"]

# Calls made from the workload's file only: the driver's own calls (made before and after the
# workload runs) would make the counts depend on the fixture.
CFUNCTION_PROGRAM = """
usdt:{lib}:python:cfunction__entry /str(arg0) == "%(file)s"/ {
    @entry[str(arg3), arg2] = count();
    @names[str(arg1), str(arg3)] = count();
    @depth[tid] = @depth[tid] + 1;
}
usdt:{lib}:python:cfunction__return /str(arg0) == "%(file)s"/ {
    @ret[str(arg3), arg2] = count();
    @depth[tid] = @depth[tid] - 1;
}
"""

# Two strings in a map key, and one compared, must fit bpftrace 0.17's 512-byte stack.
SHORT_STRINGS = {"BPFTRACE_STRLEN": "100"}


def run_traced(body: str, workload_dir, template: str = CFUNCTION_PROGRAM, probes=None):
    program = template % {"file": str(workload_dir / "workload.py")}
    run = trace(body, program, probes or CFUNCTION_PROBES, workload_dir, tracer_env=SHORT_STRINGS)
    # Detached: the callables the name cache held are released.
    assert run.workload.idle["cfunction_cache"] == 0, run.workload.idle
    assert run.workload.idle["events"] == [0] * 6, run.workload.idle
    return run


def by_line(run, name: str, qualname: str, marker: str) -> int:
    """Events of map ``@name`` for ``qualname`` called from the body line with ``marker``."""
    return run.count(name, f"{qualname},{run.workload.line_of(marker)}")


def entries(run) -> dict[tuple[str, int], int]:
    """Every entry the workload file made: (qualname, line) -> count."""
    found = {}
    for key, count in run.maps.get("@entry", {}).items():
        qualname, line = key.rsplit(",", 1)
        found[(qualname, int(line))] = count
    return found


def assert_balanced(run) -> None:
    """Every entry had its return, on its own thread, at the same line."""
    assert all(depth == 0 for depth in run.maps.get("@depth", {}).values()), run.maps.get("@depth")
    assert run.maps.get("@entry") == run.maps.get("@ret"), (run.maps.get("@entry"), run.maps.get("@ret"))


def test_a_c_function_called_n_times_from_one_line(workload_dir):
    body = """
        import math

        def run(result):
            xs = []
            for i in range(250):  # loop
                xs.append(i)  # append-line
                math.sqrt(i)  # sqrt-line
                len(xs)  # len-line
            result["n"] = len(xs)  # final-len
    """
    run = run_traced(body, workload_dir)
    line = run.workload.line_of
    # Exactly these calls, no more: nothing else in the file is a call of C code.
    assert entries(run) == {
        ("range", line("# loop")): 1,
        ("list.append", line("# append-line")): 250,
        ("math.sqrt", line("# sqrt-line")): 250,
        ("len", line("# len-line")): 250,
        ("len", line("# final-len")): 1,
    }
    assert run.maps["@names"] == {"range,range": 1, "append,list.append": 250, "sqrt,math.sqrt": 250, "len,len": 251}
    assert_balanced(run)
    assert run.result == {"n": 250}
    assert sorted(run.workload.live) == sorted(CFUNCTION_PROBES)


def test_a_raising_c_function_returns_and_the_program_goes_on(workload_dir):
    body = """
        import math

        def run(result):
            caught = 0
            for i in range(40):
                try:
                    math.sqrt(-1)  # sqrt-raises
                except ValueError:
                    caught += 1
            for i in range(30):
                try:
                    {}.pop("missing")  # pop-raises
                except KeyError:
                    caught += 1
            for i in range(20):
                try:
                    int("x")  # int-raises
                except ValueError:
                    caught += 1
            result["caught"] = caught
    """
    run = run_traced(body, workload_dir)
    assert run.result == {"caught": 90}
    for qualname, marker, count in [("math.sqrt", "# sqrt-raises", 40), ("dict.pop", "# pop-raises", 30),
                                    ("int", "# int-raises", 20)]:
        assert by_line(run, "entry", qualname, marker) == count, qualname
        assert by_line(run, "ret", qualname, marker) == count, qualname
    assert run.maps["@names"]["pop,dict.pop"] == 30
    assert_balanced(run)


def test_methods_are_named_by_the_class_that_defines_them(workload_dir):
    body = """
        import collections

        class MyList(list):
            pass

        def run(result):
            xs = []
            for i in range(60):
                xs.append(i)  # descriptor
            append = xs.append
            for i in range(50):
                append(i)  # bound
            mine = MyList()  # python-class
            for i in range(40):
                mine.append(i)  # subclass
            for i in range(30):
                dict.fromkeys("ab")  # classmethod
            for i in range(20):
                (1).__add__(i)  # method-wrapper
                int.__add__(1, i)  # slot-wrapper
            queue = collections.deque()  # deque-class
            for i in range(10):
                queue.append(i)  # deque-append
    """
    run = run_traced(body, workload_dir)
    # xs.append(1) calls the descriptor list.append; a bound builtin method is a new object at
    # each attribute access, named the same; a subclass's instance calls the same definition.
    assert by_line(run, "entry", "list.append", "# descriptor") == 60
    assert by_line(run, "entry", "list.append", "# bound") == 50
    assert by_line(run, "entry", "list.append", "# subclass") == 40
    assert by_line(run, "entry", "dict.fromkeys", "# classmethod") == 30
    assert by_line(run, "entry", "int.__add__", "# method-wrapper") == 20
    assert by_line(run, "entry", "int.__add__", "# slot-wrapper") == 20
    assert by_line(run, "entry", "collections.deque", "# deque-class") == 1
    assert by_line(run, "entry", "deque.append", "# deque-append") == 10
    # A Python class is not C: calling MyList fires nothing here (the instance probes' business).
    assert not [key for key in entries(run) if key[1] == run.workload.line_of("# python-class")]
    assert run.maps["@names"]["append,list.append"] == 150
    assert run.maps["@names"]["__add__,int.__add__"] == 40
    assert run.maps["@names"]["fromkeys,dict.fromkeys"] == 30
    assert run.maps["@names"]["deque,collections.deque"] == 1
    assert_balanced(run)


def test_functions_of_modules_classes_and_other_c_callables(workload_dir):
    body = """
        import collections, functools, math, operator

        def run(result):
            for i in range(25):
                math.sqrt(i)  # sqrt
                math.floor(1.5)  # floor
                len("ab")  # len
                isinstance(i, int)  # isinstance
            square = functools.partial(pow, exp=2)  # make-partial
            for i in range(15):
                square(i)  # call-partial
            first = operator.itemgetter(0)  # make-getter
            for i in range(12):
                first([i])  # call-getter
            for i in range(9):
                int("7")  # int
                collections.OrderedDict()  # ordered-dict
    """
    run = run_traced(body, workload_dir)
    expected = {
        ("sqrt", "math.sqrt", "# sqrt"): 25,
        ("floor", "math.floor", "# floor"): 25,
        ("len", "len", "# len"): 25,
        ("isinstance", "isinstance", "# isinstance"): 25,
        # The class functools.partial, then its instances (no __name__ of their own: the class's).
        ("partial", "functools.partial", "# make-partial"): 1,
        ("partial", "functools.partial", "# call-partial"): 15,
        ("itemgetter", "operator.itemgetter", "# make-getter"): 1,
        ("itemgetter", "operator.itemgetter", "# call-getter"): 12,
        ("int", "int", "# int"): 9,
        ("OrderedDict", "collections.OrderedDict", "# ordered-dict"): 9,
    }
    for (name, qualname, marker), count in expected.items():
        assert by_line(run, "entry", qualname, marker) == count, (qualname, marker)
        assert by_line(run, "ret", qualname, marker) == count, (qualname, marker)
    names = run.maps["@names"]
    assert names["sqrt,math.sqrt"] == names["len,len"] == 25
    assert names["partial,functools.partial"] == 16
    assert names["OrderedDict,collections.OrderedDict"] == 9
    # pow, called by the partial object (C code), is no call made by Python code.
    assert not [key for key in entries(run) if key[0] == "pow"]
    assert_balanced(run)


NESTING_PROGRAM = CFUNCTION_PROGRAM + """
usdt:{lib}:python:function__entry /str(arg0) == "%(file)s"/ { @python_under_c[str(arg3)] = max(@depth[tid]); }
"""


def test_python_callables_fire_nothing_and_python_called_by_c_nests_inside(workload_dir):
    body = """
        class Point:
            def __init__(self, x):
                self.x = x

            def norm(self):
                return self.x

            def __call__(self):
                return 1

            @staticmethod
            def static():
                return 2

            @classmethod
            def klass(cls):
                return 3

        def plain(x):
            return x

        def numbers():
            yield 1

        def run(result):
            p = Point(1)
            for i in range(10):
                plain(i); p.norm(); p(); Point.static(); Point.klass(); (lambda: 1)(); Point(2); numbers()  # python
            for i in range(3):
                sorted([3, 1, 2], key=lambda v: -v)  # sorted
    """
    run = run_traced(body, workload_dir, NESTING_PROGRAM, ["cfunction-entry", "cfunction-return", "function-entry"])
    python_line = run.workload.line_of("# python")
    assert not [key for key in entries(run) if key[1] == python_line], entries(run)
    assert by_line(run, "entry", "sorted", "# sorted") == 3
    # The key function runs inside sorted(): one C frame deep.
    assert run.maps["@python_under_c"]["run.<locals>.<lambda>"] == 1
    assert run.maps["@python_under_c"]["Point.norm"] == 0
    assert_balanced(run)


def test_a_callable_whose_name_cannot_be_read_is_unknown(workload_dir):
    body = """
        import ctypes, functools

        class MethodDef(ctypes.Structure):
            _fields_ = [("ml_name", ctypes.c_char_p), ("ml_meth", ctypes.c_void_p),
                        ("ml_flags", ctypes.c_int), ("ml_doc", ctypes.c_char_p)]

        METH_NOARGS = 0x0004
        new_function = ctypes.pythonapi.PyCFunction_NewEx
        new_function.restype = ctypes.py_object
        new_function.argtypes = [ctypes.c_void_p, ctypes.py_object, ctypes.c_void_p]
        DEFINITIONS = []  # each must outlive its function

        def builtin(name, c_function, bound_to):
            # A builtin function named `name` (bytes, not necessarily UTF-8) calling c_function(bound_to).
            definition = MethodDef(name, ctypes.cast(c_function, ctypes.c_void_p).value, METH_NOARGS, None)
            DEFINITIONS.append(definition)
            return new_function(ctypes.addressof(definition), bound_to, None)

        # ml_name is not UTF-8: reading __name__ raises UnicodeDecodeError.
        unreadable = builtin(b"bad\\xff\\xfename", ctypes.pythonapi.PyObject_Repr, "text")
        unreadable_raising = builtin(b"\\xc3(", ctypes.pythonapi.PyObject_GetIter, 42)
        nameless = functools.partial(len)
        nameless.__name__ = 42  # not a string

        def run(result):
            try:
                unreadable.__name__
            except UnicodeDecodeError:
                result["unreadable"] = True
            result["repr"] = unreadable()
            for i in range(10):
                unreadable()  # unreadable
            raised = 0
            for i in range(7):
                try:
                    unreadable_raising()  # raises
                except TypeError:
                    raised += 1
            for i in range(5):
                nameless("abc")  # not-a-string
            result["raised"] = raised
    """
    run = run_traced(body, workload_dir)
    assert run.result == {"unreadable": True, "repr": "'text'", "raised": 7}
    assert by_line(run, "entry", "<unknown>", "# unreadable") == 10
    assert by_line(run, "entry", "<unknown>", "# raises") == 7
    assert by_line(run, "ret", "<unknown>", "# raises") == 7
    assert by_line(run, "entry", "<unknown>", "# not-a-string") == 5
    assert run.maps["@names"]["<unknown>,<unknown>"] == 23
    assert_balanced(run)


def test_threads_balance_each_on_its_own(workload_dir):
    body = """
        import math, threading

        def work(counts, index):
            failed = 0
            for i in range(500):
                len("x" * (i % 7))  # len
                try:
                    math.sqrt(-i - 1)  # raises
                except ValueError:
                    failed += 1
            counts[index] = failed

        def run(result):
            counts = [0] * 4
            threads = [threading.Thread(target=work, args=(counts, i)) for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            result["failed"] = sum(counts)
    """
    run = run_traced(body, workload_dir)
    assert run.result == {"failed": 2000}
    assert by_line(run, "entry", "len", "# len") == by_line(run, "ret", "len", "# len") == 2000
    assert by_line(run, "entry", "math.sqrt", "# raises") == by_line(run, "ret", "math.sqrt", "# raises") == 2000
    assert len(run.maps["@depth"]) >= 5  # four workers and the main thread, each balanced
    assert_balanced(run)


BOTH_PROGRAM = CFUNCTION_PROGRAM + """
usdt:{lib}:python:instance__new__start { @new_start[str(arg0)] = count(); }
usdt:{lib}:python:instance__new__done { @new_done[str(arg0)] = count(); }
"""


def test_instance_probes_keep_exact_counts_beside_them(workload_dir):
    """Both share CALL, C_RETURN and C_RAISE: a Python class fires the instance probes only, a C
    callable the C function probes only, each exactly once per call."""
    body = """
        class Point:
            def __init__(self, items):
                self.size = len(items)  # in-init

        class Failing:
            def __init__(self):
                raise ValueError("no")

        def run(result):
            for i in range(100):
                Point([i])  # point
                dict()  # dict
            for i in range(20):
                try:
                    Failing()  # failing
                except ValueError:
                    pass
    """
    probes = ["cfunction-entry", "cfunction-return", "instance-new-start", "instance-new-done"]
    run = run_traced(body, workload_dir, BOTH_PROGRAM, probes)
    assert run.maps["@new_start"]["Point"] == run.maps["@new_done"]["Point"] == 100
    assert run.maps["@new_start"]["Failing"] == run.maps["@new_done"]["Failing"] == 20
    assert "dict" not in run.maps["@new_start"]
    assert by_line(run, "entry", "len", "# in-init") == 100
    assert by_line(run, "entry", "dict", "# dict") == 100
    for marker in ("# point", "# failing"):
        assert not [key for key in entries(run) if key[1] == run.workload.line_of(marker)], marker
    assert_balanced(run)


ENTRY_ONLY = """
usdt:{lib}:python:cfunction__entry /str(arg0) == "%(file)s"/ { @entry[str(arg3), arg2] = count(); }
"""
RETURN_ONLY = """
usdt:{lib}:python:cfunction__return /str(arg0) == "%(file)s"/ { @ret[str(arg3), arg2] = count(); }
"""


def test_a_consumer_of_one_of_the_two_sees_exact_counts(workload_dir):
    """Each probe works on its own: with only one enabled, the other's callback is not registered
    (C_RETURN and C_RAISE come with CALL whatever is wanted)."""
    body = """
        import math

        def run(result):
            for i in range(70):
                len("ab")  # len
                try:
                    math.sqrt(-1)  # raises
                except ValueError:
                    pass
    """
    for template, probe, name in [(ENTRY_ONLY, "cfunction-entry", "entry"), (RETURN_ONLY, "cfunction-return", "ret")]:
        run = run_traced(body, workload_dir, template, [probe])
        assert run.workload.live == [probe]
        assert by_line(run, name, "len", "# len") == 70
        assert by_line(run, name, "math.sqrt", "# raises") == 70
        assert set(run.maps) == {f"@{name}"}


def test_consumers_coming_and_going_switch_the_callbacks_with_exact_counts():
    """One process, consumers one after another: the C function probes alone, the instance probes
    alone, both, the C function probes again. Each change of what is wanted registers other
    callbacks for CALL, C_RETURN and C_RAISE; each consumer counts exactly its own events."""
    require_tracer()
    code = """
        import json, sys, time
        import dtrace
        print(dtrace.library_path(), flush=True)

        class Point:
            def __init__(self, i):
                self.i = i

        def phase(n):
            for i in range(n):
                Point(i)
                len("ab")

        for line in sys.stdin:
            words = line.split()
            if words[0] == "run":
                live = dtrace.wait_for_consumer(*words[2].split(","), timeout=30)
                phase(int(words[1]))
                print(json.dumps({"live": live, "enabled": sorted(dtrace.enabled_probes())}), flush=True)
            elif words[0] == "detached":
                deadline = time.monotonic() + 30
                while dtrace.enabled_probes() and time.monotonic() < deadline:
                    time.sleep(0.005)
                print(json.dumps({"idle": not dtrace.enabled_probes(),
                                  "cache": dtrace._native._testing.cfunction_cache_stats()[0]}), flush=True)
    """
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYDTRACE")}
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    library = process.stdout.readline().strip()
    c_program = """
usdt:{lib}:python:cfunction__entry /str(arg0) == "<string>"/ { @c_entry[str(arg3)] = count(); }
usdt:{lib}:python:cfunction__return /str(arg0) == "<string>"/ { @c_return[str(arg3)] = count(); }
"""
    instance_program = """
usdt:{lib}:python:instance__new__start { @new_start[str(arg0)] = count(); }
usdt:{lib}:python:instance__new__done { @new_done[str(arg0)] = count(); }
"""
    consumers = [
        (c_program, ["cfunction-entry", "cfunction-return"], 101),
        (instance_program, ["instance-new-start", "instance-new-done"], 102),
        (c_program + instance_program, ["cfunction-entry", "cfunction-return", "instance-new-start",
                                         "instance-new-done"], 103),
        (c_program, ["cfunction-entry", "cfunction-return"], 104),
    ]

    def say(line: str) -> dict:
        process.stdin.write(line + "\n")
        process.stdin.flush()
        answer = process.stdout.readline()
        assert answer, process.stderr.read()
        return json.loads(answer)

    try:
        for program, probes, n in consumers:
            tracer = Bpftrace(program, process.pid, library)
            try:
                tracer.start()
                assert say(f"run {n} {','.join(probes)}") == {"live": True, "enabled": sorted(probes)}
                maps = tracer.stop()
            finally:
                tracer.kill()
            if "cfunction-entry" in probes:
                # len once per iteration (the command loop's own calls of C functions are there too).
                assert maps["@c_entry"]["len"] == maps["@c_return"]["len"] == n, maps
                assert "Point" not in maps["@c_entry"], maps
            else:
                assert "@c_entry" not in maps, maps
            if "instance-new-start" in probes:
                assert maps["@new_start"] == maps["@new_done"] == {"Point": n}, maps
            else:
                assert "@new_start" not in maps, maps
            assert say("detached") == {"idle": True, "cache": 0}
        process.stdin.close()
        assert process.wait(STEP_TIMEOUT) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()


INSCOPE = """\
import math


def work(n):
    for i in range(n):
        math.sqrt(i)
        len("ab")


class K:
    pass
"""

SCOPED_WORKLOAD = """
    import math
    import dtrace
    import inscope

    class Outside:
        pass

    def run(result):
        before = dtrace._native._testing.scope_stats()[1]
        for i in range(200):
            math.sqrt(i)  # out of scope
            Outside()
        inscope.work(150)
        for i in range(5):
            inscope.K()
        result["disables"] = dtrace._native._testing.scope_stats()[1] - before
"""

SCOPED_PROGRAM = """
usdt:{lib}:python:cfunction__entry { @entry[str(arg0), str(arg3)] = count(); }
usdt:{lib}:python:cfunction__return { @ret[str(arg0), str(arg3)] = count(); }
"""


def test_a_scope_keeps_the_calls_of_other_code_out(workload_dir):
    """PYDTRACE_SCOPE (docs/scope.md) scopes these probes by the calling code: only calls made by
    code in scope fire, each exactly, and a call of C code out of scope is disabled at its location
    while the C function probes alone are wanted. The instance probes are not scoped: with them
    live, every class call still fires them, and nothing is disabled."""
    (workload_dir / "inscope.py").write_text(INSCOPE)
    inscope = str(workload_dir / "inscope.py")
    run = trace(SCOPED_WORKLOAD, SCOPED_PROGRAM, CFUNCTION_PROBES, workload_dir,
                env={"PYDTRACE_SCOPE": "inscope"}, tracer_env=SHORT_STRINGS)
    expected = {f"{inscope},math.sqrt": 150, f"{inscope},len": 150, f"{inscope},range": 1}
    assert run.maps["@entry"] == run.maps["@ret"] == expected, run.maps
    assert run.result["disables"] >= 2  # at least the out-of-scope math.sqrt and range() locations

    program = SCOPED_PROGRAM + 'usdt:{lib}:python:instance__new__start { @new[str(arg0)] = count(); }\n'
    run = trace(SCOPED_WORKLOAD, program, CFUNCTION_PROBES + ["instance-new-start"], workload_dir,
                env={"PYDTRACE_SCOPE": "inscope"}, tracer_env=SHORT_STRINGS)
    assert run.maps["@entry"] == run.maps["@ret"] == expected, run.maps
    assert run.maps["@new"] == {"Outside": 200, "K": 5}, run.maps
    assert run.result["disables"] == 0
