//! The crate's one error type, and its conversion to Python exceptions.
//!
//! Errors reach Python only through the public API (`wait_for_consumer`,
//! `arm`, ...). Nothing on a probe's path raises into the traced program:
//! the callbacks turn an internal failure into a warning and switch the
//! probe off (see `faults::report_internal_error`).

use std::fmt;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::PyErr;

use crate::probes::PROBE_DTRACE_NAMES;

/// Everything that can go wrong in `dtrace._native`.
#[derive(Debug)]
pub enum Error {
    /// A probe name that provider `python` does not declare.
    UnknownProbe(String),
    /// The watcher thread could not be started.
    WatcherSpawn(std::io::Error),
    /// Every `sys.monitoring` tool id the probes may take is in use.
    NoFreeToolId,
    /// Python raised while the probes were being armed or disarmed.
    Python(PyErr),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UnknownProbe(name) => write!(
                f,
                "unknown probe {name:?}: provider python has {}",
                PROBE_DTRACE_NAMES.join(", ")
            ),
            Error::WatcherSpawn(err) => write!(f, "cannot start the probe watcher thread: {err}"),
            Error::NoFreeToolId => write!(
                f,
                "sys.monitoring tool ids 3 and 4 are both in use, so the function and line probes \
                 stay off; free one with sys.monitoring.free_tool_id()"
            ),
            Error::Python(err) => write!(f, "{err}"),
        }
    }
}

impl From<crate::probes::UnknownProbe> for Error {
    fn from(err: crate::probes::UnknownProbe) -> Self {
        Error::UnknownProbe(err.0)
    }
}

impl From<crate::probes::UnknownProbe> for PyErr {
    fn from(err: crate::probes::UnknownProbe) -> Self {
        Error::from(err).into()
    }
}

impl From<PyErr> for Error {
    fn from(err: PyErr) -> Self {
        Error::Python(err)
    }
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        match err {
            Error::UnknownProbe(_) => PyValueError::new_err(err.to_string()),
            Error::Python(err) => err,
            Error::WatcherSpawn(_) | Error::NoFreeToolId => {
                PyRuntimeError::new_err(err.to_string())
            }
        }
    }
}
