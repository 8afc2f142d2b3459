//! The instance probes: creation and destruction of instances of Python
//! classes (heap types made by a `class` statement or by `type()`).
//!
//! **Creation** is seen through `sys.monitoring`'s CALL, C_RETURN and
//! C_RAISE events (armed by `arming` while an instance-new probe is
//! wanted): when Python code calls a Python class, CALL fires before
//! `__new__` and C_RETURN or C_RAISE after `__init__` returned or raised.
//! Instantiations made by C code (`map(Cls, xs)`, `copy`, `pickle`,
//! `functools.partial`) have no CALL instruction and fire nothing, as the
//! reference allows. The cost: while these probes are enabled, every call
//! made by Python code passes through one more native callback.
//!
//! **Destruction** needs a hook in deallocation, and the only one per
//! object is the type's `tp_dealloc` slot. Every Python class has
//! CPython's `subtype_dealloc` there, which walks the class's bases
//! comparing their `tp_dealloc` with itself; a wrapper that called it would
//! stop that walk at the wrapped class. So while a delete probe is enabled,
//! the slot of each Python class holds [`dealloc`], which does what
//! `subtype_dealloc` does (3.12 to 3.15, from public and exported
//! functions) with the probes around the deallocation proper:
//! finalizers (`__del__`) and weak reference callbacks run first, outside
//! the pair, and a resurrected object fires nothing; then start, the
//! clearing of slots and `__dict__` (where a cascade of nested deletions
//! happens), the base type's dealloc, and done. Classes created while the
//! probes are armed are patched by a hook on `type.__init__`. Detaching
//! puts `subtype_dealloc` back into every class.
//!
//! Classes with a legacy `tp_del` (none made by Python code) are left alone.
//! Checked against `subtype_dealloc` in `Objects/typeobject.c` of 3.12, 3.13,
//! 3.14 and 3.15; what changed is in [`dealloc`]'s module. On later versions
//! the delete probes stay off until this module has been checked against
//! that version's `subtype_dealloc`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use pyo3::ffi;
use pyo3::prelude::*;

use crate::names::ProbeString;
use crate::probes::fire;

mod class_names;
mod dealloc;
mod patching;

pub use class_names::ClassNames;
use dealloc::dealloc;
use patching::{in_main_interpreter, patch_class};
pub use patching::{patched_count, set_delete_hooks};

/// Whether this interpreter version's deallocation is one [`dealloc`] reproduces.
pub const DELETE_SUPPORTED: bool = cfg!(not(Py_3_16));
/// Why the delete probes are off where [`DELETE_SUPPORTED`] is false (`python -m dtrace list`).
pub const DELETE_UNSUPPORTED_REASON: &str = "off on this Python version: they follow CPython's \
     subtype_dealloc, which has been checked against 3.12 to 3.15 only";

/// CPython's `subtype_dealloc`, read from a class made at initialisation.
static SUBTYPE_DEALLOC: AtomicUsize = AtomicUsize::new(0);
/// CPython's `type_init` (`type.__init__`'s slot), read at initialisation.
static TYPE_INIT: AtomicUsize = AtomicUsize::new(0);
/// Whether classes are being patched (a delete probe is armed).
static DELETE_ARMED: AtomicBool = AtomicBool::new(false);

/// Reads the two CPython functions this module needs to recognise, the
/// first time an instance probe is armed (a class is made for it, which
/// `import dtrace` need not pay for). Called with the GIL held.
pub fn ensure_init(py: Python<'_>) -> PyResult<()> {
    if SUBTYPE_DEALLOC.load(Ordering::Relaxed) != 0 {
        return Ok(());
    }
    let probe_class = py.get_type::<pyo3::types::PyType>().call1((
        "_pydtrace_probe_class",
        (),
        pyo3::types::PyDict::new(py),
    ))?;
    // SAFETY: GIL held; both are live type objects, and type.__init__ is not
    // hooked yet (that needs this to have run).
    unsafe {
        let tp = probe_class.as_ptr() as *mut ffi::PyTypeObject;
        TYPE_INIT.store(
            ffi::PyType_Type.tp_init.map_or(0, |f| f as usize),
            Ordering::Relaxed,
        );
        SUBTYPE_DEALLOC.store(
            (*tp).tp_dealloc.map_or(0, |f| f as usize),
            Ordering::Relaxed,
        );
    }
    Ok(())
}

fn subtype_dealloc() -> Option<ffi::destructor> {
    let address = SUBTYPE_DEALLOC.load(Ordering::Relaxed);
    // SAFETY: the address was read from a tp_dealloc slot.
    (address != 0).then(|| unsafe { std::mem::transmute::<usize, ffi::destructor>(address) })
}

/// The address in `tp`'s `tp_dealloc` slot, 0 for none.
unsafe fn dealloc_address(tp: *mut ffi::PyTypeObject) -> usize {
    (*tp).tp_dealloc.map_or(0, |f| f as usize)
}

/// The address of [`dealloc`], ours.
fn our_dealloc() -> usize {
    dealloc as ffi::destructor as usize
}

fn type_init() -> Option<ffi::initproc> {
    let address = TYPE_INIT.load(Ordering::Relaxed);
    // SAFETY: the address was read from PyType_Type's tp_init slot.
    (address != 0).then(|| unsafe { std::mem::transmute::<usize, ffi::initproc>(address) })
}

unsafe fn flags(tp: *mut ffi::PyTypeObject) -> std::os::raw::c_ulong {
    ffi::PyType_GetFlags(tp)
}

/// Whether `tp` is a class made by Python code: a heap type whose
/// deallocation is CPython's `subtype_dealloc` (or ours, while patched).
///
/// # Safety
/// GIL held; `tp` a live type.
pub unsafe fn is_python_class(tp: *mut ffi::PyTypeObject) -> bool {
    flags(tp) & ffi::Py_TPFLAGS_HEAPTYPE != 0 && walks_like_subtype(tp)
}

/// Whether deallocation of `tp` passes through [`dealloc`] or `subtype_dealloc`.
unsafe fn walks_like_subtype(tp: *mut ffi::PyTypeObject) -> bool {
    let address = dealloc_address(tp);
    address != 0 && (address == our_dealloc() || address == SUBTYPE_DEALLOC.load(Ordering::Relaxed))
}

// ---------------------------------------------------------------------------
// Creation: CALL and C_RETURN / C_RAISE.

/// A CALL event's callable, if it is a Python class.
///
/// # Safety
/// GIL held; `callable` null or alive.
pub unsafe fn called_class(callable: *mut ffi::PyObject) -> Option<*mut ffi::PyTypeObject> {
    if callable.is_null() || ffi::PyType_Check(callable) == 0 {
        return None;
    }
    let tp = callable as *mut ffi::PyTypeObject;
    is_python_class(tp).then_some(tp)
}

/// CALL of a Python class from Python code: instance-new-start. Inlined
/// into each of the callbacks that fire it, as into the one it had alone.
///
/// # Safety
/// GIL held; `tp` a live Python class.
#[inline(always)]
pub unsafe fn new_start(tp: *mut ffi::PyTypeObject) {
    if DELETE_ARMED.load(Ordering::Relaxed) && in_main_interpreter() {
        patch_class(tp); // a class that slipped past the type.__init__ hook
    }
    let names = ClassNames::of(tp);
    fire::instance_new_start(names.qualname(), names.filename());
}

/// C_RETURN or C_RAISE of that call: instance-new-done.
///
/// # Safety
/// GIL held; `tp` a live Python class.
pub unsafe fn new_done(tp: *mut ffi::PyTypeObject) {
    let names = ClassNames::of(tp);
    fire::instance_new_done(names.qualname(), names.filename());
}
