//! The deallocator that stands in for CPython's `subtype_dealloc` while a
//! delete probe is armed, with the probes around deallocation proper.
//!
//! What differs between the versions it follows (`Objects/typeobject.c`):
//! - 3.12 to 3.13: `subtype_dealloc` wraps the GC path in the trashcan
//!   (`Py_TRASHCAN_BEGIN`), which a different `tp_dealloc` does not get:
//!   [`dealloc`] defers deep nesting itself ([`DEALLOC_NESTING_LIMIT`]).
//! - 3.14 and 3.15: the trashcan moved into `_Py_Dealloc`, which defers any
//!   GC object, ours included, when the C stack runs low; the deferral here
//!   stays (it only ever nests less), and an object it defers goes to its
//!   type's `tp_dealloc` as before. The weak references a finalizer made are
//!   cleared by `_PyWeakref_ClearWeakRefsNoCallbacks`, which is the loop over
//!   `_PyWeakref_ClearRef` of [`clear_weakrefs_without_callbacks`]; the rest
//!   (untrack, finalizer and resurrection, weak references with callbacks,
//!   slots up to the nearest non-subtype base, managed or offset `__dict__`,
//!   re-track for a GC base, the base's dealloc, the type's decref) is step
//!   for step as in 3.13. `PyObject_ClearManagedDict` also frees 3.14's
//!   inline values.

use std::cell::{Cell, RefCell};
use std::ptr;

use pyo3::ffi;

use super::*;

// ---------------------------------------------------------------------------
// Destruction: the dealloc that stands in for subtype_dealloc.

/// Nesting of [`dealloc`] frames on this thread, and the objects whose
/// deallocation was put off because the nesting got deep (CPython's
/// "trashcan", which `subtype_dealloc` uses and a different `tp_dealloc`
/// does not get): they are deallocated when the outermost frame ends, so
/// that tearing down a long chain of objects cannot overflow the C stack.
const DEALLOC_NESTING_LIMIT: u32 = 50;
thread_local! {
    static NESTING: Cell<u32> = const { Cell::new(0) };
    static DEFERRED: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// The nearest base of `tp` whose deallocation is not a subtype's.
unsafe fn real_base(tp: *mut ffi::PyTypeObject) -> *mut ffi::PyTypeObject {
    let mut base = tp;
    while walks_like_subtype(base) {
        base = (*base).tp_base;
    }
    base
}

/// Clears the `__slots__` of `tp` (not of its bases) in `obj`.
unsafe fn clear_slots(tp: *mut ffi::PyTypeObject, obj: *mut ffi::PyObject) {
    let count = ffi::Py_SIZE(tp as *mut ffi::PyObject);
    let members = (*tp).tp_members;
    if count <= 0 || members.is_null() {
        return;
    }
    for member in std::slice::from_raw_parts(members, count as usize) {
        if member.type_code == ffi::Py_T_OBJECT_EX && member.flags & ffi::Py_READONLY == 0 {
            let slot = (obj as *mut u8).offset(member.offset) as *mut *mut ffi::PyObject;
            let value = *slot;
            if !value.is_null() {
                *slot = ptr::null_mut();
                ffi::Py_DECREF(value);
            }
        }
    }
}

/// Clears weak references to `obj` without calling their callbacks (those
/// made by a finalizer after the callbacks ran).
unsafe fn clear_weakrefs_without_callbacks(tp: *mut ffi::PyTypeObject, obj: *mut ffi::PyObject) {
    extern "C" {
        fn _PyWeakref_ClearRef(weakref: *mut ffi::PyObject);
    }
    let list = (obj as *mut u8).offset((*tp).tp_weaklistoffset) as *mut *mut ffi::PyObject;
    while !(*list).is_null() {
        _PyWeakref_ClearRef(*list); // unlinks it: *list moves on
    }
}

/// Drops `obj`'s instance `__dict__`, managed (inline values or dict) or at
/// a dict offset the base does not own.
unsafe fn clear_dict(
    tp: *mut ffi::PyTypeObject,
    base: *mut ffi::PyTypeObject,
    obj: *mut ffi::PyObject,
) {
    extern "C" {
        #[cfg(not(Py_3_13))]
        fn _PyObject_ClearManagedDict(obj: *mut ffi::PyObject);
        #[cfg(Py_3_13)]
        fn PyObject_ClearManagedDict(obj: *mut ffi::PyObject);
        fn _PyObject_GetDictPtr(obj: *mut ffi::PyObject) -> *mut *mut ffi::PyObject;
    }
    if flags(tp) & ffi::Py_TPFLAGS_MANAGED_DICT != 0 {
        #[cfg(not(Py_3_13))]
        _PyObject_ClearManagedDict(obj);
        #[cfg(Py_3_13)]
        PyObject_ClearManagedDict(obj);
    } else if (*tp).tp_dictoffset != 0 && (*base).tp_dictoffset == 0 {
        let dict_slot = _PyObject_GetDictPtr(obj);
        if !dict_slot.is_null() && !(*dict_slot).is_null() {
            let dict = *dict_slot;
            *dict_slot = ptr::null_mut();
            ffi::Py_DECREF(dict);
        }
    }
}

/// The `tp_dealloc` of every Python class while a delete probe is armed:
/// CPython's `subtype_dealloc`, with instance-delete-start and -done around
/// the deallocation proper.
pub(super) unsafe extern "C" fn dealloc(obj: *mut ffi::PyObject) {
    let tp = ffi::Py_TYPE(obj);
    let is_gc = ffi::PyType_IS_GC(tp) != 0;
    if is_gc {
        ffi::PyObject_GC_UnTrack(obj.cast());
    }
    if NESTING.get() >= DEALLOC_NESTING_LIMIT {
        DEFERRED.with_borrow_mut(|deferred| deferred.push(obj as usize));
        return;
    }
    NESTING.set(NESTING.get() + 1);
    deallocate(obj, tp, is_gc);
    NESTING.set(NESTING.get() - 1);
    if NESTING.get() == 0 {
        while let Some(next) = DEFERRED.with_borrow_mut(Vec::pop) {
            let next = next as *mut ffi::PyObject;
            match (*ffi::Py_TYPE(next)).tp_dealloc {
                Some(type_dealloc) => type_dealloc(next),
                None => dealloc(next),
            }
        }
    }
}

/// The body of [`dealloc`], following `subtype_dealloc` step by step.
unsafe fn deallocate(obj: *mut ffi::PyObject, tp: *mut ffi::PyTypeObject, is_gc: bool) {
    let base = real_base(tp);
    let has_finalizer = (*tp).tp_finalize.is_some() || (*tp).tp_del.is_some();
    // Finalizer (__del__) first, outside the pair; a resurrected object fires nothing.
    if let Some(_finalize) = (*tp).tp_finalize {
        if is_gc {
            ffi::PyObject_GC_Track(obj.cast());
        }
        if ffi::PyObject_CallFinalizerFromDealloc(obj) < 0 {
            return;
        }
        if is_gc {
            ffi::PyObject_GC_UnTrack(obj.cast());
        }
    }
    let weakrefs_here = (*tp).tp_weaklistoffset != 0 && (*base).tp_weaklistoffset == 0;
    if is_gc && weakrefs_here {
        ffi::PyObject_ClearWeakRefs(obj);
    }
    let names = ClassNames::of(tp);
    fire::instance_delete_start(names.qualname(), names.filename());
    if is_gc {
        if has_finalizer && weakrefs_here {
            clear_weakrefs_without_callbacks(tp, obj);
        }
        let mut class = tp;
        while walks_like_subtype(class) {
            clear_slots(class, obj);
            class = (*class).tp_base;
        }
        clear_dict(tp, base, obj);
        if ffi::PyType_IS_GC(base) != 0 {
            ffi::PyObject_GC_Track(obj.cast());
        }
    }
    // The type may go with the object: decide before, decref after.
    let tp = ffi::Py_TYPE(obj);
    let type_needs_decref =
        flags(tp) & ffi::Py_TPFLAGS_HEAPTYPE != 0 && flags(base) & ffi::Py_TPFLAGS_HEAPTYPE == 0;
    if let Some(base_dealloc) = (*base).tp_dealloc {
        base_dealloc(obj);
    }
    fire::instance_delete_done(names.qualname(), names.filename());
    drop(names);
    if type_needs_decref {
        ffi::Py_DECREF(tp.cast());
    }
}
