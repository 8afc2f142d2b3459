//! `dtrace._native._testing`: the hooks that tests, benchmarks and diagnostics
//! use to look inside the module, kept out of the public `_native`.
//!
//! The submodule is built on first use, by `_native`'s `__getattr__`
//! (`from dtrace._native import _testing`, or `dtrace._native._testing`
//! after `import dtrace`), so that `import dtrace` does not pay for it. It
//! is not entered in `sys.modules`: `import dtrace._native._testing` does
//! not work (`_native` is no package). Its functions only read counters or
//! call what the callbacks would; none is part of the API.
//!
//! Reaches down to every module it reports on (it sits beside `lib`).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString};

use crate::probes::ProbeSet;
use crate::{aggregate, arming, callbacks, cfunctions, channel, faults, grammar};
use crate::{instances, names, scope, watcher};

/// Builds the submodule (see the module documentation), named `name`.
pub fn module<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyModule>> {
    let m = PyModule::new(py, name)?;
    m.setattr(
        "__doc__",
        "Hooks for tests, benchmarks and diagnostics: counters and switches of the native \
         module. Not part of the API; use the dtrace package.",
    )?;
    let all = PyList::empty(py);
    macro_rules! add_functions {
        ($($function:ident),* $(,)?) => {
            $(
                let name = PyString::new(py, stringify!($function));
                m.setattr(&name, wrap_pyfunction!($function, &m)?)?;
                all.append(name)?;
            )*
        };
    }
    add_functions!(
        scope_covers,
        scope_stats,
        scope_channel_layout,
        noop_callback,
        watcher_stats,
        report_internal_error,
        name_cache_entries,
        cfunction_cache_stats,
        hooked_classes,
        monitoring_tool_id,
        aggregate_flush,
        aggregate_stats,
    );
    m.setattr("__all__", all)?;
    Ok(m)
}

/// Whether the scope `text` covers code run under module names
/// `modules` from file `filename` (for tests of the scope rule).
#[pyfunction]
fn scope_covers(text: &str, modules: Vec<String>, filename: &str) -> PyResult<bool> {
    let parsed = grammar::Scope::parse(text).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(parsed.covers(&modules, filename))
}

/// (scope verdicts decided, `sys.monitoring.DISABLE`s returned) in this process.
#[pyfunction]
fn scope_stats() -> (u64, u64) {
    scope::stats()
}

/// The scope channel's layout (offsets and sizes), for tests of the tool side.
#[pyfunction]
fn scope_channel_layout() -> Vec<(&'static str, usize)> {
    channel::layout()
}

/// A native callback with the probes' calling convention that does
/// nothing: the dispatch floor benchmarks compare the probes with.
#[pyfunction]
fn noop_callback(py: Python<'_>) -> PyResult<Py<PyAny>> {
    callbacks::callable(py, callbacks::Hook::Noop, None)
}

/// (times the watcher read the semaphores, times it took the GIL itself,
/// times the main thread applied a change for it in a pending call).
#[pyfunction]
fn watcher_stats() -> (u64, u64, u64) {
    watcher::stats()
}

/// Reports an internal error of probe `name` as a callback would (for
/// tests): the probe is switched off with one RuntimeWarning.
#[pyfunction]
fn report_internal_error(name: &str, what: &str) -> PyResult<()> {
    let set = ProbeSet::from_names(&[name])?;
    for index in set.indices() {
        faults::report_internal_error(index, what);
    }
    Ok(())
}

/// How many code objects carry a name-cache entry now.
#[pyfunction]
fn name_cache_entries() -> isize {
    names::live_entries()
}

/// (entries in the C function probes' name cache now, names worked out
/// for it so far).
#[pyfunction]
fn cfunction_cache_stats() -> (isize, usize) {
    cfunctions::cache_stats()
}

/// How many classes carry the instance-delete hook now.
#[pyfunction]
fn hooked_classes(py: Python<'_>) -> PyResult<usize> {
    instances::patched_count(py)
}

/// The `sys.monitoring` tool id the probes hold, if any.
#[pyfunction]
fn monitoring_tool_id() -> Option<u8> {
    arming::tool_id()
}

/// Reports what the aggregate probes gathered, now, as a flush that
/// `requester` asked for (for tests; tools ask through
/// `pydtrace_flush_requests`).
#[pyfunction]
#[pyo3(signature = (requester=0))]
fn aggregate_flush(py: Python<'_>, requester: u32) {
    let _ = py;
    // SAFETY: GIL held (`py`).
    unsafe {
        aggregate::flush(
            0,
            if requester == 0 {
                &[]
            } else {
                std::slice::from_ref(&requester)
            },
        )
    };
}

/// (what is gathered: bits 1 calls, 2 times, 4 lines, 8 the tree; code
/// objects with unreported counts; call-tree nodes), for tests.
#[pyfunction]
fn aggregate_stats(py: Python<'_>) -> (u8, usize, usize) {
    aggregate::stats(py)
}
