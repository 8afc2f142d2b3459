//! `dtrace._native`: USDT probes of provider `python` for CPython 3.12+.
//!
//! The probes are declared in `provider/pydtrace.d` and compiled in by
//! `build.rs` (`probes`). A watcher thread (`watcher`) notices which probes
//! a consumer enables (`enablement`) and has `arming` switch on just the
//! hooks those probes need: `sys.monitoring` events, a `gc.callbacks` entry,
//! an import wrapper, an audit hook, the classes' deallocator (`instances`).
//! The native callbacks (`callbacks`) fire the probes with the names cached
//! per code object (`names`), and per C callable for the C function probes
//! (`cfunctions`), for code in the scope in force (`scope`, set by
//! `PYDTRACE_SCOPE` or by a tool through the `channel`). While no consumer
//! is attached, nothing of this runs but a thread that reads one counter per
//! probe (and the channel's doorbell) every 20 ms.
//!
//! This module is the thin PyO3 layer over that; the public API is the
//! Python package `dtrace`, which documents it. The hooks of tests,
//! benchmarks and diagnostics are in the submodule `_native._testing`
//! (`testing`), built on first use.
//!
//! The modules, each reaching only down this list (docs/internals.md):
//! `probes`, `faults`, `error`, `enablement`, `aggregate`, `names`,
//! `grammar`, `scope`, `instances`, `cfunctions`, `callbacks`, `arming`,
//! `interpreter`, `follow`, `channel`, `watcher`; then `testing` and this one.

mod aggregate;
mod arming;
mod callbacks;
mod cfunctions;
mod channel;
mod enablement;
mod error;
mod faults;
mod follow;
mod grammar;
mod instances;
mod interpreter;
mod names;
mod probes;
mod scope;
mod testing;
mod watcher;

/// build.rs's code generation, compiled here only for its unit tests.
#[cfg(test)]
#[path = "../build/codegen.rs"]
mod codegen;

use std::time::{Duration, Instant};

use pyo3::exceptions::{PyAttributeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{IntoPyDict, PyFrozenSet, PyList, PyString};

use crate::probes::{ProbeSet, PROBE_DTRACE_NAMES};

/// How often `wait_for_consumer` looks at the live probes.
const WAIT_POLL: Duration = Duration::from_millis(5);

fn frozenset<'py>(py: Python<'py>, set: ProbeSet) -> PyResult<Bound<'py, PyFrozenSet>> {
    PyFrozenSet::new(py, set.dtrace_names())
}

/// `timeout` as a duration; `None` waits forever.
fn timeout_duration(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_nan() || t < 0.0 => Err(PyValueError::new_err(format!(
            "timeout must be a non-negative number of seconds or None, not {t}"
        ))),
        Some(t) => Ok(Duration::try_from_secs_f64(t).ok()),
    }
}

/// The module's functions, and `PyInit__native` (`native_module`).
mod _native {
    use super::*;

    /// Builds the module: a function-style PyO3 module rather than a declarative one, whose
    /// functions are set here with `__all__` built alongside. A declarative module adds each item
    /// through PyO3's `add`, which looks up the function's `__name__` and the module's `__all__`
    /// every time; the first lookup of `__all__` fails, and the error's handling creates PyO3's
    /// `PanicException` type: together about 95 thousand
    /// instructions of `import dtrace` (BENCHMARKS.md).
    #[pymodule(gil_used = true)]
    #[pyo3(name = "_native")]
    fn native_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
        let all = PyList::empty(m.py());
        // Each function, in this order (that of `__all__`).
        macro_rules! add_functions {
            ($($function:ident),* $(,)?) => {
                $(
                    let name = PyString::new(m.py(), stringify!($function));
                    m.setattr(&name, wrap_pyfunction!(self::$function, m)?)?;
                    all.append(name)?;
                )*
            };
        }
        add_functions!(
            backend_available,
            enabled_probes,
            interpreter_probes,
            interpreter_firing,
            interpreter_objects,
            consumer_probes,
            wait_for_consumer,
            arm,
            scope,
            parse_scope,
            set_origin,
            is_armed,
            before_fork,
            after_fork_parent,
            after_fork_child,
            at_exit,
            getenv,
        );
        m.setattr("__all__", all)?;
        init(m)
    }

    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        probes::register();
        names::init()?;
        crate::scope::init(m.py());
        interpreter::detect(m.py());
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        let all = m.index()?;
        for name in LAZY_CONSTANTS {
            all.append(name)?;
        }
        m.setattr("__getattr__", wrap_pyfunction!(module_getattr, m)?)
    }

    /// The module's constants that are built on first use, by `module_getattr`.
    const LAZY_CONSTANTS: [&str; 4] = [
        "PROBE_NAMES",
        "PROBE_ARGUMENTS",
        "ARMABLE_PROBES",
        "UNSUPPORTED_PROBES",
    ];

    /// The module's `__getattr__` (PEP 562): builds each of `LAZY_CONSTANTS` on first use and
    /// keeps it in the module, since `import dtrace` needs none of them and building them at
    /// import cost about 50 thousand instructions (BENCHMARKS.md). The submodule `_testing`
    /// (`testing`) is built the same way.
    #[pyfunction]
    #[pyo3(pass_module, name = "__getattr__")]
    fn module_getattr<'py>(m: &Bound<'py, PyModule>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let py = m.py();
        let value = match name {
            "PROBE_NAMES" => PROBE_DTRACE_NAMES.to_vec().into_pyobject(py)?.into_any(),
            "PROBE_ARGUMENTS" => probes::PROBE_ARGUMENTS
                .to_vec()
                .into_pyobject(py)?
                .into_any(),
            "ARMABLE_PROBES" => frozenset(py, arming::ARMABLE)?.into_any(),
            "UNSUPPORTED_PROBES" => arming::unsupported().into_py_dict(py)?.into_any(),
            // Not in `__all__`: the hooks of tests and benchmarks (`testing`).
            "_testing" => testing::module(py, "dtrace._native._testing")?.into_any(),
            _ => {
                return Err(PyAttributeError::new_err(format!(
                    "module 'dtrace._native' has no attribute '{name}'"
                )))
            }
        };
        m.setattr(name, &value)?;
        Ok(value)
    }

    /// Whether this build has a probe mechanism (Linux SDT, or DTrace).
    #[pyfunction]
    fn backend_available() -> bool {
        probes::backend_available()
    }

    /// The probes that a consumer enables and that are hooked in now.
    #[pyfunction]
    fn enabled_probes(py: Python<'_>) -> PyResult<Bound<'_, PyFrozenSet>> {
        frozenset(py, arming::live())
    }

    /// The probes the interpreter declares itself (built `--with-dtrace`),
    /// read from its SDT notes: the watcher leaves each to the interpreter
    /// while the interpreter's own semaphore for it is raised.
    #[pyfunction]
    fn interpreter_probes(py: Python<'_>) -> PyResult<Bound<'_, PyFrozenSet>> {
        frozenset(py, interpreter::declared())
    }

    /// The declared probes the interpreter fires now (a consumer raised its
    /// own semaphore for them).
    #[pyfunction]
    fn interpreter_firing(py: Python<'_>) -> PyResult<Bound<'_, PyFrozenSet>> {
        frozenset(py, interpreter::firing())
    }

    /// Each probe the interpreter declares, with the object that declares it:
    /// `{name: path}` (DTrace's spelling); and why its notes could not be
    /// read, or None.
    #[pyfunction]
    fn interpreter_objects() -> (Vec<(&'static str, String)>, Option<&'static str>) {
        (interpreter::objects(), interpreter::unreadable())
    }

    /// The probes that a consumer enables now, hooked in or not.
    #[pyfunction]
    fn consumer_probes(py: Python<'_>) -> PyResult<Bound<'_, PyFrozenSet>> {
        frozenset(py, enablement::consumer_enabled())
    }

    /// Blocks until the named probes (any probe, if `names` is empty) are
    /// live; False when `timeout` seconds pass first, when the probes are not
    /// armed, or at once when a named probe is never armed here. Raises
    /// ValueError for an unknown name.
    #[pyfunction]
    #[pyo3(signature = (names, timeout=None))]
    fn wait_for_consumer(
        py: Python<'_>,
        names: Vec<String>,
        timeout: Option<f64>,
    ) -> PyResult<bool> {
        let wanted = ProbeSet::from_names(&names)?;
        let deadline = timeout_duration(timeout)?.map(|t| Instant::now() + t);
        // A probe this Python version does not support never goes live.
        if !arming::ARMABLE.is_superset(wanted) {
            return Ok(false);
        }
        loop {
            // One the interpreter fires itself now reaches the consumer that way.
            let live = arming::live().union(interpreter::firing());
            let satisfied = if wanted.is_empty() {
                !live.is_empty()
            } else {
                live.is_superset(wanted)
            };
            if satisfied {
                return Ok(true);
            }
            if !watcher::is_running() {
                return Ok(false);
            }
            let now = Instant::now();
            let nap = match deadline {
                Some(deadline) if now >= deadline => return Ok(false),
                Some(deadline) => WAIT_POLL.min(deadline - now),
                None => WAIT_POLL,
            };
            py.detach(|| std::thread::sleep(nap));
            py.check_signals()?;
            // The watcher hands changes to the main thread as pending calls;
            // a main thread waiting here runs no bytecode that would run them.
            // SAFETY: GIL held; does nothing off the main thread.
            if unsafe { pyo3::ffi::Py_MakePendingCalls() } != 0 {
                return Err(PyErr::fetch(py));
            }
        }
    }

    /// Starts watching for consumers; `force` names probes to arm without
    /// one (for measuring the shim's own cost); `scope` is the base scope
    /// (`PYDTRACE_SCOPE`), which when malformed is ignored with one warning.
    #[pyfunction]
    #[pyo3(signature = (force=Vec::new(), scope=None))]
    fn arm(py: Python<'_>, force: Vec<String>, scope: Option<&str>) -> PyResult<()> {
        let forced = ProbeSet::from_names(&force)?;
        if let Some(text) = scope {
            watcher::set_base_scope(py, text);
        }
        if probes::backend_available() {
            watcher::start(forced)?;
        }
        Ok(())
    }

    /// The scope in force: (module names, file globs, PIDs of the tools
    /// whose leases make it), or None while every code object fires.
    #[pyfunction]
    fn scope() -> Option<(Vec<String>, Vec<String>, Vec<u32>)> {
        crate::scope::in_force()
    }

    /// Parses a scope as `PYDTRACE_SCOPE` and the tools' channel do:
    /// (module names, file globs); ValueError if it is malformed.
    #[pyfunction]
    fn parse_scope(text: &str) -> PyResult<(Vec<String>, Vec<String>)> {
        let parsed =
            grammar::Scope::parse(text).map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok((
            parsed.modules().to_vec(),
            parsed.files().map(str::to_owned).collect(),
        ))
    }

    /// Records how the module came into this process: `"gdb"` or
    /// `"remote_exec"` when `python -m dtrace --inject` loaded it, `""` when
    /// the program imported it. The watcher thread's name says it, for tools
    /// that look from outside.
    #[pyfunction]
    fn set_origin(origin: &str) -> PyResult<()> {
        let tag = match origin {
            "" => 0,
            "gdb" => b'G',
            "remote_exec" => b'R',
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown origin {other:?}: \"gdb\", \"remote_exec\" or \"\""
                )))
            }
        };
        watcher::set_origin(tag);
        Ok(())
    }

    /// Whether the watcher runs, i.e. the probes are armed.
    #[pyfunction]
    fn is_armed() -> bool {
        watcher::is_running()
    }

    /// `os.register_at_fork(before=...)`.
    #[pyfunction]
    fn before_fork(py: Python<'_>) {
        watcher::before_fork(py);
    }

    /// `os.register_at_fork(after_in_parent=...)`.
    #[pyfunction]
    fn after_fork_parent(py: Python<'_>) -> PyResult<()> {
        watcher::after_fork_parent(py).map_err(PyErr::from)
    }

    /// `os.register_at_fork(after_in_child=...)`.
    #[pyfunction]
    fn after_fork_child() -> PyResult<()> {
        aggregate::after_fork_child();
        watcher::after_fork_child().map_err(PyErr::from)
    }

    /// `atexit`: stops the watcher for good before finalization, then
    /// reports what the aggregate probes gathered and did not report yet.
    #[pyfunction]
    fn at_exit(py: Python<'_>) {
        watcher::at_exit(py);
        aggregate::at_exit(py);
    }

    /// The environment variable `name` as `os.environ.get(name)` gives it (decoded as
    /// `os.environ` decodes it), or None: read from the C environment, which `os.environ`
    /// keeps in step, without the KeyError that `os.environ.get` raises and catches for a
    /// variable that is not set (`import dtrace` reads four).
    #[pyfunction]
    fn getenv(name: &str) -> Option<std::ffi::OsString> {
        std::env::var_os(name)
    }
}
