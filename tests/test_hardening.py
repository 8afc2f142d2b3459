"""Threads, fork, shutdown, churn, other monitoring tools, hostile code, memory: under a real bpftrace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tracing import Bpftrace, STEP_TIMEOUT, require_tracer, trace

BALANCE = """
usdt:{lib}:python:function__entry /str(arg0) == "%(file)s"/ { @entry[str(arg1)] = count(); @depth[tid] = @depth[tid] + 1; }
usdt:{lib}:python:function__return /str(arg0) == "%(file)s"/ { @ret[str(arg1)] = count(); @depth[tid] = @depth[tid] - 1; }
"""
ENTRY_RETURN = ["function-entry", "function-return"]


def balance_program(directory) -> str:
    return BALANCE % {"file": str(directory / "workload.py")}


def test_many_threads_give_exact_balanced_counts(workload_dir):
    body = """
        import threading

        def leaf(n):
            return n + 1

        def worker(calls):
            for i in range(calls):
                leaf(i)

        def run(result):
            threads = [threading.Thread(target=worker, args=(2000,)) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    """
    run = trace(body, balance_program(workload_dir), ENTRY_RETURN, workload_dir)
    assert run.count("entry", "leaf") == run.count("ret", "leaf") == 16000
    assert run.count("entry", "worker") == run.count("ret", "worker") == 8
    depths = run.maps["@depth"]
    assert len(depths) >= 9 and all(d == 0 for d in depths.values()), depths


def test_a_forked_child_is_traced_by_its_own_pid_with_exact_counts(workload_dir):
    body = """
        def f(n):
            return n

        def run(result):
            for i in range(3000):
                f(i)
    """
    run = trace(body, balance_program(workload_dir), ENTRY_RETURN, workload_dir, fork_first=True)
    assert run.count("entry", "f") == run.count("ret", "f") == 3000
    assert run.workload.idle["events"] == [0] * 6


def test_multiprocessing_fork_and_spawn_work_beside_the_probes(workload_dir):
    body = """
        import multiprocessing, warnings

        def square(x):
            return x * x

        def run(result):
            warnings.simplefilter("error")
            for method in ("fork", "spawn"):
                with multiprocessing.get_context(method).Pool(2) as pool:
                    result[method] = sum(pool.map(square, range(10)))
    """
    run = trace(body, balance_program(workload_dir), ENTRY_RETURN, workload_dir)
    assert run.result == {"fork": 285, "spawn": 285}


def test_deep_recursion_and_thrown_exceptions_stay_balanced(workload_dir):
    body = """
        import asyncio, gc, sys

        def dive(n):
            return dive(n + 1)

        def gen():
            while True:
                try:
                    yield 1
                except KeyError:
                    pass

        async def sleeper():
            await asyncio.sleep(10)

        async def cancel_one():
            task = asyncio.ensure_future(sleeper())
            await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return "cancelled"

        def run(result):
            sys.setrecursionlimit(400)
            for _ in range(3):
                try:
                    dive(0)
                except RecursionError:
                    result["recursion"] = result.get("recursion", 0) + 1
            g = gen()
            next(g)
            for _ in range(5):
                g.throw(KeyError)
            g.close()
            result["cancel"] = asyncio.run(cancel_one())
            sys.monitoring.restart_events()  # another tool restarting events changes nothing
            dive.__code__  # still traced afterwards:
            try:
                dive(390)
            except RecursionError:
                pass
            gc.collect()  # finalize any leftover frame now, while the consumer counts, not while it prints
    """
    run = trace(body, balance_program(workload_dir), ENTRY_RETURN, workload_dir)
    assert run.result == {"recursion": 3, "cancel": "cancelled"}
    for name in ("dive", "gen", "sleeper", "cancel_one", "run"):
        assert run.count("entry", name) == run.count("ret", name) > 0, name
    assert all(d == 0 for d in run.maps["@depth"].values()), run.maps["@depth"]


def test_other_tools_keep_working_beside_the_probes(workload_dir):
    body = """
        import cProfile, pstats, sys

        def target(n):
            total = 0
            for i in range(n):
                total += i
            return total

        def run(result):
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(7):
                target(10)
            profiler.disable()
            stats = pstats.Stats(profiler).stats
            result["cprofile"] = [v[1] for k, v in stats.items() if k[2] == "target"]

            calls = []
            def tracer(frame, event, arg):
                if event == "call" and frame.f_code is target.__code__:
                    calls.append(event)
                return None
            sys.settrace(tracer)
            for _ in range(5):
                target(3)
            sys.settrace(None)
            result["settrace"] = len(calls)

            profiled = []
            sys.setprofile(lambda frame, event, arg: profiled.append(event) if frame.f_code is target.__code__ and event == "call" else None)
            for _ in range(4):
                target(3)
            sys.setprofile(None)
            result["setprofile"] = len(profiled)

            mon = sys.monitoring
            starts = []
            mon.use_tool_id(mon.DEBUGGER_ID, "test-debugger")
            mon.register_callback(mon.DEBUGGER_ID, mon.events.PY_START, lambda code, offset: starts.append(code.co_name) if code is target.__code__ else None)
            mon.set_events(mon.DEBUGGER_ID, mon.events.PY_START)
            for _ in range(6):
                target(3)
            mon.set_events(mon.DEBUGGER_ID, 0)
            mon.free_tool_id(mon.DEBUGGER_ID)
            result["monitoring"] = len(starts)
    """
    run = trace(body, balance_program(workload_dir), ENTRY_RETURN, workload_dir)
    assert run.result == {"cprofile": [7], "settrace": 5, "setprofile": 4, "monitoring": 6}
    assert run.count("entry", "target") == run.count("ret", "target") == 7 + 5 + 4 + 6


def test_coverage_measures_beside_the_probes(workload_dir):
    pytest.importorskip("coverage", reason="coverage.py is not installed (pip install coverage)")
    body = """
        import coverage, os

        def run(result):
            path = os.path.join(os.path.dirname(__file__), "measured.py")
            with open(path, "w") as f:
                f.write("def g(x):\\n    if x:\\n        return 1\\n    return 2\\n")
            cov = coverage.Coverage(data_file=None, include=[path])
            cov.start()
            import measured
            for _ in range(3):
                measured.g(1)
            cov.stop()
            result["lines"] = sorted(cov.get_data().lines(path))
    """
    run = trace(body, balance_program(workload_dir), ENTRY_RETURN, workload_dir)
    assert run.result == {"lines": [1, 2, 3]}


def test_without_a_free_tool_id_the_code_probes_warn_once_and_stay_off(workload_dir):
    require_tracer()
    body = """
        def run(result):
            pass
    """
    from tracing import Workload
    workload = Workload(body, ["gc-start"], workload_dir)
    # Take ids 3 and 4 before dtrace arms: through a .pth-like start-up file.
    (workload_dir / "sitecustomize.py").write_text(
        "import sys\nsys.monitoring.use_tool_id(3, 'other-a')\nsys.monitoring.use_tool_id(4, 'other-b')\n"
    )
    workload.env = {"PYTHONPATH": str(workload_dir)}
    workload.start()
    tracer = Bpftrace(
        "usdt:{lib}:python:function__entry { @e = count(); } usdt:{lib}:python:gc__start { @g = count(); }",
        workload.pid,
        workload.library,
    )
    try:
        tracer.start()
        workload.go()
        workload.wait_result()
        tracer.stop()
        assert workload.finish() == 0
    finally:
        tracer.kill()
        workload.kill()
    assert workload.live == ["gc-start"]  # the code probe could not be armed; gc could
    assert tracer.maps.get("@e", 0) == 0
    warnings = [line for line in workload.stderr_text.splitlines() if "tool ids 3 and 4 are both in use" in line]
    assert len(warnings) == 1, workload.stderr_text


def test_names_cache_keeps_no_code_object_alive(workload_dir):
    body = """
        import gc, dtrace

        def run(result):
            gc.collect()
            before = dtrace._native._testing.name_cache_entries()
            for i in range(3000):
                namespace = {}
                exec(compile(f"def fn_{i}():\\n    return {i}\\n", f"<gen-{i}>", "exec"), namespace)
                namespace[f"fn_{i}"]()
                del namespace
            gc.collect()
            result["grown"] = dtrace._native._testing.name_cache_entries() - before
    """
    program = 'usdt:{lib}:python:function__entry /strncmp(str(arg0), "<gen-", 5) == 0/ { @gen = count(); }'
    run = trace(body, program, ["function-entry"], workload_dir)
    assert run.count("gen") == 6000  # each <gen-i>: the module code and fn_i
    # Every generated code object is gone, and its cache entry with it.
    assert run.result["grown"] <= 5


def run_script(code: str, **env) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYDTRACE")}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=environment, timeout=STEP_TIMEOUT)


@pytest.mark.parametrize("how", ["return", "sys.exit"])
def test_exit_with_a_consumer_attached_and_threads_running_is_clean(how):
    """The main thread ends while other threads call traced functions under bpftrace."""
    require_tracer()
    code = f"""
        import os, sys, threading, time
        import dtrace
        print(os.getpid(), dtrace.library_path(), flush=True)
        sys.stdin.readline()
        assert dtrace.wait_for_consumer(*dtrace.probe_names(), timeout=30)
        def spin(stop_after):
            deadline = time.monotonic() + stop_after
            while time.monotonic() < deadline:
                sum(range(10))
        for _ in range(3):
            threading.Thread(target=spin, args=(30,), daemon=True).start()
        for _ in range(2):
            threading.Thread(target=spin, args=(0.3,)).start()
        {"sys.exit(3)" if how == "sys.exit" else "os.environ['DONE'] = '1'"}
    """
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYDTRACE")}
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    pid, library = process.stdout.readline().split()
    # Every probe attached while the interpreter shuts down: class deallocation, imports,
    # audit events and collections all go on during finalization.
    tracer = Bpftrace("\n".join(f"usdt:{{lib}}:python:{name.replace('-', '__')} {{ @{name.replace('-', '_')} = count(); }}"
                                for name in dtrace_probe_names()), int(pid), library)
    try:
        tracer.start()
        process.stdin.write("go\n")
        process.stdin.flush()
        code = process.wait(STEP_TIMEOUT)
        stderr = process.stderr.read()
        tracer.stop()
    finally:
        tracer.kill()
        if process.poll() is None:
            process.kill()
    assert code == (3 if how == "sys.exit" else 0), stderr
    assert "Fatal" not in stderr and "Traceback" not in stderr, stderr
    assert tracer.maps.get("@function_entry", 0) > 0
    assert tracer.maps.get("@instance_delete_start", 0) == tracer.maps.get("@instance_delete_done", 0) > 0


def dtrace_probe_names() -> tuple[str, ...]:
    import dtrace
    return dtrace.probe_names()


def test_attach_detach_churn_while_the_workload_runs():
    """Consumers come and go many times; events are live while attached and off after."""
    require_tracer()
    code = """
        import json, os, sys, threading, time, gc
        import dtrace
        print(os.getpid(), dtrace.library_path(), flush=True)
        stop = threading.Event()
        def busy():
            def f(x):
                return x
            while not stop.is_set():
                for i in range(1000):
                    f(i)
        worker = threading.Thread(target=busy)
        worker.start()
        for line in sys.stdin:
            command = line.strip()
            if command == "attached":
                ok = dtrace.wait_for_consumer("function-entry", "gc-start", timeout=30)
                print(json.dumps({"live": ok}), flush=True)
            elif command == "detached":
                deadline = time.monotonic() + 30
                while dtrace.enabled_probes() and time.monotonic() < deadline:
                    time.sleep(0.005)
                tool = dtrace._native._testing.monitoring_tool_id()
                print(json.dumps({"idle": not dtrace.enabled_probes(),
                                  "events": sys.monitoring.get_events(tool) if tool is not None else 0,
                                  "gc": [getattr(c, "__name__", "") for c in gc.callbacks]}), flush=True)
            elif command == "sabotage":  # another tool frees our id between two consumers
                sys.monitoring.free_tool_id(dtrace._native._testing.monitoring_tool_id())
                print(json.dumps({"freed": sys.monitoring.get_tool(4) is None}), flush=True)
            elif command == "quit":
                break
        stop.set()
        worker.join()
    """
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYDTRACE")}
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    pid, library = process.stdout.readline().split()

    def say(word: str) -> dict:
        process.stdin.write(word + "\n")
        process.stdin.flush()
        return json.loads(process.stdout.readline())

    try:
        for round_number in range(12):
            tracer = Bpftrace("usdt:{lib}:python:function__entry { @e = count(); } usdt:{lib}:python:gc__start { @g = count(); }",
                              int(pid), library)
            tracer.start()
            assert say("attached") == {"live": True}
            tracer.stop()
            assert tracer.maps.get("@e", 0) > 0
            assert say("detached") == {"idle": True, "events": 0, "gc": []}
            if round_number == 5:
                assert say("sabotage") == {"freed": True}
        process.stdin.write("quit\n")
        process.stdin.close()
        assert process.wait(STEP_TIMEOUT) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_sub_interpreters_get_available_false_and_do_not_crash():
    module = "_interpreters" if sys.version_info >= (3, 13) else "_xxsubinterpreters"
    result = run_script(
        f"""
        import {module} as interpreters
        import dtrace
        interp = interpreters.create()
        interpreters.run_string(interp, "import dtrace; assert dtrace.available is False, dtrace.unavailable_reason; assert dtrace.wait_for_consumer(timeout=0) is False")
        interpreters.destroy(interp)
        print("ok", dtrace.available)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "True"]


def test_the_child_of_a_traced_parent_goes_idle_by_itself(workload_dir):
    # docs/decisions.md, 8: the child inherits the parent's raised semaphores until its first
    # probe hit, when the kernel drops them; then it must switch its hooks off.
    body = """
        import json, os, time, dtrace

        def f(x):
            return x

        def run(result):
            read_end, write_end = os.pipe()
            child = os.fork()
            if child == 0:
                os.close(read_end)
                inherited = sorted(dtrace.enabled_probes())
                deadline = time.monotonic() + 20
                while dtrace.enabled_probes() and time.monotonic() < deadline:
                    for i in range(100):
                        f(i)
                    time.sleep(0.005)
                os.write(write_end, json.dumps({"inherited": inherited, "idle": not dtrace.enabled_probes()}).encode())
                os._exit(0)
            os.close(write_end)
            with os.fdopen(read_end) as pipe:
                result.update(json.loads(pipe.read()))
            os.waitpid(child, 0)
            for i in range(10):
                f(i)
    """
    run = trace(body, balance_program(workload_dir), ENTRY_RETURN, workload_dir)
    # The child starts with the parent's probes live (unless it was slow enough to have gone
    # idle already before it looked), and is idle in the end.
    assert run.result["inherited"] in (["function-entry", "function-return"], [])
    assert run.result["idle"] is True
    # The consumer traced the parent only: its own ten calls (and none of the child's).
    assert run.count("entry", "f") == run.count("ret", "f") == 10
