"""import-find-load-start/done and audit under a real bpftrace: exact counts and arguments."""

from __future__ import annotations

from tracing import trace

IMPORT_PROGRAM = """
usdt:{lib}:python:import__find__load__start /strncmp(str(arg0), "pdtpkg", 6) == 0 || str(arg0) == "pdt_missing"/ {
    @start[str(arg0)] = count();
}
usdt:{lib}:python:import__find__load__done /strncmp(str(arg0), "pdtpkg", 6) == 0 || str(arg0) == "pdt_missing"/ {
    @done[arg1, str(arg0)] = count();
}
"""


def test_imports_give_start_and_done_with_the_found_flag(workload_dir):
    package = workload_dir / "pdtpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "sub.py").write_text("from . import leaf\n")
    (package / "leaf.py").write_text("VALUE = 1\n")
    (package / "other.py").write_text("")
    body = """
        import importlib

        def run(result):
            import pdtpkg.sub
            importlib.import_module("pdtpkg")  # loaded already: no find, no load
            importlib.import_module("pdtpkg.other")
            try:
                import pdt_missing
            except ImportError:
                result["missing"] = True
    """
    run = trace(body, IMPORT_PROGRAM, ["import-find-load-start", "import-find-load-done"], workload_dir)
    assert run.result == {"missing": True}
    assert run.maps["@start"] == {"pdtpkg": 1, "pdtpkg.sub": 1, "pdtpkg.leaf": 1, "pdtpkg.other": 1, "pdt_missing": 1}
    assert run.maps["@done"] == {
        "1,pdtpkg": 1,
        "1,pdtpkg.sub": 1,
        "1,pdtpkg.leaf": 1,
        "1,pdtpkg.other": 1,
        "0,pdt_missing": 1,
    }
    # After detach the interpreter calls its own _find_and_load again.
    assert run.workload.idle["find_and_load"] == "function"


AUDIT_PROGRAM = """
usdt:{lib}:python:audit /str(arg0) == "pydtrace.test"/ {
    @events = count();
    // arg1 is the address of the arguments tuple: its ob_size follows ob_refcnt and ob_type.
    @tuple_size[*(uint64 *)(arg1 + 16)] = count();
}
"""


def test_audit_events_fire_with_the_argument_tuple(workload_dir):
    body = """
        import sys

        def run(result):
            for i in range(7):
                sys.audit("pydtrace.test", i, "x")
            sys.audit("pydtrace.other")
    """
    run = trace(body, AUDIT_PROGRAM, ["audit"], workload_dir)
    assert run.count("events") == 7
    assert run.maps["@tuple_size"] == {"2": 7}
    assert run.workload.live == ["audit"]
    assert run.workload.idle["enabled"] == []
