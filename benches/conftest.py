"""pytest-benchmark set-up for the benchmarks: see harness.py for how a figure is measured.

``pytest benches --benchmark-only`` runs them all (about 5 minutes per Python
here); ``PYDTRACE_BENCH_QUICK=1`` (or ``--bench-quick``) runs fewer, shorter
rounds. ``python benches/report.py`` runs them and writes BENCHMARKS.md.
"""

from __future__ import annotations

import os


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true", default=False,
                     help="pydtrace benchmarks: fewer and shorter rounds (as PYDTRACE_BENCH_QUICK=1)")


def pytest_configure(config):
    if config.getoption("--bench-quick", default=False):
        os.environ["PYDTRACE_BENCH_QUICK"] = "1"
        import harness

        harness.QUICK = True


def pytest_terminal_summary(terminalreporter):
    import analysis
    import harness

    if not harness.RESULTS:
        return
    terminalreporter.section("pydtrace-rs: cost per event (ns) and ratios")
    for line in analysis.summary_lines(analysis.Results(harness.RESULTS)):
        terminalreporter.write_line(line)
