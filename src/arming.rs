//! Switches on exactly the interpreter hooks that the enabled probes need,
//! and off again when nobody wants them.
//!
//! | probes                          | hook                                           |
//! |---------------------------------|------------------------------------------------|
//! | function-entry                  | sys.monitoring PY_START, PY_RESUME, PY_THROW   |
//! | function-return                 | sys.monitoring PY_RETURN, PY_YIELD, PY_UNWIND  |
//! | line                            | sys.monitoring LINE                            |
//! | instance-new-start, -done       | sys.monitoring CALL, C_RETURN, C_RAISE         |
//! | cfunction-entry, -return        | sys.monitoring CALL, C_RETURN, C_RAISE         |
//! | instance-delete-start, -done    | our dealloc in every Python class (`instances`) |
//! | gc-start, gc-done               | a callback in `gc.callbacks`                   |
//! | import-find-load-start, -done   | a wrapper around `importlib._bootstrap._find_and_load` |
//! | audit                           | a C audit hook, added once (it cannot be removed) |
//! | aggregate-calls                  | sys.monitoring PY_START, PY_RESUME, PY_THROW (counted in the process, `aggregate`) |
//! | aggregate-time, aggregate-node       | those and PY_RETURN, PY_YIELD, PY_UNWIND (timed, the tree built in the process) |
//! | aggregate-lines                      | sys.monitoring LINE (counted in the process)   |
//! | aggregate-flush                 | nothing: fired at each flush                   |
//!
//! Where the interpreter was built `--with-dtrace` and fires a probe itself,
//! that probe is left to the interpreter (docs/decisions.md, 6).
//!
//! Before the first consumer: no tool id, no event, no callback of ours.
//! Once a code probe was wanted the tool id stays claimed (with no events
//! set while idle) so that a later attach does not race other tools for it.
//!
//! Arming runs with the GIL held (from the watcher thread, or from the API),
//! and publishes what is live in [`live`] for lock-free readers.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use pyo3::prelude::*;
use pyo3::types::{PyList, PyString};

use crate::aggregate;
use crate::callbacks::{self, Hook};
use crate::cfunctions;
use crate::error::Error;
use crate::faults::{self, warn};
use crate::instances;
use crate::probes::{self, ProbeSet};
use crate::scope;

/// The name our `sys.monitoring` tool id goes by.
const TOOL_NAME: &str = "pydtrace";
/// The tool ids we may take, in order of preference. 0 to 2 belong to
/// debuggers, coverage and profilers (cProfile takes 2) and 5 to optimizers.
const TOOL_IDS: [u8; 2] = [4, 3];

/// The instance-new probes.
const INSTANCE_NEW_PROBES: ProbeSet =
    ProbeSet::of(&[probes::INSTANCE_NEW_START, probes::INSTANCE_NEW_DONE]);
/// The C function probes.
const CFUNCTION_PROBES: ProbeSet =
    ProbeSet::of(&[probes::CFUNCTION_ENTRY, probes::CFUNCTION_RETURN]);
/// Probes served by CALL, C_RETURN and C_RAISE.
const CALL_PROBES: ProbeSet = INSTANCE_NEW_PROBES.union(CFUNCTION_PROBES);
/// The aggregate probes that switch gathering on (`aggregate`).
const AGGREGATE_PROBES: ProbeSet = ProbeSet::of(&[
    probes::AGGREGATE_CALLS,
    probes::AGGREGATE_TIME,
    probes::AGGREGATE_LINES,
    probes::AGGREGATE_NODE,
]);
/// The probe that ends each flush: fired, nothing to hook in.
const FLUSH_PROBES: ProbeSet = ProbeSet::of(&[probes::AGGREGATE_FLUSH]);
/// Probes that `sys.monitoring` serves.
const CODE_PROBES: ProbeSet = ProbeSet::of(&[
    probes::FUNCTION_ENTRY,
    probes::FUNCTION_RETURN,
    probes::LINE,
])
.union(CALL_PROBES)
.union(AGGREGATE_PROBES);
/// Probes that the class deallocation hook serves.
const DELETE_PROBES: ProbeSet =
    ProbeSet::of(&[probes::INSTANCE_DELETE_START, probes::INSTANCE_DELETE_DONE]);
/// Probes that the `gc.callbacks` entry serves.
pub(crate) const GC_PROBES: ProbeSet = ProbeSet::of(&[probes::GC_START, probes::GC_DONE]);
/// Probes that the `_find_and_load` wrapper serves.
pub(crate) const IMPORT_PROBES: ProbeSet = ProbeSet::of(&[
    probes::IMPORT_FIND_LOAD_START,
    probes::IMPORT_FIND_LOAD_DONE,
]);
/// The probe the audit hook serves.
pub(crate) const AUDIT_PROBES: ProbeSet = ProbeSet::of(&[probes::AUDIT]);
/// Probes this build can arm.
pub const ARMABLE: ProbeSet = CODE_PROBES
    .union(FLUSH_PROBES)
    .union(GC_PROBES)
    .union(IMPORT_PROBES)
    .union(AUDIT_PROBES)
    .union(if instances::DELETE_SUPPORTED {
        DELETE_PROBES
    } else {
        ProbeSet::EMPTY
    });

/// The probes this build never arms, each with the reason (the complement of [`ARMABLE`]).
pub fn unsupported() -> impl Iterator<Item = (&'static str, &'static str)> {
    DELETE_PROBES
        .difference(ARMABLE)
        .dtrace_names()
        .map(|name| (name, instances::DELETE_UNSUPPORTED_REASON))
}

/// The probes that are live now: wanted by a consumer and hooked in. Bit
/// `i` for probe index `i` (the provider file's order). Exported under a
/// fixed name so that a process's state can be read from outside, by a
/// tool with the tracer's privileges, through `/proc/PID/mem`.
#[export_name = "pydtrace_live_probes"]
static LIVE: AtomicU32 = AtomicU32::new(0);

/// The probes that are live now.
pub fn live() -> ProbeSet {
    ProbeSet::from_bits(LIVE.load(Ordering::Acquire))
}

/// The `sys.monitoring` tool id the probes hold, if they claimed one.
pub fn tool_id() -> Option<u8> {
    // try_lock: an audit hook that arming's own calls trigger may ask from inside arming.
    STATE.try_lock().ok()?.monitoring.as_ref().map(|m| m.tool)
}

/// The `sys.monitoring` callables, made once.
struct MonitoringCallbacks {
    start: Py<PyAny>,
    resume: Py<PyAny>,
    leave: Py<PyAny>,
    unwind: Py<PyAny>,
    line: Py<PyAny>,
    call: Py<PyAny>,
    call_end: Py<PyAny>,
    cfunction_call: Py<PyAny>,
    cfunction_call_end: Py<PyAny>,
    call_both: Py<PyAny>,
    call_end_both: Py<PyAny>,
}

impl MonitoringCallbacks {
    /// The callable of one of the CALL, C_RETURN and C_RAISE hooks.
    fn call_hook(&self, hook: Hook) -> &Py<PyAny> {
        match hook {
            Hook::CallEnd => &self.call_end,
            Hook::CFunctionCall => &self.cfunction_call,
            Hook::CFunctionCallEnd => &self.cfunction_call_end,
            Hook::CallBoth => &self.call_both,
            Hook::CallEndBoth => &self.call_end_both,
            _ => &self.call,
        }
    }
}

/// The callbacks for CALL and for C_RETURN and C_RAISE (None: none of ours),
/// chosen by which of the probes they serve are wanted, so that each
/// callback does only the work of those: the instance-new probes alone keep
/// the callbacks they had before the C function probes existed.
type CallHooks = (Option<Hook>, Option<Hook>);

fn call_hooks(wanted: ProbeSet) -> CallHooks {
    let instance = !wanted.intersection(INSTANCE_NEW_PROBES).is_empty();
    let entry = wanted.contains(probes::CFUNCTION_ENTRY);
    let exit = wanted.contains(probes::CFUNCTION_RETURN);
    match (instance, entry || exit) {
        // Each event gets the shared callback only if its C function probe
        // is wanted: cfunction-return alone leaves CALL to the instances.
        (true, true) => (
            Some(if entry { Hook::CallBoth } else { Hook::Call }),
            Some(if exit {
                Hook::CallEndBoth
            } else {
                Hook::CallEnd
            }),
        ),
        (true, false) => (Some(Hook::Call), Some(Hook::CallEnd)),
        // C_RETURN and C_RAISE come whenever CALL is on: a probe not wanted
        // gets no callback at all.
        (false, true) => (
            entry.then_some(Hook::CFunctionCall),
            exit.then_some(Hook::CFunctionCallEnd),
        ),
        (false, false) => (Some(Hook::Call), Some(Hook::CallEnd)),
    }
}

/// Our tool id and the event numbers of this interpreter.
struct Monitoring {
    tool: u8,
    events: EventBits,
}

/// `sys.monitoring.events` values that the code probes use.
#[derive(Clone, Copy)]
struct EventBits {
    py_start: u32,
    py_resume: u32,
    py_throw: u32,
    py_return: u32,
    py_yield: u32,
    py_unwind: u32,
    line: u32,
    call: u32,
    c_return: u32,
    c_raise: u32,
}

impl EventBits {
    fn read(events: &Bound<'_, PyAny>) -> PyResult<EventBits> {
        let get = |name: &str| events.getattr(name)?.extract::<u32>();
        Ok(EventBits {
            py_start: get("PY_START")?,
            py_resume: get("PY_RESUME")?,
            py_throw: get("PY_THROW")?,
            py_return: get("PY_RETURN")?,
            py_yield: get("PY_YIELD")?,
            py_unwind: get("PY_UNWIND")?,
            line: get("LINE")?,
            call: get("CALL")?,
            c_return: get("C_RETURN")?,
            c_raise: get("C_RAISE")?,
        })
    }

    /// The events that serve `probes`.
    fn for_probes(&self, probes: ProbeSet) -> u32 {
        let mut events = 0;
        let entries = ProbeSet::of(&[
            probes::FUNCTION_ENTRY,
            probes::AGGREGATE_CALLS,
            probes::AGGREGATE_TIME,
            probes::AGGREGATE_NODE,
        ]);
        let returns = ProbeSet::of(&[
            probes::FUNCTION_RETURN,
            probes::AGGREGATE_TIME,
            probes::AGGREGATE_NODE,
        ]);
        if !probes.intersection(entries).is_empty() {
            events |= self.py_start | self.py_resume | self.py_throw;
        }
        if !probes.intersection(returns).is_empty() {
            events |= self.py_return | self.py_yield | self.py_unwind;
        }
        if probes.contains(probes::LINE) || probes.contains(probes::AGGREGATE_LINES) {
            events |= self.line;
        }
        // C_RETURN and C_RAISE come only with CALL (sys.monitoring refuses
        // them alone), and the C function probes' pairing needs all three.
        if !probes.intersection(CALL_PROBES).is_empty() {
            events |= self.call | self.c_return | self.c_raise;
        }
        events
    }
}

/// Everything arming has switched on.
struct State {
    monitoring: Option<Monitoring>,
    callbacks: Option<MonitoringCallbacks>,
    /// Our `sys.monitoring` events now, and the code probes they serve.
    code_events: u32,
    /// The callbacks registered for CALL, and for C_RETURN and C_RAISE.
    call_hooks: CallHooks,
    code_live: ProbeSet,
    gc_callback: Option<Py<PyAny>>,
    /// The gc probes served while our callback is in `gc.callbacks`.
    gc_live: ProbeSet,
    /// Our `_find_and_load` wrapper while it is installed, and the import probes it serves.
    import_wrapper: Option<Py<PyAny>>,
    import_live: ProbeSet,
    /// The delete probes served while every Python class has our dealloc.
    delete_live: ProbeSet,
    /// Whether adding the audit hook was tried (it is tried once), and the audit probe served.
    audit_hook_tried: bool,
    audit_live: ProbeSet,
    warned_no_tool: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    monitoring: None,
    callbacks: None,
    code_events: 0,
    call_hooks: (Some(Hook::Call), Some(Hook::CallEnd)),
    code_live: ProbeSet::EMPTY,
    gc_callback: None,
    gc_live: ProbeSet::EMPTY,
    import_wrapper: None,
    import_live: ProbeSet::EMPTY,
    delete_live: ProbeSet::EMPTY,
    audit_hook_tried: false,
    audit_live: ProbeSet::EMPTY,
    warned_no_tool: false,
});

thread_local! {
    /// Set while this thread holds [`STATE`].
    static ARMING: Cell<bool> = const { Cell::new(false) };
}

/// [`STATE`], locked by this thread until the guard drops.
struct StateGuard(MutexGuard<'static, State>);

impl std::ops::Deref for StateGuard {
    type Target = State;
    fn deref(&self) -> &State {
        &self.0
    }
}

impl std::ops::DerefMut for StateGuard {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.0
    }
}

impl Drop for StateGuard {
    fn drop(&mut self) {
        ARMING.set(false);
    }
}

/// Whether this thread is inside [`apply`] now (Python code that arming
/// runs can re-enter it, through an audit hook or a pending call).
pub fn arming_here() -> bool {
    ARMING.get()
}

/// Locks [`STATE`] without deadlocking against the GIL: another thread may
/// hold the lock while it waits for the GIL (arming runs Python code, which
/// lets other threads run), so the GIL is released while waiting. `None` if
/// this thread holds the lock already.
fn lock_state(_py: Python<'_>) -> Option<StateGuard> {
    if ARMING.get() {
        return None;
    }
    let guard = match STATE.try_lock() {
        Ok(guard) => guard,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => {
            // SAFETY: the GIL is held (`_py`); it is released while waiting and
            // taken back before anything else touches Python.
            unsafe {
                let thread = pyo3::ffi::PyEval_SaveThread();
                let guard = faults::lock(&STATE);
                pyo3::ffi::PyEval_RestoreThread(thread);
                guard
            }
        }
    };
    ARMING.set(true);
    Some(StateGuard(guard))
}

/// A new callable for `hook`.
fn callable(py: Python<'_>, hook: Hook) -> PyResult<Py<PyAny>> {
    callbacks::callable(py, hook, None)
}

extern "C" {
    // Not in pyo3-ffi: the C-level audit hook API of PEP 578.
    fn PySys_AddAuditHook(
        hook: unsafe extern "C" fn(
            *const std::os::raw::c_char,
            *mut pyo3::ffi::PyObject,
            *mut std::ffi::c_void,
        ) -> std::os::raw::c_int,
        user_data: *mut std::ffi::c_void,
    ) -> std::os::raw::c_int;
    fn PySys_Audit(
        event: *const std::os::raw::c_char,
        format: *const std::os::raw::c_char,
        ...
    ) -> std::os::raw::c_int;
}

impl State {
    /// Claims a tool id and registers the callbacks, once, and again if
    /// another tool freed or took our id meanwhile.
    fn monitoring(
        &mut self,
        py: Python<'_>,
        monitoring: &Bound<'_, PyAny>,
    ) -> Result<&Monitoring, Error> {
        if let Some(current) = &self.monitoring {
            if !holds_tool_id(monitoring, current.tool)? {
                self.monitoring = None;
                self.code_events = 0;
            }
        }
        if self.monitoring.is_none() {
            let tool = claim_tool_id(monitoring)?;
            let events = EventBits::read(&monitoring.getattr("events")?)?;
            let callbacks = match self.callbacks.take() {
                Some(callbacks) => callbacks,
                None => MonitoringCallbacks {
                    start: callable(py, Hook::Start)?,
                    resume: callable(py, Hook::Resume)?,
                    leave: callable(py, Hook::Leave)?,
                    unwind: callable(py, Hook::Unwind)?,
                    line: callable(py, Hook::Line)?,
                    call: callable(py, Hook::Call)?,
                    call_end: callable(py, Hook::CallEnd)?,
                    cfunction_call: callable(py, Hook::CFunctionCall)?,
                    cfunction_call_end: callable(py, Hook::CFunctionCallEnd)?,
                    call_both: callable(py, Hook::CallBoth)?,
                    call_end_both: callable(py, Hook::CallEndBoth)?,
                },
            };
            let register = monitoring.getattr("register_callback")?;
            for (event, callback) in [
                (events.py_start, &callbacks.start),
                (events.py_resume, &callbacks.resume),
                (events.py_throw, &callbacks.resume),
                (events.py_return, &callbacks.leave),
                (events.py_yield, &callbacks.leave),
                (events.py_unwind, &callbacks.unwind),
                (events.line, &callbacks.line),
                (events.call, &callbacks.call),
                (events.c_return, &callbacks.call_end),
                (events.c_raise, &callbacks.call_end),
            ] {
                register.call1((tool, event, callback))?;
            }
            self.callbacks = Some(callbacks);
            self.call_hooks = (Some(Hook::Call), Some(Hook::CallEnd));
            self.monitoring = Some(Monitoring { tool, events });
        }
        Ok(self.monitoring.as_ref().expect("set above"))
    }

    /// Sets our `sys.monitoring` events to those that serve the code probes
    /// of `wanted`. Without a free tool id the code probes stay off (with
    /// one warning).
    fn set_code_events(&mut self, py: Python<'_>, wanted: ProbeSet) -> Result<(), Error> {
        let wanted = wanted.intersection(CODE_PROBES);
        if wanted == self.code_live {
            return Ok(());
        }
        if !wanted.intersection(CALL_PROBES).is_empty() {
            // Telling Python classes apart needs CPython's subtype_dealloc (also
            // for the C function probes, which leave Python classes alone).
            instances::ensure_init(py)?;
        }
        if !wanted.intersection(CFUNCTION_PROBES).is_empty() {
            cfunctions::check_layout();
        }
        let monitoring = py.import("sys")?.getattr("monitoring")?;
        let (tool, events_of, events) = match self.monitoring(py, &monitoring) {
            Ok(m) => (m.tool, m.events, m.events.for_probes(wanted)),
            Err(Error::NoFreeToolId) => {
                if !self.warned_no_tool {
                    self.warned_no_tool = true;
                    warn(py, &Error::NoFreeToolId.to_string());
                }
                return Ok(());
            }
            Err(err) => return Err(err),
        };
        // The callbacks for what is wanted, before the events flow.
        let hooks = call_hooks(wanted);
        if hooks != self.call_hooks {
            let registered = self
                .callbacks
                .as_ref()
                .expect("registered with the tool id");
            let none = py.None();
            let callable_of =
                |hook: Option<Hook>| hook.map_or(&none, |hook| registered.call_hook(hook));
            for (event, hook) in [
                (events_of.call, hooks.0),
                (events_of.c_return, hooks.1),
                (events_of.c_raise, hooks.1),
            ] {
                monitoring.call_method1("register_callback", (tool, event, callable_of(hook)))?;
            }
            // The C function probes' own CALL callback disabled the C calls out
            // of the scope; the instance probes, not scoped, must see them again.
            let instance_wanted = !wanted.intersection(INSTANCE_NEW_PROBES).is_empty();
            if self.call_hooks.0 == Some(Hook::CFunctionCall) && instance_wanted {
                scope::restart_if_disabled(py);
            }
            self.call_hooks = hooks;
        }
        if events != self.code_events {
            monitoring.call_method1("set_events", (tool, events))?;
            self.code_events = events;
        }
        if wanted.intersection(CFUNCTION_PROBES).is_empty() {
            // Nothing is kept alive for the C function probes while they are off.
            cfunctions::clear();
        }
        set_gathering(py, wanted);
        self.code_live = wanted;
        Ok(())
    }

    /// Puts our callback into `gc.callbacks` while any gc probe is wanted,
    /// and takes it out when none is.
    fn set_gc_callback(&mut self, py: Python<'_>, wanted: ProbeSet) -> Result<(), Error> {
        let on = !wanted.is_empty();
        if on == self.gc_live.is_empty() {
            let callbacks = py
                .import("gc")?
                .getattr("callbacks")?
                .cast_into::<PyList>()
                .map_err(PyErr::from)?;
            if self.gc_callback.is_none() {
                callbacks::init_gc_keys();
                self.gc_callback = Some(callable(py, Hook::Gc)?);
            }
            let ours = self.gc_callback.as_ref().expect("set above").bind(py);
            // Found by identity: comparing with == could run other callbacks' __eq__.
            let position = callbacks.iter().position(|item| item.is(ours));
            match (on, position) {
                (true, None) => callbacks.append(ours)?,
                (false, Some(index)) => callbacks.del_item(index)?,
                _ => {}
            }
        }
        self.gc_live = wanted;
        Ok(())
    }

    /// Wraps `importlib._bootstrap._find_and_load` while an import probe is
    /// wanted, and puts the original back when none is. If someone wrapped
    /// it again meanwhile, ours stays inside theirs (its probes fire into
    /// nothing) rather than breaking their wrapper.
    fn set_import_hook(&mut self, py: Python<'_>, wanted: ProbeSet) -> Result<(), Error> {
        let on = !wanted.is_empty();
        if on != self.import_wrapper.is_some() {
            // The interpreter's import statement looks the function up on this module each time.
            let bootstrap = py.import("_frozen_importlib")?;
            let current = bootstrap.getattr("_find_and_load")?;
            if on {
                let wrapper = callbacks::callable(py, Hook::FindAndLoad, Some(&current))?;
                bootstrap.setattr("_find_and_load", &wrapper)?;
                self.import_wrapper = Some(wrapper);
            } else if let Some(wrapper) = self.import_wrapper.take() {
                if current.is(wrapper.bind(py)) {
                    bootstrap.setattr("_find_and_load", wrapper.bind(py).getattr("__self__")?)?;
                }
            }
        }
        self.import_live = if self.import_wrapper.is_some() {
            wanted
        } else {
            ProbeSet::EMPTY
        };
        Ok(())
    }

    /// Puts our dealloc into every Python class while a delete probe is
    /// wanted, and CPython's back when none is.
    fn set_delete_hooks(&mut self, py: Python<'_>, wanted: ProbeSet) -> Result<(), Error> {
        instances::set_delete_hooks(py, !wanted.is_empty())?;
        self.delete_live = wanted;
        Ok(())
    }

    /// Adds the audit hook the first time the audit probe is wanted, and
    /// switches its firing on and off. The hook is proven added by an audit
    /// event of our own: a hook that vetoes `sys.addaudithook` with a
    /// RuntimeError makes CPython drop ours silently.
    fn set_audit_hook(&mut self, py: Python<'_>, wanted: ProbeSet) {
        if !wanted.is_empty() && !self.audit_hook_tried {
            self.audit_hook_tried = true;
            // SAFETY: GIL held; the hook is a static function that never fails.
            unsafe {
                if PySys_AddAuditHook(callbacks::on_audit, std::ptr::null_mut()) != 0
                    || PySys_Audit(callbacks::AUDIT_SELF_CHECK.as_ptr(), std::ptr::null()) != 0
                {
                    pyo3::ffi::PyErr_Clear();
                }
            }
            if !callbacks::AUDIT_HOOK_SEEN.load(Ordering::Relaxed) {
                warn(
                    py,
                    "the audit probe stays off: another audit hook refused the addition of ours",
                );
            }
        }
        let on = !wanted.is_empty() && callbacks::AUDIT_HOOK_SEEN.load(Ordering::Relaxed);
        callbacks::AUDIT_ON.store(on, Ordering::Relaxed);
        self.audit_live = if on { wanted } else { ProbeSet::EMPTY };
    }
}

/// Tells the callbacks which per-event probes to fire and what to gather
/// (`aggregate`) for the code probes `wanted`.
fn set_gathering(py: Python<'_>, wanted: ProbeSet) {
    let bit = |probe: usize, bit: u8| if wanted.contains(probe) { bit } else { 0 };
    let per_event = bit(probes::FUNCTION_ENTRY, callbacks::FIRE_ENTRY)
        | bit(probes::FUNCTION_RETURN, callbacks::FIRE_RETURN)
        | bit(probes::LINE, callbacks::FIRE_LINE);
    callbacks::PER_EVENT.store(per_event, Ordering::Relaxed);
    aggregate::set_mode(
        py,
        bit(probes::AGGREGATE_CALLS, aggregate::COUNT)
            | bit(probes::AGGREGATE_TIME, aggregate::TIME)
            | bit(probes::AGGREGATE_LINES, aggregate::LINES)
            | bit(probes::AGGREGATE_NODE, aggregate::TREE),
    );
}

/// Whether tool id `id` goes by our name.
fn holds_tool_id(monitoring: &Bound<'_, PyAny>, id: u8) -> PyResult<bool> {
    let holder = monitoring.call_method1("get_tool", (id,))?;
    Ok(holder
        .cast::<PyString>()
        .is_ok_and(|name| name.to_str().is_ok_and(|n| n == TOOL_NAME)))
}

/// Takes the first free tool id of [`TOOL_IDS`] (or the one already ours).
fn claim_tool_id(monitoring: &Bound<'_, PyAny>) -> Result<u8, Error> {
    for id in TOOL_IDS {
        if holds_tool_id(monitoring, id)? {
            return Ok(id);
        }
        if monitoring.call_method1("get_tool", (id,))?.is_none() {
            monitoring.call_method1("use_tool_id", (id, TOOL_NAME))?;
            return Ok(id);
        }
    }
    Err(Error::NoFreeToolId)
}

/// Hooks in exactly the probes of `wanted` that this build can arm (and that
/// have not failed), unhooks the rest, and publishes what is live.
pub fn apply(py: Python<'_>, wanted: ProbeSet) -> Result<ProbeSet, Error> {
    faults::forget_failures_except(wanted);
    let wanted = wanted.intersection(ARMABLE).difference(faults::failed());
    let Some(mut state) = lock_state(py) else {
        // Re-entered from Python code that arming itself ran (an audit hook,
        // say): leave it to the outer call.
        return Ok(live());
    };
    let result = state
        .set_code_events(py, wanted)
        .and_then(|()| state.set_gc_callback(py, wanted.intersection(GC_PROBES)))
        .and_then(|()| state.set_import_hook(py, wanted.intersection(IMPORT_PROBES)))
        .and_then(|()| state.set_delete_hooks(py, wanted.intersection(DELETE_PROBES)))
        .map(|()| state.set_audit_hook(py, wanted.intersection(AUDIT_PROBES)));
    // Publish what is hooked in, also when a step failed part-way.
    let live = state
        .code_live
        .union(wanted.intersection(FLUSH_PROBES))
        .union(state.gc_live)
        .union(state.import_live)
        .union(state.delete_live)
        .union(state.audit_live);
    LIVE.store(live.bits(), Ordering::Release);
    result.map(|()| live)
}
