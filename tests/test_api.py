"""The Python surface of dtrace, without a tracer: availability, names, arming by environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

import dtrace


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter of this environment, with PYDTRACE* taken from ``env`` only."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYDTRACE")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environment, timeout=60
    )


def test_available_here():
    assert dtrace.available is True
    assert dtrace.unavailable_reason is None


def test_probe_names_are_the_providers_in_dtrace_spelling():
    assert dtrace.probe_names() == (
        "function-entry",
        "function-return",
        "line",
        "gc-start",
        "gc-done",
        "instance-new-start",
        "instance-new-done",
        "instance-delete-start",
        "instance-delete-done",
        "import-find-load-start",
        "import-find-load-done",
        "audit",
        "cfunction-entry",
        "cfunction-return",
        "aggregate-calls",
        "aggregate-time",
        "aggregate-lines",
        "aggregate-node",
        "aggregate-flush",
    )


def test_library_path_is_the_loaded_extension():
    path = dtrace.library_path()
    assert path is not None and os.path.isfile(path)
    assert os.path.basename(path).startswith("_native.")
    assert path == dtrace._native.__file__


def test_the_test_hooks_are_in_the_testing_submodule_built_on_first_use():
    """The hooks of tests and benchmarks are in ``_native._testing``, not in the public module,
    and ``_native.pyi`` documents exactly those; ``import dtrace`` does not build the submodule."""
    import ast
    from pathlib import Path

    stub = ast.parse((Path(dtrace.__file__).parent / "_native.pyi").read_text())
    testing_stub = next(n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == "_Testing")
    stubbed = {n.name for n in testing_stub.body if isinstance(n, ast.FunctionDef)}
    public = {n.name for n in stub.body if isinstance(n, ast.FunctionDef)}
    done = run_python("""
        import json, dtrace
        built = "_testing" in vars(dtrace._native)
        from dtrace._native import _testing
        print(json.dumps([built, _testing.__name__, _testing.__all__, dtrace._native.__all__,
                          dtrace._native._testing is _testing]))
    """, PYDTRACE="0")
    assert done.returncode == 0, done.stderr
    built, name, hooks, native_all, same = json.loads(done.stdout)
    assert (built, name, same) == (False, "dtrace._native._testing", True)
    assert set(hooks) == stubbed and {"scope_stats", "watcher_stats", "noop_callback"} <= stubbed
    assert not set(hooks) & set(native_all)
    assert not set(hooks) & public
    assert {n for n in native_all if n.islower() and not n.startswith("_")} == public


def test_nothing_is_enabled_without_a_consumer():
    assert dtrace.enabled_probes() == frozenset()
    assert dtrace._native.consumer_probes() == frozenset()


def test_wait_for_consumer_times_out_with_false():
    assert dtrace.wait_for_consumer("function-entry", timeout=0.05) is False
    assert dtrace.wait_for_consumer(timeout=0) is False


def test_wait_for_consumer_rejects_unknown_probes_with_the_list_of_known_ones():
    with pytest.raises(ValueError) as error:
        dtrace.wait_for_consumer("function-entry", "function_entry", timeout=0)
    assert str(error.value) == (
        'unknown probe "function_entry": provider python has function-entry, function-return, line, '
        "gc-start, gc-done, instance-new-start, instance-new-done, instance-delete-start, "
        "instance-delete-done, import-find-load-start, import-find-load-done, audit, cfunction-entry, "
        "cfunction-return, aggregate-calls, aggregate-time, aggregate-lines, aggregate-node, aggregate-flush"
    )


def test_wait_for_consumer_takes_the_provider_files_spelling_too():
    assert dtrace.wait_for_consumer("gc__start", timeout=0) is False


@pytest.mark.parametrize("timeout", [-1.0, float("nan")])
def test_wait_for_consumer_rejects_a_bad_timeout(timeout):
    with pytest.raises(ValueError, match="timeout must be a non-negative number of seconds or None"):
        dtrace.wait_for_consumer(timeout=timeout)


def test_importing_arms_and_idles():
    result = run_python(
        """
        import gc, json, sys
        import dtrace
        print(json.dumps({
            "armed": dtrace._native.is_armed(),
            "tools": [sys.monitoring.get_tool(i) for i in range(6)],
            "events": [sys.monitoring.get_events(i) for i in range(6)],
            "gc": [getattr(c, "__name__", "") for c in gc.callbacks],
            "enabled": sorted(dtrace.enabled_probes()),
        }))
        """
    )
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    # Armed, but before any consumer: no tool id, no event, no gc callback.
    assert state == {"armed": True, "tools": [None] * 6, "events": [0] * 6, "gc": [], "enabled": []}


def test_pydtrace_0_keeps_the_probes_disarmed():
    result = run_python(
        """
        import dtrace
        print(dtrace.available, dtrace._native.is_armed(), dtrace.wait_for_consumer(timeout=None))
        """,
        PYDTRACE="0",
    )
    assert result.returncode == 0, result.stderr
    # available stays True; waiting returns False at once instead of forever.
    assert result.stdout.split() == ["True", "False", "False"]


@pytest.mark.parametrize(("setting", "imported"), [("1", True), ("", False), ("0", False)])
def test_pth_file_imports_dtrace_only_under_pydtrace_1(setting, imported):
    result = run_python(
        "import sys; print('dtrace' in sys.modules)",
        **({"PYDTRACE": setting} if setting else {}),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(imported)


def test_forced_probes_are_live_without_a_consumer():
    result = run_python(
        """
        import dtrace
        print(dtrace.wait_for_consumer("function-entry", "line", timeout=10), sorted(dtrace.enabled_probes()))
        """,
        PYDTRACE_FORCE="function-entry,line",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True ['function-entry', 'line']"


def test_a_bad_force_list_warns_and_arms_nothing_forced():
    result = run_python(
        "import dtrace; print(sorted(dtrace.enabled_probes()), dtrace._native.is_armed())",
        PYDTRACE_FORCE="function-entry,nonsense",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] True"
    assert 'PYDTRACE_FORCE ignored: unknown probe "nonsense"' in result.stderr


def test_fork_does_not_warn_and_the_child_rearms():
    # 3.12+ warns (DeprecationWarning) when a process with other threads forks:
    # the watcher thread must be out of the way at that moment.
    result = run_python(
        """
        import os, sys, warnings
        warnings.simplefilter("error")
        import dtrace
        pid = os.fork()
        if pid == 0:
            os._exit(0 if dtrace._native.is_armed() else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), dtrace._native.is_armed())
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "True"]
    assert result.stderr == ""


def test_the_watcher_takes_no_gil_while_nothing_changes():
    result = run_python(
        """
        import time, dtrace
        polls, taken, _ = dtrace._native._testing.watcher_stats()
        while dtrace._native._testing.watcher_stats()[0] < polls + 5:  # five more reads of the semaphores
            time.sleep(0.01)
        print(dtrace._native._testing.watcher_stats()[1] - taken)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


def test_exit_with_the_watcher_running_is_clean():
    result = run_python(
        """
        import sys, threading, dtrace
        def spin():
            while True:
                sum(range(100))
        threading.Thread(target=spin, daemon=True).start()
        sys.exit(7)
        """
    )
    assert result.returncode == 7
    assert result.stderr == ""


def test_an_internal_error_switches_the_probe_off_and_warns_once():
    result = run_python(
        """
        import time, warnings
        import dtrace
        assert dtrace.wait_for_consumer("line", timeout=10)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dtrace._native._testing.report_internal_error("line", "test failure")
            dtrace._native._testing.report_internal_error("line", "test failure again")
        print(len(caught), caught[0].category.__name__, caught[0].message)
        deadline = time.monotonic() + 10
        while "line" in dtrace.enabled_probes() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert dtrace.enabled_probes() == frozenset(), dtrace.enabled_probes()
        """,
        PYDTRACE_FORCE="line",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1 RuntimeWarning pydtrace: probe line switched off: test failure"


def test_an_internal_error_under_warnings_as_errors_is_printed_not_raised():
    result = run_python(
        """
        import dtrace
        dtrace._native._testing.report_internal_error("gc-start", "test failure")
        print("still running")
        """,
        PYTHONWARNINGS="error",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "still running"
    assert "pydtrace: probe gc-start switched off: test failure" in result.stderr


def test_wait_for_consumer_is_false_at_once_for_a_probe_never_armed_here():
    """A probe this build cannot arm (dtrace._native.UNSUPPORTED_PROBES): no wait. A probe the
    interpreter declares itself (built --with-dtrace) is armable too: the module fires it while
    the interpreter's copy is off. On 3.12 to 3.15 every probe is armable (the instance-delete
    probes are checked against all four)."""
    never = set(dtrace.probe_names()) - set(dtrace._native.ARMABLE_PROBES)
    assert never == set(dtrace._native.UNSUPPORTED_PROBES)
    if sys.version_info[:2] <= (3, 15):
        assert never == set()
    for name in sorted(never):
        started = time.monotonic()
        assert dtrace.wait_for_consumer(name, timeout=30) is False, name
        assert time.monotonic() - started < 5, name
