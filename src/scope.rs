//! Scoped tracing: code outside the scope fires no code probe, and after its
//! first event costs nothing.
//!
//! A scope (its grammar: `grammar`) comes from `PYDTRACE_SCOPE` at start
//! (the *base* scope), or, for the length of a tool's session, from the
//! tools' channel (`channel`): while tools hold leases, the scope in force is
//! the union of their scopes; when the last one leaves, the base scope is
//! back. This module keeps the scope in force and decides, per code object,
//! whether it is covered; it does not know where a scope came from: the
//! watcher, which reads the channel, hands it the scope to put in force and
//! publishes the result back into the channel.
//!
//! **Which code is in scope.** A code object is in scope when the module name
//! of the frame that runs it is named by the scope (or is a submodule of a
//! name), or when its `co_filename` matches one of the globs. The module name
//! is the frame's `globals()["__name__"]`, read at the code object's first
//! event: the name CPython itself gives the module that defined the code, and
//! the one `warnings` filters match. For `__main__` (a script, `python -m
//! pkg.mod`), the name in `__spec__.name` counts as well, when there is a spec.
//! Code run with globals that have no `__name__` (`exec(code, {})`) is in
//! scope only through a glob.
//!
//! **What is cached.** The verdict is kept per code object in its name-cache
//! entry (`names::Verdict`, which holds it without knowing what it means),
//! with the scope generation it was decided under. Each change of the scope
//! bumps [`GENERATION`], so every entry is decided again at its next event:
//! one load and one compare per event otherwise.
//!
//! **Costing nothing.** For code out of scope the callbacks return
//! `sys.monitoring.DISABLE`, which takes the event out of that code location
//! until `sys.monitoring.restart_events()`. That works for PY_START,
//! PY_RESUME, PY_RETURN, PY_YIELD and LINE. PY_THROW, PY_UNWIND, C_RETURN
//! and C_RAISE cannot be disabled (CPython raises ValueError into the
//! program and drops the callback): for them the callbacks return None and
//! fire nothing, so out-of-scope code still calls back once per throw into
//! a generator or per frame an exception unwinds. When the scope changes,
//! `restart_events()` brings the disabled locations back (for every tool:
//! coverage.py's disabled lines call back once more, and it disables them
//! again), only if anything was disabled since the last restart.
//!
//! Putting a scope in force runs with the GIL, from the watcher's hand-off
//! (`watcher`), and does no import or I/O: the scope was parsed, and the
//! leases checked, by the watcher thread without the GIL.
//!
//! Reaches down to `grammar`, `names` and `faults`; `cfunctions`,
//! `callbacks`, `arming` and `watcher` use it.

use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::ffi;
use pyo3::prelude::*;

use crate::faults::{self, lock};
use crate::grammar::Scope;
use crate::names::CodeNames;

// --- the scope in force -----------------------------------------------------

/// The scope generation: bumped at each change of the scope in force; the
/// verdicts cached under an older one are decided again. Starts at 1, so a
/// fresh `names::Verdict` (generation 0) is always decided.
static GENERATION: AtomicU32 = AtomicU32::new(1);

/// What is in force now. Changed and read with the GIL held.
struct InForce {
    /// `None`: no scope, every code object fires.
    scope: Option<Arc<Scope>>,
    /// The tools whose leases made it (empty for the base scope).
    tools: Vec<u32>,
}

static IN_FORCE: Mutex<InForce> = Mutex::new(InForce {
    scope: None,
    tools: Vec::new(),
});

/// The base scope: `PYDTRACE_SCOPE` at start, in force while no tool holds a lease.
static BASE: Mutex<Option<Arc<Scope>>> = Mutex::new(None);

/// Set once a callback returned DISABLE since the last restart of events.
static DISABLED_SINCE_RESTART: AtomicBool = AtomicBool::new(false);
/// Verdicts decided, and DISABLEs returned, in this process (for tests:
/// out-of-scope code calls back once per location, then never again).
static DECISIONS: AtomicU64 = AtomicU64::new(0);
static DISABLES: AtomicU64 = AtomicU64::new(0);

/// (verdicts decided, DISABLEs returned) in this process.
pub fn stats() -> (u64, u64) {
    (
        DECISIONS.load(Ordering::Relaxed),
        DISABLES.load(Ordering::Relaxed),
    )
}
/// Whether a malformed scope has been reported (once per process).
static WARNED: AtomicBool = AtomicBool::new(false);
/// `sys.monitoring.DISABLE`, kept for the life of the process.
static DISABLE: AtomicPtr<ffi::PyObject> = AtomicPtr::new(std::ptr::null_mut());

/// Takes `sys.monitoring.DISABLE`; at module initialisation, with the GIL.
pub fn init(py: Python<'_>) {
    if !DISABLE.load(Ordering::Relaxed).is_null() {
        return;
    }
    // SAFETY: GIL held; PySys_GetObject returns a borrowed reference (no import).
    let monitoring = unsafe { ffi::PySys_GetObject(c"monitoring".as_ptr()) };
    if monitoring.is_null() {
        return;
    }
    // SAFETY: as above; `monitoring` is alive (sys holds it).
    let disable = unsafe { Bound::from_borrowed_ptr(py, monitoring) }.getattr("DISABLE");
    if let Ok(disable) = disable {
        DISABLE.store(disable.into_ptr(), Ordering::Relaxed); // kept forever
    }
}

/// The base scope (`PYDTRACE_SCOPE`), if any.
pub fn base() -> Option<Arc<Scope>> {
    lock(&BASE).clone()
}

/// Sets the base scope from `PYDTRACE_SCOPE` (with the GIL, when the probes
/// are armed) and returns it, to be put in force unless leases are held (the
/// watcher decides). A text that cannot be parsed leaves the scope as it is,
/// with one warning, and returns `None`.
pub fn set_base(py: Python<'_>, text: &str) -> Option<Option<Arc<Scope>>> {
    match Scope::parse(text) {
        Ok(scope) => {
            let scope = (!scope.is_empty()).then(|| Arc::new(scope));
            *lock(&BASE) = scope.clone();
            Some(scope)
        }
        Err(err) => {
            warn_malformed(py, &format!("PYDTRACE_SCOPE={text:?}: {err}"));
            None
        }
    }
}

/// Warns once per process about a scope that cannot be used.
pub fn warn_malformed(py: Python<'_>, what: &str) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        let kept = match lock(&IN_FORCE).scope.as_deref() {
            Some(scope) => format!(
                "the scope in force stays ({})",
                scope.text().replace('\n', ", ")
            ),
            None => "no scope is in force: every code object fires".to_owned(),
        };
        faults::warn(py, &format!("scope ignored: {what}; {kept}"));
    }
}

/// Puts `scope` in force (`None`: every code object fires), made by the
/// leases of `tools`, with the GIL; returns the scope generation in force
/// then (for the watcher to publish in the channel). A change of the scope
/// bumps the generation and, if anything was disabled since the last
/// restart, restarts `sys.monitoring`'s events.
pub fn install(py: Python<'_>, scope: Option<Arc<Scope>>, tools: Vec<u32>) -> u32 {
    let changed = {
        let mut in_force = lock(&IN_FORCE);
        let changed = in_force.scope != scope;
        in_force.scope = scope;
        in_force.tools = tools;
        changed
    };
    if changed {
        GENERATION.fetch_add(1, Ordering::AcqRel);
        restart_if_disabled(py);
    }
    GENERATION.load(Ordering::Acquire)
}

/// Restarts `sys.monitoring`'s events if a callback returned DISABLE since
/// the last restart. For arming: the C function probes' own CALL callback
/// disables the calls of C code out of scope, and a callback that serves
/// the (unscoped) instance probes too must see those locations again.
pub fn restart_if_disabled(py: Python<'_>) {
    if DISABLED_SINCE_RESTART.swap(false, Ordering::AcqRel) {
        restart_events(py);
    }
}

/// `sys.monitoring.restart_events()`, without an import: `sys` holds it.
fn restart_events(py: Python<'_>) {
    // SAFETY: GIL held; a borrowed reference from sys.
    let monitoring = unsafe { ffi::PySys_GetObject(c"monitoring".as_ptr()) };
    if monitoring.is_null() {
        return;
    }
    // SAFETY: as above.
    let monitoring = unsafe { Bound::from_borrowed_ptr(py, monitoring) };
    if let Err(err) = monitoring.call_method0("restart_events") {
        faults::report_arming_error(
            py,
            &format!("sys.monitoring.restart_events() failed: {err}"),
        );
    }
}

/// The scope in force: its module names and file globs, and the tools whose
/// leases made it; `None` while every code object fires.
pub fn in_force() -> Option<(Vec<String>, Vec<String>, Vec<u32>)> {
    let in_force = lock(&IN_FORCE);
    let scope = in_force.scope.as_ref()?;
    Some((
        scope.modules().to_vec(),
        scope.files().map(str::to_owned).collect(),
        in_force.tools.clone(),
    ))
}

// --- the per-code-object verdict ---------------------------------------------

/// Whether the code object `code`, whose cached names are `names`, may fire
/// the code probes: decided on its first event under each scope generation,
/// then one load and one compare.
///
/// # Safety
/// GIL held, in a `sys.monitoring` callback of `code` (its frame runs).
#[inline(always)]
pub unsafe fn allows_names(code: *mut ffi::PyObject, names: &CodeNames) -> bool {
    let generation = GENERATION.load(Ordering::Relaxed);
    match names.scope_verdict().get(generation) {
        Some(allowed) => allowed,
        None => decide(code, names, generation),
    }
}

/// A new reference to `sys.monitoring.DISABLE` (None if it could not be
/// had): what a callback returns for an out-of-scope event that can be
/// disabled.
///
/// # Safety
/// GIL held.
#[inline]
pub unsafe fn disable() -> *mut ffi::PyObject {
    DISABLED_SINCE_RESTART.store(true, Ordering::Relaxed);
    DISABLES.fetch_add(1, Ordering::Relaxed);
    let disable = DISABLE.load(Ordering::Relaxed);
    ffi::Py_NewRef(if disable.is_null() {
        ffi::Py_None()
    } else {
        disable
    })
}

/// The first event of a code object under this generation: decides and caches.
#[cold]
#[inline(never)]
unsafe fn decide(code: *mut ffi::PyObject, names: &CodeNames, generation: u32) -> bool {
    // Cloned out of the lock: reading a spec's name may run Python code,
    // which may let another thread decide meanwhile.
    DECISIONS.fetch_add(1, Ordering::Relaxed);
    let scope = lock(&IN_FORCE).scope.clone();
    let allowed = match scope {
        None => true,
        Some(scope) => {
            let filename = CStr::from_ptr(names.filename()).to_string_lossy();
            scope.covers(&module_names(code), &filename)
        }
    };
    names.scope_verdict().set(generation, allowed);
    allowed
}

/// The module names of the frame that runs `code`: `__name__` of its
/// globals, and for `__main__` also `__spec__.name`. Empty where the frame
/// is not `code`'s or the globals name no module. Leaves no Python error set.
///
/// # Safety
/// GIL held.
unsafe fn module_names(code: *mut ffi::PyObject) -> Vec<String> {
    let mut out = Vec::new();
    let frame = ffi::PyEval_GetFrame(); // borrowed
    if frame.is_null() {
        return out;
    }
    let frame_code = ffi::PyFrame_GetCode(frame); // new reference
    let same = frame_code.cast::<ffi::PyObject>() == code;
    ffi::Py_XDECREF(frame_code.cast());
    if !same {
        return out;
    }
    let globals = ffi::PyFrame_GetGlobals(frame); // new reference
    if globals.is_null() {
        ffi::PyErr_Clear();
        return out;
    }
    if ffi::PyDict_Check(globals) != 0 {
        if let Some(name) = dict_str(globals, c"__name__") {
            if name == "__main__" {
                let spec = ffi::PyDict_GetItemString(globals, c"__spec__".as_ptr()); // borrowed
                if !spec.is_null() && spec != ffi::Py_None() {
                    let spec_name = ffi::PyObject_GetAttrString(spec, c"name".as_ptr());
                    if let Some(spec_name) = str_of(spec_name) {
                        out.push(spec_name);
                    }
                    ffi::Py_XDECREF(spec_name);
                }
            }
            out.push(name);
        }
    }
    ffi::Py_DECREF(globals);
    ffi::PyErr_Clear();
    out
}

/// `dict[key]` as a Rust string, if it is a `str`.
unsafe fn dict_str(dict: *mut ffi::PyObject, key: &CStr) -> Option<String> {
    str_of(ffi::PyDict_GetItemString(dict, key.as_ptr()))
}

/// A `str` object's text (lossy), `None` for null or anything else.
unsafe fn str_of(obj: *mut ffi::PyObject) -> Option<String> {
    if obj.is_null() || ffi::PyUnicode_Check(obj) == 0 {
        ffi::PyErr_Clear();
        return None;
    }
    let mut size: ffi::Py_ssize_t = 0;
    let utf8 = ffi::PyUnicode_AsUTF8AndSize(obj, &mut size);
    if utf8.is_null() {
        ffi::PyErr_Clear();
        return None;
    }
    let bytes = std::slice::from_raw_parts(utf8.cast::<u8>(), size as usize);
    Some(String::from_utf8_lossy(bytes).into_owned())
}
