"""Building the extension: a build for a Python it cannot support stops with a message that says
what it needs (build.rs), not a Rust compile error deep in the code."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def old_python() -> str | None:
    """A CPython older than 3.12 on this machine, if there is one."""
    candidates = [shutil.which(name) for name in ("python3.11", "python3.10")]
    candidates += sorted(str(p) for p in Path(os.path.expanduser("~/.pyenv/versions")).glob("3.1[01].*/bin/python3.1[01]"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def test_a_build_for_python_3_11_says_it_needs_3_12():
    """What `maturin build -i python3.11` (or `pip install .` under 3.11, past pip's own check)
    prints: the build script stops with the message. Run as cargo check with PYO3_PYTHON, which is
    how maturin names the interpreter to PyO3, in a target folder of its own (the real builds'
    artifacts stay as they are; a second run takes seconds)."""
    if shutil.which("cargo") is None:
        pytest.skip("building needs cargo (Rust)")
    if not (ROOT / "Cargo.toml").exists():
        pytest.skip("not a checkout")
    python = old_python()
    if python is None:
        pytest.skip("no Python older than 3.12 here to build for")
    env = {**os.environ, "PYO3_PYTHON": python, "CARGO_TARGET_DIR": str(ROOT / "target" / "old-python-check")}
    done = subprocess.run(["cargo", "check", "--lib", "--quiet"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200, env=env)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "pydtrace-rs needs CPython 3.12 or later (it is built on sys.monitoring, PEP 669); this build is for " \
           "CPython 3.1" in output, output[-3000:]
    assert "PyErr_GetRaisedException" not in output  # stopped before the crate's code is compiled
