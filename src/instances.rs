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
//! `subtype_dealloc` does (3.12 and 3.13, from public and exported
//! functions) with the probes around the deallocation proper:
//! finalizers (`__del__`) and weak reference callbacks run first, outside
//! the pair, and a resurrected object fires nothing; then start, the
//! clearing of slots and `__dict__` (where a cascade of nested deletions
//! happens), the base type's dealloc, and done. Classes created while the
//! probes are armed are patched by a hook on `type.__init__`. Detaching
//! puts `subtype_dealloc` back into every class.
//!
//! Classes with a legacy `tp_del` (none made by Python code) are left alone.
//! On versions after 3.13 the delete probes stay off until this module has
//! been checked against that version's `subtype_dealloc`.

use std::cell::{Cell, RefCell};
use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::ffi;
use pyo3::prelude::*;

use crate::names::ProbeString;
use crate::probes::fire;

/// Whether this interpreter version's deallocation is one [`dealloc`] reproduces.
pub const DELETE_SUPPORTED: bool = cfg!(not(Py_3_14));
/// Why the delete probes are off where [`DELETE_SUPPORTED`] is false (`python -m dtrace list`).
pub const DELETE_UNSUPPORTED_REASON: &str = "off on this Python version: they follow CPython's \
     subtype_dealloc, which has been checked against 3.12 and 3.13 only";

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
unsafe extern "C" fn dealloc(obj: *mut ffi::PyObject) {
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

// ---------------------------------------------------------------------------
// Patching classes.

/// Puts [`dealloc`] into `tp` if it is a Python class that deallocates
/// through `subtype_dealloc` and has no legacy `tp_del`.
unsafe fn patch_class(tp: *mut ffi::PyTypeObject) {
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
unsafe fn in_main_interpreter() -> bool {
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
