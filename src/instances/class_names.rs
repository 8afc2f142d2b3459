//! The per-class cache of what the instance probes pass: `__qualname__`
//! and the defining file, worked out once per class and version tag.

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int};
use std::ptr;
use std::sync::{Arc, Mutex};

use pyo3::ffi;

use super::*;

// ---------------------------------------------------------------------------
// Names: (classname, filename) of a class.

/// What the instance probes pass for one class: its `__qualname__` and file.
struct ClassStrings {
    qualname: CString,
    filename: CString,
}

/// Slots of the class cache; a class whose slot another class took is
/// worked out again (correct, only slower).
const CLASS_CACHE_SLOTS: usize = 1024;

/// The strings of recently seen classes, direct-mapped by type address and
/// checked against the type's version tag when they were worked out: a new
/// class at a reused address, or a class modified since (`__qualname__`
/// set, say), has another tag and misses. Locked only with the GIL held, so
/// never contended; a re-entered lookup (a deallocation that a lookup caused)
/// works the strings out without the cache.
static CLASS_CACHE: Mutex<[Option<CachedClass>; CLASS_CACHE_SLOTS]> =
    Mutex::new([const { None }; CLASS_CACHE_SLOTS]);

/// A class cache entry: the type's address, its version tag, its strings.
type CachedClass = (usize, u32, Arc<ClassStrings>);

fn class_cache_slot(tp: *mut ffi::PyTypeObject) -> usize {
    // Fibonacci hashing of the address: types are a few hundred bytes apart.
    ((tp as usize as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) as usize % CLASS_CACHE_SLOTS
}

/// `__qualname__` and defining file of a class, as the instance probes pass them.
pub struct ClassNames(Arc<ClassStrings>);

impl ClassNames {
    /// The names of `tp`: a cache lookup, or worked out once per class (and
    /// again after the class changed).
    ///
    /// # Safety
    /// GIL held; `tp` a live Python class.
    pub unsafe fn of(tp: *mut ffi::PyTypeObject) -> ClassNames {
        let version = (*tp).tp_version_tag;
        let slot = class_cache_slot(tp);
        if version != 0 {
            if let Ok(cache) = CLASS_CACHE.try_lock() {
                if let Some((address, tag, strings)) = &cache[slot] {
                    if *address == tp as usize && *tag == version {
                        return ClassNames(Arc::clone(strings));
                    }
                }
            }
        }
        ClassNames(Self::work_out(tp, slot))
    }

    /// The slow path of [`ClassNames::of`]. Leaves the error state as it found
    /// it: this runs inside deallocation, possibly while an exception propagates.
    #[cold]
    #[inline(never)]
    unsafe fn work_out(tp: *mut ffi::PyTypeObject, slot: usize) -> Arc<ClassStrings> {
        extern "C" {
            // Not in pyo3-ffi: PyUnstable_Type_AssignVersionTag, 3.12+.
            fn PyUnstable_Type_AssignVersionTag(tp: *mut ffi::PyTypeObject) -> c_int;
        }
        let saved = ffi::PyErr_GetRaisedException();
        let qualname_object = ffi::PyType_GetQualName(tp);
        let qualname = if qualname_object.is_null() {
            CString::from(c"<unknown>")
        } else {
            let utf8 = ProbeString::from_str_object(qualname_object);
            let owned = CStr::from_ptr(utf8.as_ptr()).to_owned();
            ffi::Py_DECREF(qualname_object);
            owned
        };
        let strings = Arc::new(ClassStrings {
            qualname,
            filename: class_filename(tp),
        });
        if PyUnstable_Type_AssignVersionTag(tp) != 0 {
            if let Ok(mut cache) = CLASS_CACHE.try_lock() {
                cache[slot] = Some((tp as usize, (*tp).tp_version_tag, Arc::clone(&strings)));
            }
        }
        ffi::PyErr_Clear();
        ffi::PyErr_SetRaisedException(saved);
        strings
    }

    /// `__qualname__`, NUL-terminated UTF-8.
    pub fn qualname(&self) -> *const c_char {
        self.0.qualname.as_ptr()
    }

    /// The defining file, NUL-terminated UTF-8.
    pub fn filename(&self) -> *const c_char {
        self.0.filename.as_ptr()
    }
}

/// `sys.modules[cls.__module__].__file__`, else the file of a function the
/// class body defined, else `<unknown>`. Dictionary reads only: no Python
/// code runs.
unsafe fn class_filename(tp: *mut ffi::PyTypeObject) -> CString {
    let as_cstring = |text: *mut ffi::PyObject| -> Option<CString> {
        if text.is_null() || ffi::PyUnicode_Check(text) == 0 {
            return None;
        }
        let utf8 = ProbeString::from_str_object(text);
        Some(CStr::from_ptr(utf8.as_ptr()).to_owned())
    };
    let dict = (*tp).tp_dict;
    if dict.is_null() {
        return CString::from(c"<unknown>");
    }
    let module_name = ffi::PyDict_GetItemString(dict, c"__module__".as_ptr());
    // A finalizing interpreter may have no sys.modules any more (and asking
    // for it then is a fatal error): classes freed that late fall back.
    if !module_name.is_null() && !crate::names::interpreter_finalizing() {
        let module = ffi::PyDict_GetItem(ffi::PyImport_GetModuleDict(), module_name);
        if !module.is_null() && ffi::PyModule_Check(module) != 0 {
            let file =
                ffi::PyDict_GetItemString(ffi::PyModule_GetDict(module), c"__file__".as_ptr());
            if let Some(name) = as_cstring(file) {
                return name;
            }
        }
    }
    let (mut position, mut key, mut value) = (0, ptr::null_mut(), ptr::null_mut());
    while ffi::PyDict_Next(dict, &mut position, &mut key, &mut value) != 0 {
        if ffi::PyFunction_Check(value) != 0 {
            let code = ffi::PyFunction_GetCode(value);
            if !code.is_null() {
                let file = ffi::PyObject_GetAttrString(code, c"co_filename".as_ptr());
                let name = as_cstring(file);
                if !file.is_null() {
                    ffi::Py_DECREF(file);
                }
                if let Some(name) = name {
                    return name;
                }
            }
        }
    }
    CString::from(c"<unknown>")
}
