"""function-entry, function-return and line under a real bpftrace: exact counts and arguments."""

from __future__ import annotations

from tracing import trace

# arg1 is co_name, as CPython passes it; arg3, this provider's addition, is co_qualname.
ENTRY_RETURN = """
usdt:{lib}:python:function__entry /str(arg0) == "%(file)s"/ {
    @entry[str(arg1), arg2] = count();
    @entry_qualname[str(arg3)] = count();
    @depth[tid] = @depth[tid] + 1;
}
usdt:{lib}:python:function__return /str(arg0) == "%(file)s"/ {
    @ret[str(arg1), arg2] = count();
    @ret_qualname[str(arg3)] = count();
    @depth[tid] = @depth[tid] - 1;
}
"""

# bpftrace's JSON joins a map's keys with commas: "name,line".
def key(name: str, line: int) -> str:
    return f"{name},{line}"


def program(template: str, workload_dir) -> str:
    return template % {"file": str(workload_dir / "workload.py")}


def test_recursion_gives_exact_entries_and_returns(workload_dir):
    body = """
        def countdown(n):  # def-line
            if n == 0:
                return 0  # base-return
            return countdown(n - 1)  # recursive-return

        class Walker:
            def step(self, k):  # method-def
                return k + 1  # method-return

        def run(result):
            for _ in range(50):
                countdown(19)
            walker = Walker()
            for k in range(7):
                walker.step(k)
    """
    run = trace(body, program(ENTRY_RETURN, workload_dir), ["function-entry", "function-return"], workload_dir)
    w = run.workload
    # 50 calls of countdown(19) recurse 20 deep: 1000 entries and returns.
    assert run.count("entry", key("countdown", w.line_of("# def-line"))) == 1000
    assert run.count("ret", key("countdown", w.line_of("# base-return"))) == 50
    assert run.count("ret", key("countdown", w.line_of("# recursive-return"))) == 950
    # arg1 is co_name, as in CPython: a script filtering on "step" sees the method.
    assert run.count("entry", key("step", w.line_of("# method-def"))) == 7
    assert run.count("ret", key("step", w.line_of("# method-return"))) == 7
    # arg3 is co_qualname: the method shows as Class.method.
    assert run.count("entry_qualname", "Walker.step") == run.count("ret_qualname", "Walker.step") == 7
    assert run.count("entry_qualname", "countdown") == 1000
    # run() itself: one entry (its def line), one return.
    assert run.count("entry", key("run", w.line_of("def run("))) == 1
    # Entries and returns balance per thread (run's return is counted too).
    assert all(depth == 0 for depth in run.maps["@depth"].values()), run.maps["@depth"]
    assert sorted(w.live) == ["function-entry", "function-return"]


def test_generators_coroutines_and_exceptions_balance(workload_dir):
    body = """
        import asyncio, gc

        def numbers(n):
            for i in range(n):
                yield i  # yield-line

        def failing():
            raise ValueError("no")  # raise-line

        def catcher():
            try:
                failing()
            except ValueError:
                return 1

        def thrown_into():
            try:
                yield 1
            except KeyError:
                yield 2  # handled-throw

        async def leaf(i):
            await asyncio.sleep(0)
            return i

        async def main():
            return sum([await leaf(i) for i in range(5)])

        async def agen():
            for i in range(3):
                yield i

        async def consume():
            return [i async for i in agen()]

        def run(result):
            result["sum"] = sum(numbers(10))
            for _ in range(4):
                catcher()
            g = thrown_into()
            next(g)
            g.throw(KeyError)
            g.close()
            result["main"] = asyncio.run(main())
            result["agen"] = asyncio.run(consume())
            gc.collect()  # finalize any leftover frame now, while the consumer counts, not while it prints
    """
    run = trace(body, program(ENTRY_RETURN, workload_dir), ["function-entry", "function-return"], workload_dir)
    w = run.workload
    # numbers(10): one start, 10 resumes (entries); 10 yields and one return.
    numbers_entries = sum(v for k, v in run.maps["@entry"].items() if k.startswith("numbers,"))
    numbers_returns = sum(v for k, v in run.maps["@ret"].items() if k.startswith("numbers,"))
    assert numbers_entries == numbers_returns == 11
    assert run.count("ret", key("numbers", w.line_of("# yield-line"))) == 10
    # A resume enters at the line it resumes at: the yield.
    assert run.count("entry", key("numbers", w.line_of("# yield-line"))) == 10
    # An exception unwinds failing() at the raise line.
    assert run.count("ret", key("failing", w.line_of("# raise-line"))) == 4
    # A throw into a generator enters it (PY_THROW) at the suspended yield.
    assert run.count("ret", key("thrown_into", w.line_of("# handled-throw"))) == 1
    for name in ("leaf", "main", "agen", "consume"):
        entries = sum(v for k, v in run.maps["@entry"].items() if k.startswith(name + ","))
        returns = sum(v for k, v in run.maps["@ret"].items() if k.startswith(name + ","))
        assert entries == returns > 0, name
    assert all(depth == 0 for depth in run.maps["@depth"].values()), run.maps["@depth"]
    assert run.result == {"sum": 45, "main": 10, "agen": [0, 1, 2]}


def test_line_probe_sees_each_line_of_a_loop(workload_dir):
    body = """
        def loop(n):
            total = 0  # line-a
            for i in range(n):  # line-b
                total += i  # line-c
            return total  # line-d

        def run(result):
            result["total"] = loop(25)
    """
    lines = """
    usdt:{lib}:python:line /str(arg0) == "%(file)s" && str(arg1) == "loop"/ { @line[arg2] = count(); }
    """
    run = trace(body, program(lines, workload_dir), ["line"], workload_dir)
    w = run.workload
    got = {int(k): v for k, v in run.maps["@line"].items()}
    assert got == {
        w.line_of("# line-a"): 1,
        # The for line runs once per iteration and once more to end the loop.
        w.line_of("# line-b"): 26,
        w.line_of("# line-c"): 25,
        w.line_of("# line-d"): 1,
    }
    assert w.live == ["line"]


def test_probes_are_off_again_after_detach(workload_dir):
    body = """
        def run(result):
            pass
    """
    run = trace(body, program(ENTRY_RETURN, workload_dir), ["function-entry", "function-return"], workload_dir)
    idle = run.workload.idle
    assert idle["enabled"] == []
    assert idle["events"] == [0] * 6
    assert "pydtrace_gc" not in idle["gc_callbacks"]
    assert idle["tool"] in (3, 4)


def test_odd_names_are_passed_whole_or_lossily_never_crash(workload_dir):
    body = """
        def run(result):
            ns = {}
            exec(compile("def f():\\n    return 1\\n", "odd\\udcff-file.py", "exec"), ns)
            for _ in range(3):
                ns["f"]()
            long_name = "g" * 50000
            exec(compile(f"def {long_name}():\\n    return 2\\n", "<long>", "exec"), ns)
            for _ in range(2):
                ns[long_name]()
            exec(compile("def caf\\u00e9():\\n    return 3\\n", "na\\u00efve.py", "exec"), ns)
            ns["caf\\u00e9"]()
            f = ns["f"]
            f.__code__ = f.__code__.replace(co_name="bad\\ud800name", co_qualname="worse\\udfffname",
                                            co_filename="<nul\\x00cut>")
            f()
            exec("def h(): return 4\\nh()", ns)
    """
    program = """
    usdt:{lib}:python:function__entry { @entry[str(arg0), str(arg1)] = count(); @qualname[str(arg3)] = count(); }
    usdt:{lib}:python:function__return { @ret[str(arg0), str(arg1)] = count(); }
    """
    # Two strings as a map key must fit the BPF stack: 100 bytes each.
    run = trace(body, program, ["function-entry", "function-return"], workload_dir,
                tracer_env={"BPFTRACE_STRLEN": "100"})
    entries = run.maps["@entry"]
    returns = run.maps["@ret"]
    replacement = "\ufffd"
    assert entries[f"odd{replacement}-file.py,f"] == returns[f"odd{replacement}-file.py,f"] == 3
    # bpftrace reads at most BPFTRACE_STRLEN bytes: the 50000-character name arrives cut.
    long_keys = [k for k in entries if k.startswith("<long>,g")]
    assert len(long_keys) == 1 and entries[long_keys[0]] == 2
    assert entries["na\u00efve.py,caf\u00e9"] == 1
    assert entries[f"<nul,bad{replacement}name"] == 1
    assert run.maps["@qualname"][f"worse{replacement}name"] == 1
    assert entries["<string>,h"] == 1


def test_entry_line_is_the_first_instructions_line_as_in_cpython(workload_dir):
    body = '''
        import functools

        SOURCE = (
            "def plain():\\n"          # line 1
            "    return 1\\n"
            "@functools.cache\\n"      # line 3
            "def decorated():\\n"
            "    return 2\\n"
            "def outer():\\n"          # line 6
            "    x = 1\\n"
            "    def inner():\\n"      # line 8
            "        return x\\n"
            "    return inner()\\n"
            "plain(); decorated(); outer()\\n"
        )

        def run(result):
            exec(compile(SOURCE, "<entry-lines>", "exec"), {"functools": functools})
    '''
    program = """
    usdt:{lib}:python:function__entry /str(arg0) == "<entry-lines>"/ { @entry[str(arg1), arg2] = count(); }
    """
    run = trace(body, program, ["function-entry"], workload_dir)
    # A module enters at line 0, a function at its def line (a decorated one at its decorator),
    # a function with a cell at co_firstlineno (its first instruction has no line).
    assert run.maps["@entry"] == {
        "<module>,0": 1, "plain,1": 1, "decorated,3": 1, "outer,6": 1, "inner,8": 1,
    }
