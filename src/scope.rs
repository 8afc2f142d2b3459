//! Scoped tracing: code outside the scope fires no code probe, and after its
//! first event costs nothing.
//!
//! A scope is a list of module names (each covering its submodules) and file
//! path globs (`glob`). It comes from `PYDTRACE_SCOPE` at start (the *base*
//! scope), or, for the length of a tool's session, from the tools' channel
//! (`channel`): while tools hold leases, the scope in force is the union of
//! their scopes; when the last one leaves, the base scope is back.
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
//! entry ([`Verdict`], in `names::CodeNames`), with the scope generation it
//! was decided under. Each change of the scope bumps [`GENERATION`], so every
//! entry is decided again at its next event: one load and one compare per
//! event otherwise.
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
//! Applying a change runs with the GIL, from the watcher's hand-off
//! (`watcher::apply_with_gil`), and does no import or I/O: the scope was
//! parsed, and the leases checked, by the watcher thread without the GIL.

mod glob;

use std::cell::Cell;
use std::ffi::CStr;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::ffi;
use pyo3::prelude::*;

pub use glob::{Glob, GlobError};

use crate::channel;
use crate::faults::{self, lock};
use crate::names::CodeNames;

/// A scope: module names and file globs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    modules: Vec<String>,
    globs: Vec<Glob>,
}

/// Why a scope's text cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeError {
    Glob(GlobError),
    ModuleName {
        name: String,
        reason: String,
    },
    Empty,
    TooLong {
        len: usize,
        limit: usize,
    },
    NotUtf8,
    /// A lease's `probe:NAME` names no probe of the provider.
    Probe(String),
    /// A lease's `follow:PATH` is malformed, or another lease follows already.
    Follow(String),
}

impl fmt::Display for ScopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScopeError::Glob(err) => write!(f, "{err}"),
            ScopeError::ModuleName { name, reason } => write!(
                f,
                "{name:?} is not a module name: {reason} (a file? give it as a file glob)"
            ),
            ScopeError::Empty => write!(f, "the scope names no module and no file"),
            ScopeError::TooLong { len, limit } => {
                write!(f, "the scope is {len} bytes long; at most {limit} fit")
            }
            ScopeError::NotUtf8 => write!(f, "the scope is not UTF-8 text"),
            ScopeError::Probe(name) => write!(f, "provider python has no probe {name:?}"),
            ScopeError::Follow(why) => write!(f, "follow: {why}"),
        }
    }
}

impl Scope {
    /// Parses a scope: entries separated by commas or newlines, each
    /// `module:NAME`, `file:GLOB`, or without a prefix: a file glob if it
    /// holds `/`, `*`, `?`, `[`, `\` or `<`, otherwise a module name. Blank
    /// entries are skipped; a text without entries gives an empty scope.
    pub fn parse(text: &str) -> Result<Scope, ScopeError> {
        let mut scope = Scope::default();
        for entry in text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            if let Some(name) = entry.strip_prefix("module:") {
                scope.add_module(name.trim())?;
            } else if let Some(glob) = entry.strip_prefix("file:") {
                scope.add_glob(glob.trim())?;
            } else if entry.contains(['/', '*', '?', '[', '\\', '<']) {
                scope.add_glob(entry)?;
            } else {
                scope.add_module(entry)?;
            }
        }
        Ok(scope)
    }

    fn add_module(&mut self, name: &str) -> Result<(), ScopeError> {
        check_module_name(name)?;
        if !self.modules.iter().any(|m| m == name) {
            self.modules.push(name.to_owned());
        }
        Ok(())
    }

    fn add_glob(&mut self, text: &str) -> Result<(), ScopeError> {
        let glob = Glob::new(text).map_err(ScopeError::Glob)?;
        if !self.globs.iter().any(|g| g.as_str() == text) {
            self.globs.push(glob);
        }
        Ok(())
    }

    /// Whether the scope names nothing (then it is no scope: everything fires).
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty() && self.globs.is_empty()
    }

    /// The module names.
    pub fn modules(&self) -> &[String] {
        &self.modules
    }

    /// The file globs, as written.
    pub fn files(&self) -> impl Iterator<Item = &str> {
        self.globs.iter().map(Glob::as_str)
    }

    /// Everything of `self` and of `other`.
    pub fn union(&self, other: &Scope) -> Scope {
        let mut out = self.clone();
        for module in &other.modules {
            if !out.modules.contains(module) {
                out.modules.push(module.clone());
            }
        }
        for glob in &other.globs {
            if !out.globs.iter().any(|g| g.as_str() == glob.as_str()) {
                out.globs.push(glob.clone());
            }
        }
        out
    }

    /// The scope as text, one prefixed entry per line (what [`Scope::parse`] reads back).
    pub fn text(&self) -> String {
        let modules = self.modules.iter().map(|m| format!("module:{m}"));
        let files = self.files().map(|g| format!("file:{g}"));
        modules.chain(files).collect::<Vec<_>>().join("\n")
    }

    /// Whether code whose frames run under module `name` is in scope.
    fn covers_module(&self, name: &str) -> bool {
        self.modules.iter().any(|m| {
            name.strip_prefix(m.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
    }

    /// Whether a code object with these module names and filename is in scope.
    pub fn covers(&self, modules: &[String], filename: &str) -> bool {
        modules.iter().any(|m| self.covers_module(m))
            || self.globs.iter().any(|g| g.matches(filename))
    }
}

/// A dotted name whose parts are identifiers (Unicode letters, digits and
/// `_`, not starting with a digit). Whether such a module exists is not
/// asked: it may be imported later.
fn check_module_name(name: &str) -> Result<(), ScopeError> {
    let bad = |reason: &str| {
        Err(ScopeError::ModuleName {
            name: name.to_owned(),
            reason: reason.to_owned(),
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    for part in name.split('.') {
        let mut chars = part.chars();
        match chars.next() {
            None => return bad("it has an empty part between dots"),
            Some(c) if !(c == '_' || c.is_alphabetic()) => {
                return bad("each dotted part must start with a letter or '_'")
            }
            _ => {}
        }
        if !chars.all(|c| c == '_' || c.is_alphanumeric()) {
            return bad("each dotted part may hold only letters, digits and '_'");
        }
    }
    Ok(())
}

// --- the scope in force -----------------------------------------------------

/// The scope generation: bumped at each change of the scope in force; the
/// verdicts cached under an older one are decided again. Starts at 1, so a
/// fresh [`Verdict`] (generation 0) is always decided.
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
/// are armed). A text that cannot be parsed leaves the scope as it is, with
/// one warning.
pub fn set_base(py: Python<'_>, text: &str) {
    match Scope::parse(text) {
        Ok(scope) => {
            let scope = (!scope.is_empty()).then(|| Arc::new(scope));
            *lock(&BASE) = scope.clone();
            // Leases, if any, stay in force; the watcher falls back to the new base when they end.
            if !channel::leases_held() {
                install(py, scope, Vec::new());
            }
        }
        Err(err) => warn_malformed(py, &format!("PYDTRACE_SCOPE={text:?}: {err}")),
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

/// Puts `scope` in force, with the GIL, and publishes it in the channel. A
/// change of the scope bumps the generation and, if anything was disabled
/// since the last restart, restarts `sys.monitoring`'s events.
fn install(py: Python<'_>, scope: Option<Arc<Scope>>, tools: Vec<u32>) {
    let changed = {
        let mut in_force = lock(&IN_FORCE);
        let changed = in_force.scope != scope;
        in_force.scope = scope.clone();
        in_force.tools = tools.clone();
        changed
    };
    if changed {
        GENERATION.fetch_add(1, Ordering::AcqRel);
        restart_if_disabled(py);
    }
    channel::publish(scope.as_deref(), &tools, GENERATION.load(Ordering::Acquire));
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

// --- a change from the watcher ----------------------------------------------

/// A change the watcher worked out without the GIL, to apply with it.
#[derive(Default)]
pub struct Proposal {
    /// The scope to put in force, and the tools whose leases made it.
    pub change: Option<(Option<Arc<Scope>>, Vec<u32>)>,
    /// Leases to acknowledge once the change is in force.
    pub acks: Vec<channel::Ack>,
    /// A malformed scope to warn about (once per process).
    pub warning: Option<String>,
}

static PROPOSAL: Mutex<Option<Proposal>> = Mutex::new(None);
/// Whether [`PROPOSAL`] holds one (read by every poll of the watcher, without a lock).
static PROPOSAL_WAITING: AtomicBool = AtomicBool::new(false);

/// Hands a change to the next [`apply`]; merges with one not applied yet.
pub fn propose(proposal: Proposal) {
    let mut waiting = lock(&PROPOSAL);
    PROPOSAL_WAITING.store(true, Ordering::Release);
    match waiting.as_mut() {
        None => *waiting = Some(proposal),
        Some(earlier) => {
            if proposal.change.is_some() {
                earlier.change = proposal.change;
            }
            earlier.acks.extend(proposal.acks);
            if proposal.warning.is_some() {
                earlier.warning = proposal.warning;
            }
        }
    }
}

/// Whether a proposal waits for [`apply`].
pub fn proposal_waiting() -> bool {
    PROPOSAL_WAITING.load(Ordering::Acquire)
}

/// Applies the waiting proposal, if any; with the GIL (the watcher's hand-off).
/// Returns the leases to acknowledge once the probes they ask for are armed
/// too (the caller arms, then acknowledges): a tool that saw its
/// acknowledgement starts its tracer knowing that no out-of-scope event will
/// come and that the probes it asked for fire.
#[must_use]
pub fn apply(py: Python<'_>) -> Vec<channel::Ack> {
    let proposal = {
        let mut waiting = lock(&PROPOSAL);
        PROPOSAL_WAITING.store(false, Ordering::Release);
        waiting.take()
    };
    let Some(proposal) = proposal else {
        return Vec::new();
    };
    if let Some(what) = &proposal.warning {
        warn_malformed(py, what);
    }
    if let Some((scope, tools)) = proposal.change {
        install(py, scope, tools);
    }
    proposal.acks
}

// --- the per-code-object verdict ---------------------------------------------

/// Whether a code object is in scope, decided under a scope generation; kept
/// in the code object's name-cache entry. Read and written with the GIL.
pub struct Verdict {
    generation: Cell<u32>,
    allowed: Cell<bool>,
}

impl Verdict {
    /// Not decided yet.
    pub const fn new() -> Verdict {
        Verdict {
            generation: Cell::new(0),
            allowed: Cell::new(true),
        }
    }
}

/// Whether the code object `code`, whose cached names are `names`, may fire
/// the code probes: decided on its first event under each scope generation,
/// then one load and one compare.
///
/// # Safety
/// GIL held, in a `sys.monitoring` callback of `code` (its frame runs).
#[inline(always)]
pub unsafe fn allows_names(code: *mut ffi::PyObject, names: &CodeNames) -> bool {
    let generation = GENERATION.load(Ordering::Relaxed);
    let verdict = names.scope_verdict();
    if verdict.generation.get() == generation {
        return verdict.allowed.get();
    }
    decide(code, names, generation)
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
    let verdict = names.scope_verdict();
    verdict.generation.set(generation);
    verdict.allowed.set(allowed);
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
