//! Putting [`super::dealloc::dealloc`] into every Python class and taking
//! it out again, and the `type.__init__` hook for classes made meanwhile.

use std::os::raw::c_int;
use std::sync::atomic::Ordering;

use pyo3::ffi;
use pyo3::prelude::*;

use super::*;

// ---------------------------------------------------------------------------
// Patching classes.

/// Puts [`dealloc`] into `tp` if it is a Python class that deallocates
/// through `subtype_dealloc` and has no legacy `tp_del`.
pub(super) unsafe fn patch_class(tp: *mut ffi::PyTypeObject) {
    let subtype = SUBTYPE_DEALLOC.load(Ordering::Relaxed);
    if flags(tp) & ffi::Py_TPFLAGS_HEAPTYPE != 0
        && subtype != 0
        && dealloc_address(tp) == subtype
        && (*tp).tp_del.is_none()
    {
        (*tp).tp_dealloc = Some(dealloc);
    }
}

/// Puts `subtype_dealloc` back into `tp` if it has ours.
unsafe fn unpatch_class(tp: *mut ffi::PyTypeObject) {
    if dealloc_address(tp) == our_dealloc() {
        (*tp).tp_dealloc = subtype_dealloc();
    }
}

/// Whether the calling thread runs the main interpreter: `type` is shared
/// by all interpreters, but only the main one's classes are ever restored.
pub(super) unsafe fn in_main_interpreter() -> bool {
    ffi::PyInterpreterState_Get() == ffi::PyInterpreterState_Main()
}

/// `type.__init__` while delete probes are armed: patches each new class.
unsafe extern "C" fn type_init_hook(
    cls: *mut ffi::PyObject,
    args: *mut ffi::PyObject,
    kwds: *mut ffi::PyObject,
) -> c_int {
    let Some(original) = type_init() else {
        return 0;
    };
    let result = original(cls, args, kwds);
    if result == 0
        && DELETE_ARMED.load(Ordering::Relaxed)
        && ffi::PyType_Check(cls) != 0
        && in_main_interpreter()
    {
        patch_class(cls as *mut ffi::PyTypeObject);
    }
    result
}

/// Every class: `object` and its subclasses, transitively.
fn all_classes(py: Python<'_>) -> PyResult<Vec<Bound<'_, PyAny>>> {
    let mut found = Vec::new();
    let mut pending = vec![py.get_type::<pyo3::types::PyAny>().into_any()];
    let mut seen = std::collections::HashSet::new();
    while let Some(class) = pending.pop() {
        if !seen.insert(class.as_ptr() as usize) {
            continue;
        }
        // type.__subclasses__ works for metaclasses too (called unbound).
        let subclasses = py
            .get_type::<pyo3::types::PyType>()
            .getattr("__subclasses__")?
            .call1((&class,))?;
        for subclass in subclasses.try_iter()? {
            pending.push(subclass?);
        }
        found.push(class);
    }
    Ok(found)
}

/// How many classes have our dealloc now (for tests: 0 after detach).
pub fn patched_count(py: Python<'_>) -> PyResult<usize> {
    Ok(all_classes(py)?
        .iter()
        // SAFETY: GIL held; live type objects.
        .filter(|class| unsafe { dealloc_address(class.as_ptr() as *mut ffi::PyTypeObject) } == our_dealloc())
        .count())
}

/// Patches (`on`) or restores every class and metatype.
pub fn set_delete_hooks(py: Python<'_>, on: bool) -> PyResult<()> {
    if on == DELETE_ARMED.load(Ordering::Relaxed) {
        return Ok(());
    }
    ensure_init(py)?;
    let original_init = type_init().map(|f| f as usize);
    DELETE_ARMED.store(on, Ordering::Relaxed);
    for class in all_classes(py)? {
        let tp = class.as_ptr() as *mut ffi::PyTypeObject;
        // SAFETY: GIL held; `class` is a live type object.
        unsafe {
            if on {
                patch_class(tp);
            } else {
                unpatch_class(tp);
            }
            // Metatypes that took type_init (or our hook) from `type`.
            if ffi::PyType_IsSubtype(tp, &raw mut ffi::PyType_Type) != 0 {
                let current = (*tp).tp_init.map(|f| f as usize);
                if on && current == original_init {
                    (*tp).tp_init = Some(type_init_hook);
                } else if !on && current == Some(type_init_hook as ffi::initproc as usize) {
                    (*tp).tp_init = type_init();
                }
            }
        }
    }
    Ok(())
}
