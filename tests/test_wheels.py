"""Checks on the release artifacts in dist/ (``scripts/dev wheels``), not on the build tree.

What ships is what users trace, so each check opens the wheels and the sdist themselves:

- each wheel's metadata, tags and shared object agree (version from Cargo.toml, CPython
  version-specific tags, not abi3: docs/packaging.md says why);
- ``auditwheel show`` accepts every wheel as manylinux_2_17 (manylinux2014);
- ``readelf -n`` on each wheel's shared object shows every probe of provider ``python`` of
  provider/pydtrace.d once, with a non-zero, even semaphore in ``.probes``, a non-zero base that
  is ``.stapsdt.base``, a nop at the probe site and argument sizes that match the provider file;
- each note's location, less its base, is the probe site's file offset less ``.stapsdt.base``'s
  file offset: perf and SystemTap place their uprobes by that arithmetic, bcc and bpftrace by the
  program headers, and both must land on the nop;
- the aarch64 argument strings name registers as bcc, libbpf (and so bpftrace) parse them;
- the sdist builds and installs into a fresh venv with no index and no reachable crates.io (in a
  network namespace without interfaces where this runs as root), and imports with
  ``dtrace.available`` True;
- the wheel for this machine and this Python, installed into a fresh venv, passes the tracer
  tests of tests/test_code_probes.py there.

Every test skips, with the reason, when dist/ holds no artifacts or a tool is missing;
``PYDTRACE_REQUIRE_WHEELS=1`` (set by ``scripts/dev wheels-check`` and CI) makes those skips
failures. The tracer test also follows ``PYDTRACE_REQUIRE_TRACER`` (tests/tracing.py).
``PYDTRACE_DIST`` names another folder of artifacts.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tracing import noted_arguments, require_tracer

REPO = Path(__file__).resolve().parent.parent
DIST = Path(os.environ.get("PYDTRACE_DIST", REPO / "dist"))
#: The build backend's wheels that ``scripts/dev wheels`` downloads, for installing the sdist offline.
BUILD_WHEELHOUSE = REPO / "target" / "build-wheelhouse"
REQUIRE_WHEELS = os.environ.get("PYDTRACE_REQUIRE_WHEELS") == "1"

WHEELS = sorted(DIST.glob("pydtrace_rs-*.whl"))
SDISTS = sorted(DIST.glob("pydtrace_rs-*.tar.gz"))

#: ELF machine (readelf -h) for each wheel platform's architecture.
MACHINES = {"x86_64": "Advanced Micro Devices X86-64", "aarch64": "AArch64"}
#: The nop at a probe site, as the SDT emitter (build.rs) writes it.
NOPS = {"x86_64": bytes([0x90]), "aarch64": bytes.fromhex("1f2003d5")}
#: SDT argument size for each provider type: `8@` unsigned eight bytes, `-4@` signed four.
SIZES = {"char *": 8, "uintptr_t": 8, "int32_t": -4, "int64_t": -8, "uint32_t": 4, "uint64_t": 8}
#: A register operand as bcc (usdt_args.cc) and libbpf (usdt.c, which bpftrace uses) parse it on
#: aarch64: x0 to x30, or sp. Neither knows w registers: `-4@w2` fails to attach there.
AARCH64_REGISTER = r"(?:x(?:[0-9]|[12][0-9]|30)|sp)"
AARCH64_OPERAND = re.compile(rf"^{AARCH64_REGISTER}$|^\[{AARCH64_REGISTER}(?:, ?-?\d+)?\]$|^-?\d+$")
X86_64_OPERAND = re.compile(r"^%[a-z0-9]+$|^-?\d*\(%[a-z0-9]+\)$|^\$-?\d+$")


def _missing(reason: str) -> None:
    """Skip for a missing artifact or tool; fail instead under PYDTRACE_REQUIRE_WHEELS=1."""
    if REQUIRE_WHEELS:
        pytest.fail(f"{reason}; PYDTRACE_REQUIRE_WHEELS=1 makes this a failure, not a skip")
    pytest.skip(reason)


def _wheel_params():
    if WHEELS:
        return [pytest.param(wheel, id=wheel.name) for wheel in WHEELS]
    return [pytest.param(None, id="no-wheels")]


@pytest.fixture(params=_wheel_params())
def wheel(request) -> Path:
    if request.param is None:
        _missing(f"{DIST} holds no wheels: run scripts/dev wheels")
    return request.param


def cargo_version() -> str:
    """The one version of the project: Cargo.toml's (pyproject.toml takes it as dynamic)."""
    with open(REPO / "Cargo.toml", "rb") as f:
        return tomllib.load(f)["package"]["version"]


def provider_probes() -> dict[str, list[str]]:
    """Probe name to argument types, from provider/pydtrace.d (comments removed)."""
    text = re.sub(r"/\*.*?\*/", "", (REPO / "provider" / "pydtrace.d").read_text(), flags=re.S)
    probes = {}
    for name, args in re.findall(r"probe\s+(\w+)\s*\(([^)]*)\)\s*;", text):
        probes[name] = [" ".join(arg.split()) for arg in args.split(",") if arg.strip()]
    assert probes, "provider/pydtrace.d declares no probes"
    return probes


def wheel_python(wheel: Path) -> tuple[int, int]:
    """The CPython a wheel is built for, from its tag (cp315: 3.15)."""
    match = re.search(r"-cp3(\d+)-", wheel.name)
    assert match, f"{wheel.name}: no cp3X tag"
    return 3, int(match.group(1))


def wheel_arch(wheel: Path) -> str:
    match = re.search(r"manylinux_\d+_\d+_(x86_64|aarch64)\.whl$", wheel.name)
    assert match, f"{wheel.name}: not a manylinux wheel for x86_64 or aarch64"
    return match.group(1)


def readelf(*args: str) -> str:
    if shutil.which("readelf") is None:
        _missing("readelf is not installed (Debian: apt-get install binutils)")
    return subprocess.run(["readelf", "-W", *args], check=True, capture_output=True, text=True).stdout


@dataclass
class Note:
    provider: str
    name: str
    location: int
    base: int
    semaphore: int
    arguments: str


@dataclass
class SharedObject:
    path: Path
    data: bytes
    machine: str
    notes: list[Note]
    #: Section name to (address, file offset, size).
    sections: dict[str, tuple[int, int, int]]
    #: PT_LOAD segments: (file offset, address, file size).
    loads: list[tuple[int, int, int]]

    def file_offset(self, address: int) -> int:
        """The file offset of an address, through the program headers (what the loader maps)."""
        for offset, vaddr, filesz in self.loads:
            if vaddr <= address < vaddr + filesz:
                return address - vaddr + offset
        raise AssertionError(f"{self.path.name}: address {address:#x} is in no loaded segment")


def parse_notes(text: str) -> list[Note]:
    notes = []
    for block in re.split(r"\n(?=\s+stapsdt\s)", text):
        # With -W readelf puts "Provider:" on the note's first line, after a tab.
        fields = dict(re.findall(r"\b(Provider|Name|Arguments):[ \t]*([^\t\n]*)", block))
        where = re.search(r"Location: (0x[0-9a-f]+), Base: (0x[0-9a-f]+), Semaphore: (0x[0-9a-f]+)", block)
        if "Provider" not in fields or where is None:
            continue
        notes.append(Note(fields["Provider"], fields["Name"], *(int(v, 16) for v in where.groups()),
                          fields.get("Arguments", "")))
    return notes


def shared_object(wheel: Path, tmp_path: Path) -> SharedObject:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if re.fullmatch(r"dtrace/_native\..*\.so", n)]
        assert len(names) == 1, f"{wheel.name}: expected one dtrace/_native*.so, found {names}"
        path = Path(zf.extract(names[0], tmp_path))
    sections = {}
    for name, address, offset, size in re.findall(
        r"^\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)", readelf("-S", str(path)), flags=re.M
    ):
        sections[name] = (int(address, 16), int(offset, 16), int(size, 16))
    loads = [
        (int(offset, 16), int(vaddr, 16), int(filesz, 16))
        for offset, vaddr, filesz in re.findall(
            r"^\s*LOAD\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+0x[0-9a-f]+\s+0x([0-9a-f]+)", readelf("-l", str(path)), flags=re.M
        )
    ]
    machine = re.search(r"Machine:\s+(.*)", readelf("-h", str(path))).group(1).strip()
    return SharedObject(path, path.read_bytes(), machine, parse_notes(readelf("-n", str(path))), sections, loads)


@pytest.fixture
def so(wheel, tmp_path) -> SharedObject:
    return shared_object(wheel, tmp_path)


def python_notes(so: SharedObject) -> dict[str, Note]:
    notes = [n for n in so.notes if n.provider == "python"]
    assert notes, f"{so.path.name}: readelf -n shows no probe of provider python"
    names = [n.name for n in notes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"{so.path.name}: probes noted more than once: {duplicates}"
    return {n.name: n for n in notes}


# --- The wheels ----------------------------------------------------------------------------------


def test_wheel_tags_metadata_and_object_agree(wheel, so):
    version = cargo_version()
    arch = wheel_arch(wheel)
    name = re.fullmatch(r"pydtrace_rs-([^-]+)-(cp3\d+)-(cp3\d+)-manylinux2014_(\w+)\.manylinux_2_17_(\w+)\.whl",
                        wheel.name)
    assert name, f"{wheel.name}: expected pydtrace_rs-VERSION-cp3X-cp3X-manylinux2014_ARCH.manylinux_2_17_ARCH.whl"
    assert name.group(1) == version, f"{wheel.name}: version {name.group(1)}, Cargo.toml says {version}"
    # Version-specific, not abi3: the module uses the unstable C API (docs/packaging.md).
    assert name.group(2) == name.group(3)
    assert name.group(4) == name.group(5) == arch
    assert so.machine == MACHINES[arch], f"{wheel.name}: its shared object is for {so.machine}"
    python_tag = name.group(2)
    assert f"cpython-{python_tag[2:]}-{arch}-linux-gnu.so" in so.path.name, so.path.name

    with zipfile.ZipFile(wheel) as zf:
        files = zf.namelist()
        info = f"pydtrace_rs-{version}.dist-info"
        metadata = zf.read(f"{info}/METADATA").decode()
    assert "pydtrace-rs.pth" in files, "the .pth file that arms under PYDTRACE=1 is missing"
    for licence in ("LICENSE-MIT", "LICENSE-APACHE"):
        assert f"{info}/licenses/{licence}" in files, f"{licence} is not in the wheel"
    fields = re.findall(r"^([A-Za-z-]+): (.*)$", metadata.split("\n\n")[0], flags=re.M)
    single = dict(fields)
    assert single["Name"] == "pydtrace-rs"
    assert single["Version"] == version
    assert single["Requires-Python"] == ">=3.12"
    assert single["License-Expression"] == "MIT OR Apache-2.0"
    classifiers = {v for k, v in fields if k == "Classifier"}
    for wanted in ("Programming Language :: Python :: 3.12", "Programming Language :: Python :: 3.13",
                   "Programming Language :: Python :: 3.14", "Programming Language :: Python :: 3.15",
                   "Programming Language :: Python :: Implementation :: CPython",
                   "Operating System :: POSIX :: Linux", "Operating System :: MacOS"):
        assert wanted in classifiers, f"classifier {wanted!r} missing"
    urls = {v.split(",")[0] for k, v in fields if k == "Project-URL"}
    assert {"Repository", "Changelog"} <= urls, f"project URLs: {urls}"


def test_auditwheel_accepts_manylinux_2_17(wheel):
    auditwheel = shutil.which("auditwheel") or shutil.which("auditwheel", path=str(REPO / ".venv-build" / "bin"))
    if auditwheel is None:
        _missing("auditwheel is not installed (scripts/dev wheels installs it into .venv-build)")
    shown = subprocess.run([auditwheel, "show", str(wheel)], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    tag = re.search(r'is consistent with the following platform tag: "manylinux_2_(\d+)_(\w+)"', text)
    assert tag, f"auditwheel show said:\n{shown.stdout}"
    assert tag.group(2) == wheel_arch(wheel)
    assert int(tag.group(1)) <= 17, f"auditwheel: needs glibc 2.{tag.group(1)}, not manylinux2014:\n{shown.stdout}"


def test_every_probe_noted_with_semaphore_and_base(wheel, so):
    wanted = provider_probes()
    notes = python_notes(so)
    assert sorted(notes) == sorted(wanted), f"probes in the notes {sorted(notes)}, in the provider {sorted(wanted)}"
    assert ".stapsdt.base" in so.sections, "no .stapsdt.base section"
    assert ".probes" in so.sections, "no .probes section (the semaphores)"
    base_address = so.sections[".stapsdt.base"][0]
    probes_address, _, probes_size = so.sections[".probes"]
    arch = wheel_arch(wheel)
    semaphores = set()
    for name, note in notes.items():
        assert note.base != 0 and note.base == base_address, f"{name}: base {note.base:#x}"
        # Non-zero: a zero semaphore is no semaphore, and the probe would fire only when forced.
        # Even: the kernel increments it as a 16-bit counter, which must be aligned.
        assert note.semaphore != 0 and note.semaphore % 2 == 0, f"{name}: semaphore {note.semaphore:#x}"
        assert probes_address <= note.semaphore < probes_address + probes_size, f"{name}: semaphore not in .probes"
        semaphores.add(note.semaphore)
        nop = NOPS[arch]
        site = so.file_offset(note.location)
        assert so.data[site:site + len(nop)] == nop, f"{name}: no nop at {note.location:#x} (file offset {site:#x})"
        sizes = [int(arg.split("@")[0]) for arg in note.arguments.split()]
        declared = [SIZES[t] for t in wanted[name]]
        declared = declared[:noted_arguments(name, len(declared), wheel_python(wheel))]
        assert sizes == declared, f"{name}: arguments {note.arguments!r} for {wanted[name]}"
    assert len(semaphores) == len(notes), "two probes share a semaphore"


def test_probe_locations_as_perf_and_systemtap_compute_them(wheel, so):
    # perf and SystemTap take the note's location, correct it by the difference between the
    # note's base and .stapsdt.base's file offset, and use that as the file offset of the uprobe.
    # It is the nop's file offset only when the text and .stapsdt.base are mapped at the same
    # distance from their file offsets; otherwise every perf probe misses.
    _, base_offset, _ = so.sections[".stapsdt.base"]
    wrong = []
    for name, note in python_notes(so).items():
        site = so.file_offset(note.location)
        if note.location - note.base != site - base_offset:
            wrong.append(f"{name}: location - base = {note.location - note.base:#x}, "
                         f"site offset - .stapsdt.base offset = {site - base_offset:#x}")
    assert not wrong, f"{wheel.name}: perf and SystemTap would probe the wrong place:\n" + "\n".join(wrong)


def test_argument_operands_parse_in_bcc_and_libbpf(wheel, so):
    arch = wheel_arch(wheel)
    operand = AARCH64_OPERAND if arch == "aarch64" else X86_64_OPERAND
    bad = []
    for name, note in python_notes(so).items():
        for arg in note.arguments.split():
            size, _, place = arg.partition("@")
            if not re.fullmatch(r"-?[1248]", size) or not operand.match(place):
                bad.append(f"{name}: {arg}")
    assert not bad, f"{wheel.name}: argument operands bcc/libbpf cannot parse on {arch}: {bad}"


# --- The sdist, offline ---------------------------------------------------------------------------


def fresh_venv(path: Path) -> Path:
    """A new venv of this interpreter, with pip. Debian's venv module takes pip's wheel from
    /usr/share/python-wheels (its python3.X-venv package); an interpreter of Debian's unpacked
    elsewhere (scripts/dev's) has that folder under its own prefix, so pip comes from there."""
    python = path / "bin" / "python"
    done = subprocess.run([sys.executable, "-m", "venv", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        wheels = sorted((Path(sys.base_prefix) / "share" / "python-wheels").glob("pip-*.whl"))
        assert wheels, done.stderr + done.stdout
        shutil.rmtree(path)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
        subprocess.run([str(python), f"{wheels[-1]}/pip", "install", "-q", "--no-index", str(wheels[-1])],
                       check=True)
    return python


def describe(python: Path) -> dict:
    probe = ("import dtrace, json; print(json.dumps({'available': dtrace.available, "
             "'reason': dtrace.unavailable_reason, 'version': dtrace.__version__, "
             "'library': dtrace.library_path()}))")
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_sdist_builds_and_installs_offline(tmp_path):
    if not SDISTS:
        _missing(f"{DIST} holds no sdist: run scripts/dev wheels")
    assert len(SDISTS) == 1, f"more than one sdist in {DIST}: {SDISTS}"
    sdist = SDISTS[0]
    version = cargo_version()
    assert sdist.name == f"pydtrace_rs-{version}.tar.gz"
    with tarfile.open(sdist) as tf:
        names = set(tf.getnames())
    top = f"pydtrace_rs-{version}"
    for needed in ("Cargo.toml", "Cargo.lock", "pyproject.toml", "PKG-INFO", ".cargo/config.toml",
                   "provider/pydtrace.d", "LICENSE-MIT", "LICENSE-APACHE", "CHANGELOG.md"):
        assert f"{top}/{needed}" in names, f"{needed} is not in the sdist"
    assert any(n.startswith(f"{top}/vendor/pyo3-") for n in names), "the crates are not vendored"

    if not list(BUILD_WHEELHOUSE.glob("maturin-*.whl")):
        _missing(f"no maturin wheel in {BUILD_WHEELHOUSE} for pip --no-index: run scripts/dev wheels")
    if shutil.which("cargo") is None:
        _missing("cargo (Rust) is needed to build the sdist")
    python = fresh_venv(tmp_path / "venv")
    # No index, no cache, an empty cargo home: the crates can only come from the sdist's vendor/.
    cargo_home = tmp_path / "cargo-home"
    cargo_home.mkdir()
    env = dict(os.environ, CARGO_HOME=str(cargo_home), CARGO_NET_OFFLINE="true", PIP_NO_INDEX="1")
    env.pop("PYO3_PYTHON", None)
    env.pop("PYO3_CONFIG_FILE", None)
    install = [str(python), "-m", "pip", "install", "--no-index", "--no-cache-dir", "--disable-pip-version-check",
               "--find-links", str(BUILD_WHEELHOUSE), str(sdist)]
    # As root, in a network namespace with no interface but loopback: nothing can be fetched.
    isolated = os.geteuid() == 0 and shutil.which("unshare") is not None
    if isolated:
        install = ["unshare", "--net", "--", *install]
    result = subprocess.run(install, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, f"offline install failed (network namespace: {isolated}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    seen = describe(python)
    assert seen["available"] is True, seen["reason"]
    assert seen["version"] == version
    assert seen["library"].startswith(str(tmp_path / "venv")), seen["library"]
    shown = subprocess.run([str(python), "-m", "pip", "show", "pydtrace-rs"], capture_output=True, text=True)
    assert f"Version: {version}" in shown.stdout, shown.stdout


def test_pip_show_reads_right(tmp_path):
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    mine = [w for w in WHEELS if f"-{tag}-{tag}-" in w.name and w.name.endswith(f"_{platform.machine()}.whl")]
    if not mine:
        _missing(f"{DIST} holds no {tag} wheel for {platform.machine()}: run scripts/dev wheels")
    python = fresh_venv(tmp_path / "venv")
    # pip 25.1 is the first to show PEP 639's License-Expression (older ones print an empty License:).
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "pip>=25.1"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    str(mine[0])], check=True)
    shown = subprocess.run([str(python), "-m", "pip", "show", "-v", "pydtrace-rs"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", shown.stdout, flags=re.M))
    assert fields["Name"] == "pydtrace-rs"
    assert fields["Version"] == cargo_version()
    assert fields["Summary"].startswith("DTrace/USDT probes")
    assert fields["License-Expression"] == "MIT OR Apache-2.0"
    assert fields["Home-page"] == "https://github.com/pydtrace-rs/pydtrace-rs"
    assert "Programming Language :: Python :: Implementation :: CPython" in shown.stdout
    assert "pydtrace=dtrace.__main__:main" in shown.stdout


# --- The wheel under the tracer tests --------------------------------------------------------------


def test_wheel_passes_tracer_tests_in_a_fresh_venv(tmp_path):
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    arch = platform.machine()
    mine = [w for w in WHEELS if f"-{tag}-{tag}-" in w.name and w.name.endswith(f"_{arch}.whl")]
    if not mine:
        _missing(f"{DIST} holds no {tag} wheel for {arch}: run scripts/dev wheels")
    require_tracer()
    python = fresh_venv(tmp_path / "venv")
    # pytest from the index (the test's own dependency); the project only from the wheel.
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-cache-dir",
                    str(mine[0]), "pytest>=8"], check=True)
    seen = describe(python)
    assert seen["available"] is True, seen["reason"]
    assert seen["library"].startswith(str(tmp_path / "venv")), f"the tests would not trace the wheel: {seen}"
    # From the repository, so that tests/ and its conftest are found; the repository has no
    # top-level dtrace package, so the wheel's is the one imported (checked above and by the tests).
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_code_probes.py"],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"tracer tests against {mine[0].name} failed:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, summary
    assert "skipped" not in summary, f"tracer tests skipped against the wheel: {summary}"
