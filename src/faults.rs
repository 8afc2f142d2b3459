//! Internal faults: how a failure inside the probes' machinery is reported
//! to the traced program without ever raising into it.
//!
//! This module sits at the bottom: the callbacks, arming and the watcher
//! report here, and it reaches no module above it. A probe whose callback
//! fails is switched off ([`failed`]), the watcher is asked to apply the
//! enabled set again ([`take_kick`]), and one RuntimeWarning says why. A
//! switched-off probe is retried once no consumer wants it any more and
//! one attaches again ([`forget_failures_except`]).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use pyo3::prelude::*;

use crate::probes::{ProbeSet, PROBE_DTRACE_NAMES};

/// Probes switched off after an internal error, until no consumer wants them.
static FAILED: AtomicU32 = AtomicU32::new(0);
/// Probes whose internal error has been reported (once each per process).
static WARNED: AtomicU32 = AtomicU32::new(0);
/// Whether an arming failure has been reported (once per process).
static ARMING_WARNED: AtomicBool = AtomicBool::new(false);
/// Set when the enabled set must be applied again although it did not change.
static KICK: AtomicBool = AtomicBool::new(false);

/// The probes switched off after an internal error.
pub fn failed() -> ProbeSet {
    ProbeSet::from_bits(FAILED.load(Ordering::Relaxed))
}

/// Clears the failure of every probe not in `wanted`: when a consumer
/// enables it again, it is tried again.
pub fn forget_failures_except(wanted: ProbeSet) {
    FAILED.fetch_and(wanted.bits(), Ordering::Relaxed);
}

/// Whether the enabled set must be applied again; clears the request.
pub fn take_kick() -> bool {
    KICK.swap(false, Ordering::AcqRel)
}

/// Asks the watcher to apply the enabled set again at its next poll.
pub fn kick() {
    KICK.store(true, Ordering::Release);
}

/// Switches probe `probe` off after an internal error and warns once. Called
/// from callbacks, with the GIL held; never leaves a Python error set.
#[cold]
#[inline(never)]
pub fn report_internal_error(probe: usize, what: &str) {
    let bit = 1 << probe;
    FAILED.fetch_or(bit, Ordering::Relaxed);
    kick();
    if WARNED.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
        // SAFETY: callbacks run with the GIL held.
        let py = unsafe { Python::assume_attached() };
        warn(
            py,
            &format!("probe {} switched off: {what}", PROBE_DTRACE_NAMES[probe]),
        );
    }
}

/// Reports a failure to switch the hooks (the first one in this process);
/// the watcher tries again at the next change of the enabled set.
#[cold]
pub fn report_arming_error(py: Python<'_>, what: &str) {
    if !ARMING_WARNED.swap(true, Ordering::Relaxed) {
        warn(
            py,
            &format!(
                "arming the probes failed (retried when a consumer attaches or leaves): {what}"
            ),
        );
    }
}

/// Issues a RuntimeWarning; if warnings are errors, prints it instead, so
/// that nothing raises into the traced program.
pub fn warn(py: Python<'_>, message: &str) {
    let message = format!("pydtrace: {message}");
    let category = py.get_type::<pyo3::exceptions::PyRuntimeWarning>();
    let Ok(c_message) = std::ffi::CString::new(message.clone()) else {
        return;
    };
    // Warnings are errors: the PyErr returned was fetched (nothing is left
    // set in the interpreter) and is dropped here.
    if PyErr::warn(py, &category, &c_message, 1).is_err() {
        eprintln!("{message}");
    }
}

/// Locks `mutex` even if a panic poisoned it. Nothing here unwinds into the
/// traced program, and every guarded state is whole between statements, so
/// a poisoned lock is still the best state there is.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
