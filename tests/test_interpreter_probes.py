"""The tools on an interpreter that fires some probes itself (CPython 3.15 built --with-dtrace
fires function__entry/function__return, with three arguments): the clauses the tools' programs
get for the interpreter's probes (python/dtrace/tools/interpreter.py).

No such interpreter can be had here. What is tested: the program generation on every bundled
script; that the generated programs pass bpftrace's own check with Debian's python3.11 (built
--with-dtrace: its function probes have CPython's three arguments) standing in for the
interpreter, where a clause reading arg3 on its probe fails that check; and the detection of the
interpreter's probes in a running --with-dtrace interpreter (python3.11 again).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dtrace
from dtrace.tools import elfnotes, interpreter, programs
from tracing import STEP_TIMEOUT, require_tracer

SCRIPTS = Path(dtrace.__file__).parent / "scripts"
LIBRARY = dtrace.library_path()
PYTHON315 = "/usr/bin/python3.15"  # a name only: programs are generated, not run, with it
#: What a CPython 3.15 built --with-dtrace fires itself.
FIRED_BY_315 = {name: PYTHON315 for name in (
    "function__entry", "function__return", "gc__start", "gc__done",
    "import__find__load__start", "import__find__load__done", "audit")}
#: Debian's python3.11, built --with-dtrace: a real object with CPython's three-argument probes.
STAND_IN = "/usr/bin/python3.11"


def stand_in_reason() -> str | None:
    obj = elfnotes.read(STAND_IN) if os.path.exists(STAND_IN) else None
    names = {p.name for p in obj.probes if p.provider == "python"} if obj else set()
    if not {"function__entry", "function__return"} <= names:
        return f"{STAND_IN} (Debian's python3.11, built --with-dtrace) is not installed here"
    return None


def code(text: str) -> str:
    return programs.mask(text)


@pytest.mark.parametrize("script", sorted(SCRIPTS.glob("*.bt")), ids=lambda p: p.name)
def test_every_clause_on_an_interpreters_probe_gets_a_copy_reading_arg1(script):
    text = script.read_text()
    extended = interpreter.extend(text, LIBRARY, FIRED_BY_315)
    original, generated = programs.clauses(text), programs.clauses(extended)
    copies = [c for c in generated if PYTHON315 in c.attach_points[0].text]
    own = [c for c in generated if PYTHON315 not in c.attach_points[0].text]
    assert len(own) == len(original)
    for before, after in zip(original, own):
        probe = programs.usdt(before.attach_points[0])
        body_before, body_after = text[before.attach_points[-1].end:before.end], extended[after.attach_points[-1].end:after.end]
        assert body_before == body_after, script.name  # the clause itself is unchanged...
        if probe is not None and probe.name in FIRED_BY_315:
            # ... but bound to the probe object, so that it never reads the interpreter's arg3,
            assert after.attach_points[0].text == f"usdt:{LIBRARY}:python:{probe.name}"
            # and followed by its copy on the interpreter's probe, which reads arg1 for arg3.
            copy = generated[generated.index(after) + 1]
            assert copy.attach_points[0].text == f"usdt:{PYTHON315}:python:{probe.name}"
            body_copy = extended[copy.attach_points[-1].end:copy.end]
            assert "arg3" not in code(body_copy)
            assert body_copy == re.sub(r"\barg3\b", "arg1", body_after)
        else:
            assert after.attach_points[0].text == before.attach_points[0].text
    assert len(copies) == sum(1 for c in original if (p := programs.usdt(c.attach_points[0])) and p.name in FIRED_BY_315)
    # Without an interpreter's probes the program is the file.
    assert interpreter.extend(text, LIBRARY, {}) == text


def test_function_tools_read_arg3_and_their_copies_do_not():
    for name in ("calls", "flow", "flame", "where"):
        extended = interpreter.extend((SCRIPTS / f"{name}.bt").read_text(), LIBRARY, FIRED_BY_315)
        assert PYTHON315 in extended and "arg3" in code(extended), name


def test_a_string_or_comment_mentioning_arg3_is_left_alone():
    text = 'usdt::python:function__entry { printf("arg3=%s\\n", str(arg3)); } // arg3\n'
    extended = interpreter.extend(text, "/lib.so", {"function__entry": "/py"})
    # The copy follows the clause's closing brace.
    assert extended == ('usdt:/lib.so:python:function__entry { printf("arg3=%s\\n", str(arg3)); }\n\n'
                        'usdt:/py:python:function__entry { printf("arg3=%s\\n", str(arg1)); } // arg3\n')


@pytest.mark.parametrize("name", ["calls", "flow", "flame", "where"])
def test_generated_programs_pass_bpftrace_check_on_a_three_argument_interpreter(name):
    require_tracer()
    reason = stand_in_reason()
    if reason:
        pytest.skip(reason)
    fired = {"function__entry": STAND_IN, "function__return": STAND_IN}
    extended = interpreter.extend((SCRIPTS / f"{name}.bt").read_text(), LIBRARY, fired)
    # -p would resolve usdt::python:line (where) in a process; here the object is named instead.
    extended = extended.replace("usdt::python:", f"usdt:{LIBRARY}:python:")
    assert check(extended) == [], name
    # The fallback matters: reading arg3 on the interpreter's probe fails the same check.
    broken = re.sub(rf"(usdt:{re.escape(STAND_IN)}:python:function__entry[^{{]*{{)",
                    r"\1 @broken = str(arg3);", extended, count=1)
    assert broken != extended
    assert any("argument 3" in error for error in check(broken)), name


def check(program: str) -> list[str]:
    done = subprocess.run(["bpftrace", "-d", "-e", program, str(os.getpid())], capture_output=True, text=True,
                          env={**os.environ, "BPFTRACE_STRLEN": "160"}, timeout=STEP_TIMEOUT)
    return [line for line in done.stderr.splitlines() if "ERROR" in line and "RLIMIT_MEMLOCK" not in line]


def test_declared_finds_the_probes_of_a_with_dtrace_interpreter():
    reason = stand_in_reason()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYDTRACE"))}
    process = subprocess.Popen([STAND_IN, "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout.readline() == "up\n"
        found = interpreter.declared(process.pid, LIBRARY)
        program, waited = interpreter.adapt((SCRIPTS / "calls.bt").read_text(), ["function-entry"],
                                            process.pid, LIBRARY, "bt")
    finally:
        process.kill()
        process.wait()
    assert found["function__entry"] == found["function__return"] == found["gc__start"] == STAND_IN
    # A command is not held for the probes the interpreter fires; the program gets their copies.
    assert waited == []
    assert f"usdt:{STAND_IN}:python:function__entry" in program


def test_an_interpreter_without_probes_changes_nothing():
    # This interpreter (not built --with-dtrace, or built so without function probes before 3.15)
    program = (SCRIPTS / "calls.bt").read_text()
    declared = interpreter.declared(os.getpid(), LIBRARY)
    assert not {"function__entry", "function__return"} & set(declared)
    if not declared:
        assert interpreter.adapt(program, ["function-entry"], os.getpid(), LIBRARY, "bt") == (program, ["function-entry"])
    assert interpreter.adapt(program, ["function-entry"], os.getpid(), LIBRARY, "d") == (program, ["function-entry"])
    assert sys.version_info >= (3, 12)
