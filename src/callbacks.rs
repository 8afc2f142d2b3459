//! The native callbacks that `sys.monitoring` and `gc.callbacks` call.
//!
//! They are plain `METH_FASTCALL` C functions, not PyO3 functions: the
//! interpreter calls them through vectorcall with the arguments in an
//! array, and each one does no more than look up the code object's cached
//! names, read an offset or line, and fire its probe. Nothing here
//! allocates per event, waits for a lock, or can raise into the traced program:
//! every callback returns `None` (or, for code outside the scope and an
//! event that can be disabled, `sys.monitoring.DISABLE`: see `scope`), and
//! a failure to work out a probe's arguments is reported once through
//! `faults::report_internal_error`, which switches that probe off.

use std::os::raw::c_char;
use std::ptr::addr_of_mut;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::ffi;
use pyo3::prelude::*;

use crate::aggregate;
use crate::cfunctions;
use crate::faults;
use crate::instances;
use crate::names::{self, CodeNames};
use crate::probes::{self, fire};
use crate::scope;

type FastCallArgs = *mut *mut ffi::PyObject;

/// [`PER_EVENT`]: `function__entry` is armed.
pub const FIRE_ENTRY: u8 = 1;
/// [`PER_EVENT`]: `function__return` is armed.
pub const FIRE_RETURN: u8 = 2;
/// [`PER_EVENT`]: `line` is armed.
pub const FIRE_LINE: u8 = 4;

/// Which per-event code probes the callbacks fire (set by `arming`): the
/// same callbacks serve the aggregate probes, and a probe that the
/// interpreter fires itself (3.15 `--with-dtrace`) must not fire twice.
pub static PER_EVENT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

#[inline(always)]
fn per_event(bit: u8) -> bool {
    PER_EVENT.load(Ordering::Relaxed) & bit != 0
}

/// `None`, the one result every callback gives.
unsafe fn none() -> *mut ffi::PyObject {
    ffi::Py_NewRef(ffi::Py_None())
}

/// Argument `i`, or null where the interpreter passed fewer.
unsafe fn arg(args: FastCallArgs, nargs: ffi::Py_ssize_t, i: isize) -> *mut ffi::PyObject {
    if ffi::PyVectorcall_NARGS(nargs as usize) > i {
        *args.offset(i)
    } else {
        std::ptr::null_mut()
    }
}

/// The code object in argument 0 and its names; on failure the probe is
/// reported and `None` returned.
unsafe fn code_names<'a>(
    args: FastCallArgs,
    nargs: ffi::Py_ssize_t,
    probe: usize,
) -> Option<(*mut ffi::PyObject, &'a CodeNames)> {
    let code = arg(args, nargs, 0);
    names::of_event_code(code, probe).map(|names| (code, names))
}

/// Argument `i` as a C integer (an instruction offset or a line number).
unsafe fn int_arg(args: FastCallArgs, nargs: ffi::Py_ssize_t, i: isize) -> ffi::Py_ssize_t {
    names::event_int(arg(args, nargs, i))
}

/// PY_START(code, offset): a fresh call; its entry line is that of the
/// code's first instruction (worked out once per code object).
unsafe extern "C" fn on_start(
    _: *mut ffi::PyObject,
    args: FastCallArgs,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    if let Some((code, names)) = code_names(args, nargs, probes::FUNCTION_ENTRY) {
        if !scope::allows_names(code, names) {
            return scope::disable();
        }
        let mode = aggregate::mode();
        if mode != 0 {
            aggregate::enter(code, names.counts(), mode);
        }
        if per_event(FIRE_ENTRY) {
            fire::function_entry(
                names.filename(),
                names.name(),
                names.entry_line(),
                names.qualname(),
            );
        }
    }
    none()
}

/// PY_RESUME(code, offset) and PY_THROW(code, offset, exc): a generator or
/// coroutine resumes; its entry line is the line it resumes at.
unsafe extern "C" fn on_resume(
    _: *mut ffi::PyObject,
    args: FastCallArgs,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    if let Some((code, names)) = code_names(args, nargs, probes::FUNCTION_ENTRY) {
        if !scope::allows_names(code, names) {
            // PY_THROW (three arguments) cannot be disabled: CPython would raise.
            let resume = ffi::PyVectorcall_NARGS(nargs as usize) == 2;
            return if resume { scope::disable() } else { none() };
        }
        let mode = aggregate::mode();
        if mode != 0 {
            aggregate::enter(code, names.counts(), mode);
        }
        if per_event(FIRE_ENTRY) {
            let line = names.line_at(code, int_arg(args, nargs, 1));
            fire::function_entry(names.filename(), names.name(), line, names.qualname());
        }
    }
    none()
}

/// PY_RETURN and PY_YIELD(code, offset, value): the frame leaves, at the
/// line of the instruction that returned or yielded.
unsafe extern "C" fn on_leave(
    _: *mut ffi::PyObject,
    args: FastCallArgs,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    if let Some((code, names)) = code_names(args, nargs, probes::FUNCTION_RETURN) {
        if !scope::allows_names(code, names) {
            return scope::disable();
        }
        let mode = aggregate::mode();
        if mode != 0 {
            aggregate::leave(code, names.counts(), mode);
        }
        if per_event(FIRE_RETURN) {
            let line = names.line_at(code, int_arg(args, nargs, 1));
            fire::function_return(names.filename(), names.name(), line, names.qualname());
        }
    }
    none()
}

/// PY_UNWIND(code, offset, exception): the frame leaves with an exception,
/// at the line that raised. Cannot be disabled (CPython would raise), so
/// out-of-scope code calls back here once per unwound frame, for nothing.
unsafe extern "C" fn on_unwind(
    _: *mut ffi::PyObject,
    args: FastCallArgs,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    if let Some((code, names)) = code_names(args, nargs, probes::FUNCTION_RETURN) {
        if scope::allows_names(code, names) {
            let mode = aggregate::mode();
            if mode != 0 {
                aggregate::leave(code, names.counts(), mode);
            }
            if per_event(FIRE_RETURN) {
                let line = names.line_at(code, int_arg(args, nargs, 1));
                fire::function_return(names.filename(), names.name(), line, names.qualname());
            }
        }
    }
    none()
}

/// LINE(code, line_number): a new line starts.
unsafe extern "C" fn on_line(
    _: *mut ffi::PyObject,
    args: FastCallArgs,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    if let Some((code, names)) = code_names(args, nargs, probes::LINE) {
        if !scope::allows_names(code, names) {
            return scope::disable();
        }
        let line = int_arg(args, nargs, 1) as i32;
        if aggregate::mode() & aggregate::LINES != 0 {
            aggregate::line(names.counts(), line);
        }
        if per_event(FIRE_LINE) {
            fire::line(names.filename(), names.name(), line, names.qualname());
        }
    }
    none()
}

/// CALL(code, offset, callable, arg0): Python code calls something; for a
/// Python class, instance-new-start. (While only the instance-new probes
/// are wanted; see [`on_call_both`].)
unsafe extern "C" fn on_call(
    _: *mut ffi::PyObject,
    args: FastCallArgs,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    if let Some(class) = instances::called_class(arg(args, nargs, 2)) {
        instances::new_start(class);
    }
    none()
}

/// C_RETURN and C_RAISE(code, offset, callable, arg0): that call returned or
/// raised, after `__init__`; for a Python class, instance-new-done.
unsafe extern "C" fn on_call_end(
    _: *mut ffi::PyObject,
    args: FastCallArgs,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    if let Some(class) = instances::called_class(arg(args, nargs, 2)) {
        instances::new_done(class);
    }
    none()
}

/// CALL while only the C function probes are wanted: for a C callable,
/// cfunction-entry. A call of C code out of the scope is disabled at its
/// location: no CALL there any more, and so no C_RETURN or C_RAISE either.
unsafe extern "C" fn on_cfunction_call(
    _: *mut ffi::PyObject,
    args: FastCallArgs,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    let in_scope = cfunctions::entry(
        arg(args, nargs, 0),
        arg(args, nargs, 1),
        arg(args, nargs, 2),
    );
    if in_scope {
        none()
    } else {
        scope::disable()
    }
}

/// C_RETURN and C_RAISE while only the C function probes are wanted: for a
/// C callable, cfunction-return.
unsafe extern "C" fn on_cfunction_call_end(
    _: *mut ffi::PyObject,
    args: FastCallArgs,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    cfunctions::exit(
        arg(args, nargs, 0),
        arg(args, nargs, 1),
        arg(args, nargs, 2),
    );
    none()
}

/// CALL while the instance-new and the C function probes are wanted: a
/// Python class fires instance-new-start, a C callable cfunction-entry (the
/// two never both: a Python class is no C callable). Nothing is disabled:
/// the instance probes are not scoped.
unsafe extern "C" fn on_call_both(
    _: *mut ffi::PyObject,
    args: FastCallArgs,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    let callable = arg(args, nargs, 2);
    match instances::called_class(callable) {
        Some(class) => instances::new_start(class),
        None => {
            cfunctions::entry(arg(args, nargs, 0), arg(args, nargs, 1), callable);
        }
    }
    none()
}

/// C_RETURN and C_RAISE while both kinds are wanted: instance-new-done or
/// cfunction-return.
unsafe extern "C" fn on_call_end_both(
    _: *mut ffi::PyObject,
    args: FastCallArgs,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    let callable = arg(args, nargs, 2);
    match instances::called_class(callable) {
        Some(class) => instances::new_done(class),
        None => cfunctions::exit(arg(args, nargs, 0), arg(args, nargs, 1), callable),
    }
    none()
}

/// Does nothing: the floor a native `sys.monitoring` callback cannot go
/// below, for benchmarks to compare the probe callbacks with.
unsafe extern "C" fn noop(
    _: *mut ffi::PyObject,
    _: FastCallArgs,
    _: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    none()
}

/// A `gc.callbacks` entry: (phase, info), phase "start" or "stop".
unsafe extern "C" fn on_gc(
    _: *mut ffi::PyObject,
    args: FastCallArgs,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    let phase = arg(args, nargs, 0);
    let info = arg(args, nargs, 1);
    if phase.is_null()
        || info.is_null()
        || ffi::PyUnicode_Check(phase) == 0
        || ffi::PyDict_Check(info) == 0
    {
        faults::report_internal_error(probes::GC_START, "gc.callbacks passed unexpected arguments");
        return none();
    }
    let Some(keys) = GC_KEYS.get() else {
        return none();
    };
    if ffi::PyUnicode_CompareWithASCIIString(phase, c"start".as_ptr()) == 0 {
        fire::gc_start(dict_int(info, keys.generation) as i32);
    } else {
        // CPython's gc__done passes collected plus uncollectable.
        let collected = dict_int(info, keys.collected) + dict_int(info, keys.uncollectable);
        fire::gc_done(collected);
    }
    none()
}

/// The keys of gc's info dict, interned once (not a new string per lookup).
struct GcKeys {
    generation: *mut ffi::PyObject,
    collected: *mut ffi::PyObject,
    uncollectable: *mut ffi::PyObject,
}

// SAFETY: interned strings are immortal-ish and only used with the GIL held.
unsafe impl Send for GcKeys {}
unsafe impl Sync for GcKeys {}

static GC_KEYS: std::sync::OnceLock<GcKeys> = std::sync::OnceLock::new();

/// Interns gc's info keys; called with the GIL held before the gc callback
/// is installed.
pub fn init_gc_keys() {
    // SAFETY: GIL held by the caller (arming); the strings are kept forever.
    GC_KEYS.get_or_init(|| unsafe {
        GcKeys {
            generation: ffi::PyUnicode_InternFromString(c"generation".as_ptr()),
            collected: ffi::PyUnicode_InternFromString(c"collected".as_ptr()),
            uncollectable: ffi::PyUnicode_InternFromString(c"uncollectable".as_ptr()),
        }
    });
}

/// The integer `info[key]`, 0 where it is missing or not an integer.
unsafe fn dict_int(info: *mut ffi::PyObject, key: *mut ffi::PyObject) -> i64 {
    if key.is_null() {
        return 0;
    }
    let value = ffi::PyDict_GetItemWithError(info, key); // borrowed
    if value.is_null() {
        ffi::PyErr_Clear();
        return 0;
    }
    let n = ffi::PyLong_AsLongLong(value);
    if n == -1 && !ffi::PyErr_Occurred().is_null() {
        ffi::PyErr_Clear();
        return 0;
    }
    n
}

/// Stands in for `importlib._bootstrap._find_and_load(name, import_)`, which
/// the interpreter's import statement calls (by attribute lookup, every
/// time) for a module that is not in `sys.modules`: the place where CPython
/// fires its own import probes. `self` is the original function.
unsafe extern "C" fn on_find_and_load(
    original: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let name = arg(args.cast_mut(), nargsf, 0);
    if name.is_null() || ffi::PyUnicode_Check(name) == 0 || is_loaded(name) {
        // importlib.import_module() also comes here for loaded modules: no find, no load.
        return ffi::PyObject_Vectorcall(original, args, nargsf as usize, kwnames);
    }
    let name_utf8 = names::ProbeString::from_str_object(name);
    fire::import_find_load_start(name_utf8.as_ptr());
    let module = ffi::PyObject_Vectorcall(original, args, nargsf as usize, kwnames);
    fire::import_find_load_done(name_utf8.as_ptr(), i32::from(!module.is_null()));
    module
}

/// Whether `sys.modules[name]` is a module (not missing, not None).
unsafe fn is_loaded(name: *mut ffi::PyObject) -> bool {
    if crate::names::interpreter_finalizing() {
        return false; // sys.modules may be gone, and asking for it then is a fatal error
    }
    let modules = ffi::PyImport_GetModuleDict(); // borrowed
    if modules.is_null() || ffi::PyDict_Check(modules) == 0 {
        return false;
    }
    let module = ffi::PyDict_GetItemWithError(modules, name); // borrowed
    if module.is_null() {
        ffi::PyErr_Clear();
        return false;
    }
    module != ffi::Py_None()
}

/// Whether the audit hook fires the `audit` probe; the hook itself cannot
/// be removed once added, so while the probe is off it only reads this.
pub static AUDIT_ON: AtomicBool = AtomicBool::new(false);
/// Set by the hook when it sees [`AUDIT_SELF_CHECK`], proving it was added.
pub static AUDIT_HOOK_SEEN: AtomicBool = AtomicBool::new(false);
/// The audit event arming raises once, right after adding the hook.
pub const AUDIT_SELF_CHECK: &std::ffi::CStr = c"pydtrace.audit_hook_added";

/// The C-level audit hook (`PySys_AddAuditHook`): fires `audit(event, args)`
/// with the address of the event's argument tuple, as CPython does.
pub unsafe extern "C" fn on_audit(
    event: *const c_char,
    args: *mut ffi::PyObject,
    _: *mut std::ffi::c_void,
) -> std::os::raw::c_int {
    if AUDIT_ON.load(Ordering::Relaxed) {
        fire::audit(event, args as usize);
    } else if !AUDIT_HOOK_SEEN.load(Ordering::Relaxed)
        && std::ffi::CStr::from_ptr(event) == AUDIT_SELF_CHECK
    {
        AUDIT_HOOK_SEEN.store(true, Ordering::Relaxed);
    }
    0
}

/// A native callback, as the interpreter sees it.
pub struct Callback {
    def: ffi::PyMethodDef,
}

impl Callback {
    const fn new(name: &'static std::ffi::CStr, meth: ffi::PyCFunctionFast) -> Callback {
        Callback {
            def: ffi::PyMethodDef {
                ml_name: name.as_ptr(),
                ml_meth: ffi::PyMethodDefPointer {
                    PyCFunctionFast: meth,
                },
                ml_flags: ffi::METH_FASTCALL,
                ml_doc: std::ptr::null(),
            },
        }
    }

    const fn with_keywords(
        name: &'static std::ffi::CStr,
        meth: ffi::PyCFunctionFastWithKeywords,
    ) -> Callback {
        Callback {
            def: ffi::PyMethodDef {
                ml_name: name.as_ptr(),
                ml_meth: ffi::PyMethodDefPointer {
                    PyCFunctionFastWithKeywords: meth,
                },
                ml_flags: ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
                ml_doc: std::ptr::null(),
            },
        }
    }
}

// The interpreter keeps a pointer to each definition for the lifetime of
// the function objects made from it, so they are statics.
static mut ON_START: Callback = Callback::new(c"pydtrace_py_start", on_start);
static mut ON_RESUME: Callback = Callback::new(c"pydtrace_py_resume", on_resume);
static mut ON_LEAVE: Callback = Callback::new(c"pydtrace_py_leave", on_leave);
static mut ON_UNWIND: Callback = Callback::new(c"pydtrace_py_unwind", on_unwind);
static mut ON_LINE: Callback = Callback::new(c"pydtrace_line", on_line);
static mut ON_GC: Callback = Callback::new(c"pydtrace_gc", on_gc);
static mut ON_CALL: Callback = Callback::new(c"pydtrace_call", on_call);
static mut ON_CALL_END: Callback = Callback::new(c"pydtrace_call_end", on_call_end);
static mut ON_CFUNCTION_CALL: Callback =
    Callback::new(c"pydtrace_cfunction_call", on_cfunction_call);
static mut ON_CFUNCTION_CALL_END: Callback =
    Callback::new(c"pydtrace_cfunction_call_end", on_cfunction_call_end);
static mut ON_CALL_BOTH: Callback = Callback::new(c"pydtrace_call_both", on_call_both);
static mut ON_CALL_END_BOTH: Callback = Callback::new(c"pydtrace_call_end_both", on_call_end_both);
static mut NOOP: Callback = Callback::new(c"pydtrace_noop", noop);
static mut FIND_AND_LOAD: Callback = Callback::with_keywords(c"_find_and_load", on_find_and_load);

/// Which callback serves a `sys.monitoring` event or `gc.callbacks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// PY_START.
    Start,
    /// PY_RESUME and PY_THROW.
    Resume,
    /// PY_RETURN and PY_YIELD.
    Leave,
    /// PY_UNWIND.
    Unwind,
    /// LINE.
    Line,
    /// CALL.
    Call,
    /// C_RETURN and C_RAISE.
    CallEnd,
    /// CALL, for the C function probes alone.
    CFunctionCall,
    /// C_RETURN and C_RAISE, for the C function probes alone.
    CFunctionCallEnd,
    /// CALL, for the instance-new and the C function probes together.
    CallBoth,
    /// C_RETURN and C_RAISE, for both together.
    CallEndBoth,
    /// gc.callbacks.
    Gc,
    /// Nothing: a benchmark's reference callback.
    Noop,
    /// `importlib._bootstrap._find_and_load`, around the original.
    FindAndLoad,
}

/// A new Python callable (a builtin function) for `hook`, bound to `target`
/// (the function it stands in for), if any.
pub fn callable(
    py: Python<'_>,
    hook: Hook,
    target: Option<&Bound<'_, PyAny>>,
) -> PyResult<Py<PyAny>> {
    // SAFETY: only the addresses of the definitions are taken; nothing writes them.
    let def = unsafe {
        match hook {
            Hook::Start => addr_of_mut!(ON_START.def),
            Hook::Resume => addr_of_mut!(ON_RESUME.def),
            Hook::Leave => addr_of_mut!(ON_LEAVE.def),
            Hook::Unwind => addr_of_mut!(ON_UNWIND.def),
            Hook::Line => addr_of_mut!(ON_LINE.def),
            Hook::Call => addr_of_mut!(ON_CALL.def),
            Hook::CallEnd => addr_of_mut!(ON_CALL_END.def),
            Hook::CFunctionCall => addr_of_mut!(ON_CFUNCTION_CALL.def),
            Hook::CFunctionCallEnd => addr_of_mut!(ON_CFUNCTION_CALL_END.def),
            Hook::CallBoth => addr_of_mut!(ON_CALL_BOTH.def),
            Hook::CallEndBoth => addr_of_mut!(ON_CALL_END_BOTH.def),
            Hook::Gc => addr_of_mut!(ON_GC.def),
            Hook::Noop => addr_of_mut!(NOOP.def),
            Hook::FindAndLoad => addr_of_mut!(FIND_AND_LOAD.def),
        }
    };
    let target = target.map_or(std::ptr::null_mut(), Bound::as_ptr);
    // SAFETY: GIL held (`py`); `def` is a static definition; `target` is null or
    // alive; a null result comes with a Python error set.
    unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyCFunction_NewEx(def, target, std::ptr::null_mut()),
        )
        .map(Bound::unbind)
    }
}
