//! The C function probes: `cfunction__entry` and `cfunction__return` around
//! every call that Python code makes of a callable implemented in C.
//!
//! They are served by `sys.monitoring`'s CALL, C_RETURN and C_RAISE events,
//! which the instance-new probes share (`callbacks::on_call`). CALL fires for
//! every call made by a CALL instruction, Python functions included; C_RETURN
//! or C_RAISE follow only where the interpreter did not run the callee as an
//! inlined Python frame. So the entry probe fires only for callables
//! [`classify`] calls C, and the return probe for exactly the same ones: the
//! rule depends on nothing but the callable, and CPython hands C_RETURN the
//! callable it gave CALL, or, for a bound method (`types.MethodType`), the
//! function inside it, which [`classify`] looks through too. Entries and
//! returns therefore balance per thread, also when the C function raises.
//!
//! C, here: builtin functions and methods (`len`, `math.sqrt`, `[].append`),
//! method and class-method descriptors (`xs.append(1)` calls `list.append`),
//! slot wrappers and method-wrappers (`object.__init__`, `(1).__add__`),
//! classes that are not Python classes (`int`, `collections.deque`), and any
//! other callable object whose class is not a Python class (`functools.partial`
//! objects, numpy's ufuncs). Not C: Python functions, bound methods of them,
//! Python classes (the instance probes' business) and instances of Python
//! classes.
//!
//! The names are worked out once per callable and kept in a small
//! direct-mapped cache, so the per-event path is a few type comparisons and
//! one cache lookup, with no allocation. The cache key is what stays the same
//! across calls of the same C function: the `PyMethodDef` for builtin
//! functions and method descriptors (a bound builtin method such as
//! `[].append` is a new object at every attribute access, but shares its
//! definition with the descriptor `list.append`), the descriptor for slot
//! wrappers and method-wrappers, and the object itself otherwise. Each entry
//! holds a strong reference to an object that keeps its key alive (the
//! function, the descriptor, the class), so no other callable can take the
//! key's address while the entry exists. The cache is emptied when the probes
//! are switched off, so nothing is kept alive while nobody traces.
//!
//! Names (docs/cfunction-probes.md):
//! - funcname: the callable's `__name__`; for a builtin function or method
//!   descriptor the definition's `ml_name`, passed without a copy.
//! - qualname: for a function of a module, `module.name` (`math.sqrt`,
//!   `_json.scanstring`), with the module left out for `builtins` (`len`);
//!   for a method, the qualified name of the class that defines it and the
//!   name (`list.append`, `dict.fromkeys`, `object.__init__`, `Pattern.match`),
//!   whichever way it is called; for a class, `module.qualname` (`int`,
//!   `collections.deque`); for another object, its `__module__` and
//!   `__qualname__` the same way, or its class's names where it has no
//!   `__name__` (`functools.partial`).
//! - A name that cannot be read, or is not a string, is `<unknown>`; nothing
//!   is raised into the program.

use std::cell::UnsafeCell;
use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::ptr;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

use pyo3::ffi;

use crate::instances;
use crate::names::{self, ProbeString};
use crate::probes::{self, fire};
use crate::scope;

/// What a name that cannot be read is passed as.
const UNKNOWN: &CStr = c"<unknown>";

extern "C" {
    // Not in pyo3-ffi: bound methods (cpython/classobject.h) and the lookup
    // of an attribute in a class's MRO without calling descriptors
    // (cpython/object.h).
    static mut PyMethod_Type: ffi::PyTypeObject;
    fn _PyType_Lookup(tp: *mut ffi::PyTypeObject, name: *mut ffi::PyObject) -> *mut ffi::PyObject;
}

/// A builtin function's layout (cpython/methodobject.h: `PyCFunctionObject`;
/// pyo3-ffi's declaration is not `repr(C)`).
#[repr(C)]
struct CFunctionObject {
    ob_base: ffi::PyObject,
    m_ml: *mut ffi::PyMethodDef,
    m_self: *mut ffi::PyObject,
    m_module: *mut ffi::PyObject,
    m_weakreflist: *mut ffi::PyObject,
    vectorcall: Option<ffi::vectorcallfunc>,
}

/// A builtin method with its defining class (`PyCMethodObject`, METH_METHOD).
#[repr(C)]
struct CMethodObject {
    func: CFunctionObject,
    mm_class: *mut ffi::PyTypeObject,
}

/// `types.MethodType`'s layout (cpython/classobject.h), as far as it is read.
#[repr(C)]
struct PyMethodObject {
    ob_base: ffi::PyObject,
    im_func: *mut ffi::PyObject,
}

/// A method-wrapper's layout (Objects/descrobject.c: `wrapperobject`), as
/// far as it is read; checked against a live one before it is used
/// ([`check_layout`]).
#[repr(C)]
struct MethodWrapper {
    ob_base: ffi::PyObject,
    descr: *mut ffi::PyObject,
    self_: *mut ffi::PyObject,
}

/// The method-wrapper type (not exported by every CPython: read from a live
/// one), once its layout has been checked; 0 until then.
static METHOD_WRAPPER_TYPE: AtomicUsize = AtomicUsize::new(0);

/// Checks, once, that a method-wrapper keeps its slot wrapper where
/// [`MethodWrapper`] says: `(1).__add__` must point at `int.__add__`.
/// Until it has, method-wrappers are keyed like other objects (one entry per
/// object, which is correct, only slower). Called with the GIL held.
pub fn check_layout() {
    if METHOD_WRAPPER_TYPE.load(Ordering::Relaxed) != 0 {
        return;
    }
    // SAFETY: GIL held by the caller (arming); every object made here is released.
    unsafe {
        let one = ffi::PyLong_FromLong(1);
        if one.is_null() {
            ffi::PyErr_Clear();
            return;
        }
        let name = intern(c"__add__");
        let bound = ffi::PyObject_GetAttrString(one, c"__add__".as_ptr());
        let descriptor = if name.is_null() {
            ptr::null_mut()
        } else {
            _PyType_Lookup(&raw mut ffi::PyLong_Type, name)
        };
        let ok = !bound.is_null()
            && !descriptor.is_null()
            && (*ffi::Py_TYPE(bound)).tp_basicsize >= std::mem::size_of::<MethodWrapper>() as isize
            && ffi::Py_TYPE(descriptor) == &raw mut ffi::PyWrapperDescr_Type
            && (*(bound as *mut MethodWrapper)).descr == descriptor
            && (*(bound as *mut MethodWrapper)).self_ == one;
        if ok {
            // Types are immortal here (static), so the address stays valid.
            METHOD_WRAPPER_TYPE.store(ffi::Py_TYPE(bound) as usize, Ordering::Relaxed);
        }
        if !bound.is_null() {
            ffi::Py_DECREF(bound);
        }
        ffi::Py_DECREF(one);
        ffi::PyErr_Clear();
    }
}

/// An interned `str` for a static name, kept for good (or null on failure).
unsafe fn intern(name: &CStr) -> *mut ffi::PyObject {
    let text = ffi::PyUnicode_InternFromString(name.as_ptr());
    if text.is_null() {
        ffi::PyErr_Clear();
    }
    text
}

/// A C callable, by what its names are worked out from.
#[derive(Clone, Copy)]
enum Callable {
    /// A builtin function or method (`PyCFunction`, `PyCMethod`, and their
    /// subclasses): keyed by its `PyMethodDef`.
    Function(*mut ffi::PyObject),
    /// A method or class-method descriptor: keyed by its `PyMethodDef`, the
    /// same key as the builtin methods bound from it.
    MethodDescriptor(*mut ffi::PyObject),
    /// A slot wrapper, also the one a method-wrapper calls: keyed by itself.
    SlotWrapper(*mut ffi::PyObject),
    /// A class that is not a Python class: keyed by itself.
    Class(*mut ffi::PyObject),
    /// Any other callable whose class is not a Python class: keyed by itself.
    Object(*mut ffi::PyObject),
}

impl Callable {
    /// The cache key and its check: for a `PyMethodDef`, its address and
    /// that of its name (a definition freed and another made at the same
    /// address would also need the same name string to pass); otherwise the
    /// object's address.
    #[inline]
    unsafe fn key(self) -> (usize, usize) {
        match self {
            Callable::Function(f) => {
                let def = (*(f as *mut CFunctionObject)).m_ml;
                (def as usize, method_def_name(def) as usize)
            }
            Callable::MethodDescriptor(d) => {
                let def = (*(d as *mut ffi::PyMethodDescrObject)).d_method;
                (def as usize, method_def_name(def) as usize)
            }
            Callable::SlotWrapper(o) | Callable::Class(o) | Callable::Object(o) => (o as usize, 0),
        }
    }
}

/// `ml_name` of a definition, or null.
#[inline]
unsafe fn method_def_name(def: *mut ffi::PyMethodDef) -> *const c_char {
    if def.is_null() {
        ptr::null()
    } else {
        (*def).ml_name
    }
}

/// Whether `callable` is a C callable, and which kind: the rule that decides
/// whether a CALL fires `cfunction__entry` and a C_RETURN or C_RAISE
/// `cfunction__return`, so it must give the same answer for a bound method
/// and for the function inside it.
///
/// # Safety
/// GIL held; `callable` null or alive.
#[inline]
unsafe fn classify(mut callable: *mut ffi::PyObject) -> Option<Callable> {
    if callable.is_null() {
        return None;
    }
    let mut tp = ffi::Py_TYPE(callable);
    // Bound methods, however deeply nested: CPython calls the function inside.
    while tp == &raw mut PyMethod_Type {
        callable = (*(callable as *mut PyMethodObject)).im_func;
        if callable.is_null() {
            return None;
        }
        tp = ffi::Py_TYPE(callable);
    }
    if tp == &raw mut ffi::PyFunction_Type {
        return None;
    }
    if tp == &raw mut ffi::PyCFunction_Type || tp == &raw mut ffi::PyCMethod_Type {
        return Some(Callable::Function(callable));
    }
    if tp == &raw mut ffi::PyMethodDescr_Type || tp == &raw mut ffi::PyClassMethodDescr_Type {
        return Some(Callable::MethodDescriptor(callable));
    }
    if tp == &raw mut ffi::PyWrapperDescr_Type {
        return Some(Callable::SlotWrapper(callable));
    }
    if tp as usize == METHOD_WRAPPER_TYPE.load(Ordering::Relaxed) {
        let descr = (*(callable as *mut MethodWrapper)).descr;
        if !descr.is_null() && ffi::Py_TYPE(descr) == &raw mut ffi::PyWrapperDescr_Type {
            return Some(Callable::SlotWrapper(descr));
        }
    }
    classify_other(callable, tp)
}

/// The rest of [`classify`]: classes and other objects.
#[inline(never)]
unsafe fn classify_other(
    callable: *mut ffi::PyObject,
    tp: *mut ffi::PyTypeObject,
) -> Option<Callable> {
    if ffi::PyType_Check(callable) != 0 {
        let class = callable as *mut ffi::PyTypeObject;
        return (!instances::is_python_class(class)).then_some(Callable::Class(callable));
    }
    if ffi::PyType_IsSubtype(tp, &raw mut ffi::PyCFunction_Type) != 0 {
        return Some(Callable::Function(callable));
    }
    (!instances::is_python_class(tp)).then_some(Callable::Object(callable))
}

/// What the C function probes pass for one callable.
pub struct CallableNames {
    name: *const c_char,
    qualname: *const c_char,
    /// The strings behind those pointers where they are not static.
    _held: (Option<CString>, Option<CString>),
}

impl CallableNames {
    /// From a static name (a `PyMethodDef`'s) and a qualified name that may
    /// be the same text.
    fn new(name: NameText, qualname: NameText) -> CallableNames {
        let (name_ptr, name_held) = name.into_parts();
        let (qualname_ptr, qualname_held) = match qualname {
            NameText::SameAsName => (name_ptr, None),
            other => other.into_parts(),
        };
        CallableNames {
            name: name_ptr,
            qualname: qualname_ptr,
            _held: (name_held, qualname_held),
        }
    }
}

/// A name being worked out.
enum NameText {
    /// A NUL-terminated UTF-8 string that lives as long as the cache entry's
    /// owner (a `PyMethodDef`'s `ml_name`).
    Static(*const c_char),
    Owned(CString),
    Unknown,
    /// The qualified name is the name itself (a builtin such as `len`).
    SameAsName,
}

impl NameText {
    fn owned(text: String) -> NameText {
        // Text is cut at a NUL character, as a C string would be.
        let end = text.find('\0').unwrap_or(text.len());
        CString::new(&text[..end]).map_or(NameText::Unknown, NameText::Owned)
    }

    fn into_parts(self) -> (*const c_char, Option<CString>) {
        match self {
            NameText::Static(p) => (p, None),
            NameText::Owned(s) => (s.as_ptr(), Some(s)),
            NameText::Unknown | NameText::SameAsName => (UNKNOWN.as_ptr(), None),
        }
    }
}

/// One cache slot's content.
struct Entry {
    key: usize,
    check: usize,
    /// A strong reference that keeps the key alive.
    owner: *mut ffi::PyObject,
    names: Box<CallableNames>,
}

/// Slots of the cache; a callable whose slot another took is worked out again.
const SLOTS: usize = 1024;

/// The names of recently called C callables, direct-mapped by key, guarded
/// by the GIL: every access holds it, and none keeps a reference into the
/// cache while Python code may run (a lookup fires a probe, which runs none;
/// working names out runs Python code before it takes the slot; evicted
/// entries are released after), so no two accesses overlap.
struct Cache(UnsafeCell<[Option<Entry>; SLOTS]>);

// SAFETY: only touched with the GIL held, as said above; the raw pointers are
// Python objects and strings owned by the entries.
unsafe impl Sync for Cache {}

static CACHE: Cache = Cache(UnsafeCell::new([const { None }; SLOTS]));
/// Entries in the cache now.
static ENTRIES: AtomicIsize = AtomicIsize::new(0);
/// Names worked out since the module loaded (cache misses).
static WORKED_OUT: AtomicUsize = AtomicUsize::new(0);

/// (entries in the cache now, names worked out so far): for tests.
pub fn cache_stats() -> (isize, usize) {
    (
        ENTRIES.load(Ordering::Relaxed),
        WORKED_OUT.load(Ordering::Relaxed),
    )
}

/// The entry in `slot`.
///
/// # Safety
/// GIL held; the reference is dropped before Python code can run.
#[inline]
unsafe fn slot_entry<'a>(slot: usize) -> Option<&'a Entry> {
    (*CACHE.0.get())[slot].as_ref()
}

/// Puts `entry` into `slot` (or empties it) and gives back what was there.
///
/// # Safety
/// GIL held.
unsafe fn replace_slot(slot: usize, entry: Option<Entry>) -> Option<Entry> {
    let old = std::mem::replace(&mut (*CACHE.0.get())[slot], entry);
    match (&old, (*CACHE.0.get())[slot].is_some()) {
        (None, true) => ENTRIES.fetch_add(1, Ordering::Relaxed),
        (Some(_), false) => ENTRIES.fetch_sub(1, Ordering::Relaxed),
        _ => 0,
    };
    old
}

fn slot_of(key: usize) -> usize {
    // Fibonacci hashing: definitions and objects are a few dozen bytes apart.
    ((key as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) as usize % SLOTS
}

/// Empties the cache, releasing what it holds. Called with the GIL held when
/// the C function probes are switched off.
pub fn clear() {
    // SAFETY: GIL held by the caller (arming).
    let taken: Vec<Entry> = (0..SLOTS)
        .filter_map(|slot| unsafe { replace_slot(slot, None) })
        .collect();
    // Released once the cache is empty: a deallocation may run Python code.
    for entry in taken {
        // SAFETY: GIL held by the caller; the entry held this reference.
        unsafe { ffi::Py_DECREF(entry.owner) };
    }
}

/// Calls `fire` with the names of `callable`: from the cache, or worked out
/// and cached.
#[inline]
unsafe fn with_names(callable: Callable, fire: impl FnOnce(&CallableNames)) {
    let (key, check) = callable.key();
    let slot = slot_of(key);
    if let Some(entry) = slot_entry(slot) {
        if entry.key == key && entry.check == check {
            fire(&entry.names);
            return;
        }
    }
    miss(callable, key, check, slot, fire);
}

/// The first call of a callable (or one whose slot another took): works its
/// names out, fires, and caches them.
#[cold]
#[inline(never)]
unsafe fn miss(
    callable: Callable,
    key: usize,
    check: usize,
    slot: usize,
    fire: impl FnOnce(&CallableNames),
) {
    // May run Python code (attribute reads): no reference into the cache is
    // held meanwhile, and any error it raises is dropped, the state left as
    // it was found.
    let saved = ffi::PyErr_GetRaisedException();
    let (names, owner) = work_out(callable);
    ffi::PyErr_Clear();
    ffi::PyErr_SetRaisedException(saved);
    WORKED_OUT.fetch_add(1, Ordering::Relaxed);
    fire(&names);
    let entry = Entry {
        key,
        check,
        owner,
        names: Box::new(names),
    };
    // Released after it left the cache: a deallocation may run Python code.
    if let Some(old) = replace_slot(slot, Some(entry)) {
        ffi::Py_DECREF(old.owner);
    }
}

/// The names of `callable` and a new reference to the object that keeps its
/// cache key alive.
unsafe fn work_out(callable: Callable) -> (CallableNames, *mut ffi::PyObject) {
    match callable {
        Callable::Function(f) => function_names(f),
        Callable::MethodDescriptor(d) => {
            let descr = d as *mut ffi::PyMethodDescrObject;
            let name = def_name((*descr).d_method);
            let qualname = method_qualname((*descr).d_common.d_type, &name);
            (CallableNames::new(name, qualname), ffi::Py_NewRef(d))
        }
        Callable::SlotWrapper(d) => {
            let descr = d as *mut ffi::PyDescrObject;
            let name = text_of((*descr).d_name).map_or(NameText::Unknown, NameText::owned);
            let qualname = method_qualname((*descr).d_type, &name);
            (CallableNames::new(name, qualname), ffi::Py_NewRef(d))
        }
        Callable::Class(class) => (
            class_names(class as *mut ffi::PyTypeObject),
            ffi::Py_NewRef(class),
        ),
        Callable::Object(o) => (object_names(o), ffi::Py_NewRef(o)),
    }
}

/// A builtin function or method: of a module, or bound to an object.
unsafe fn function_names(f: *mut ffi::PyObject) -> (CallableNames, *mut ffi::PyObject) {
    let func = f as *mut CFunctionObject;
    let def = (*func).m_ml;
    let name = def_name(def);
    let bound_to = (*func).m_self;
    // A function of a module: m_self is the module, or nothing, or (pybind11)
    // a capsule holding the function's record.
    if bound_to.is_null()
        || ffi::PyModule_Check(bound_to) != 0
        || ffi::PyCapsule_CheckExact(bound_to) != 0
    {
        let module = text_of((*func).m_module).or_else(|| {
            (!bound_to.is_null() && ffi::PyModule_Check(bound_to) != 0)
                .then(|| {
                    let module_name = ffi::PyModule_GetNameObject(bound_to);
                    let text = text_of(module_name);
                    if !module_name.is_null() {
                        ffi::Py_DECREF(module_name);
                    }
                    text
                })
                .flatten()
        });
        let qualname = match (&name, module.as_deref()) {
            (NameText::Unknown, _) => NameText::Unknown,
            (_, None | Some("builtins")) => NameText::SameAsName,
            (name, Some(module)) => NameText::owned(format!("{module}.{}", name_str(name))),
        };
        return (CallableNames::new(name, qualname), ffi::Py_NewRef(f));
    }
    // A method bound to an instance, or to a class (a class method, or a
    // static method, whose m_self is its class): named by the class that
    // defines it, found as the descriptor holding the same definition.
    let start = if !def.is_null() && (*def).ml_flags & ffi::METH_METHOD != 0 {
        (*(f as *mut CMethodObject)).mm_class
    } else if ffi::PyType_Check(bound_to) != 0 {
        bound_to as *mut ffi::PyTypeObject
    } else {
        ffi::Py_TYPE(bound_to)
    };
    if let Some(descriptor) = defining_descriptor(start, def) {
        let descr = descriptor as *mut ffi::PyMethodDescrObject;
        let qualname = method_qualname((*descr).d_common.d_type, &name);
        return (
            CallableNames::new(name, qualname),
            ffi::Py_NewRef(descriptor),
        );
    }
    // No such descriptor (a static method, a function bound by C code):
    // CPython's own `__qualname__` (the class of m_self, and the name).
    let qualname = match (&name, attribute_text(f, c"__qualname__")) {
        (NameText::Unknown, _) => NameText::Unknown,
        (_, Attribute::Text(text)) => NameText::owned(text),
        _ => method_qualname(start, &name),
    };
    (CallableNames::new(name, qualname), ffi::Py_NewRef(f))
}

/// The method or class-method descriptor in the MRO of `start` that holds
/// `def` (borrowed), if any.
unsafe fn defining_descriptor(
    start: *mut ffi::PyTypeObject,
    def: *mut ffi::PyMethodDef,
) -> Option<*mut ffi::PyObject> {
    let name = method_def_name(def);
    if start.is_null() || name.is_null() {
        return None;
    }
    let key = ffi::PyUnicode_FromString(name);
    if key.is_null() {
        ffi::PyErr_Clear();
        return None;
    }
    let found = _PyType_Lookup(start, key); // borrowed, no error set
    ffi::Py_DECREF(key);
    if found.is_null() {
        return None;
    }
    let tp = ffi::Py_TYPE(found);
    let is_method =
        tp == &raw mut ffi::PyMethodDescr_Type || tp == &raw mut ffi::PyClassMethodDescr_Type;
    (is_method && (*(found as *mut ffi::PyMethodDescrObject)).d_method == def).then_some(found)
}

/// A `PyMethodDef`'s name: its static `ml_name` where that is UTF-8 (as
/// `__name__` reads it), `<unknown>` where it is missing or is not.
unsafe fn def_name(def: *mut ffi::PyMethodDef) -> NameText {
    let name = method_def_name(def);
    if name.is_null() || CStr::from_ptr(name).to_str().is_err() {
        NameText::Unknown
    } else {
        NameText::Static(name)
    }
}

/// The text of a name being worked out.
unsafe fn name_str(name: &NameText) -> &str {
    match name {
        NameText::Static(p) => CStr::from_ptr(*p).to_str().unwrap_or("<unknown>"),
        NameText::Owned(s) => s.to_str().unwrap_or("<unknown>"),
        NameText::Unknown | NameText::SameAsName => "<unknown>",
    }
}

/// `Class.name` for a method of `class` (the class's `__qualname__`).
unsafe fn method_qualname(class: *mut ffi::PyTypeObject, name: &NameText) -> NameText {
    if matches!(name, NameText::Unknown) {
        return NameText::Unknown;
    }
    let class_name = if class.is_null() {
        None
    } else {
        let qualname = ffi::PyType_GetQualName(class);
        let text = text_of(qualname);
        if qualname.is_null() {
            ffi::PyErr_Clear();
        } else {
            ffi::Py_DECREF(qualname);
        }
        text
    };
    match class_name {
        Some(class_name) => NameText::owned(format!("{class_name}.{}", name_str(name))),
        None => NameText::SameAsName,
    }
}

/// A class: `__name__`, and `module.qualname` (the module left out for builtins).
unsafe fn class_names(class: *mut ffi::PyTypeObject) -> CallableNames {
    let owned = |object: *mut ffi::PyObject| {
        let text = text_of(object);
        if object.is_null() {
            ffi::PyErr_Clear();
        } else {
            ffi::Py_DECREF(object);
        }
        text
    };
    let name = owned(ffi::PyType_GetName(class));
    let qualname = owned(ffi::PyType_GetQualName(class));
    let module = match attribute_text(class.cast(), c"__module__") {
        Attribute::Text(text) => Some(text),
        _ => None,
    };
    module_names(name, qualname, module)
}

/// `name` and `module.qualname` (just `qualname` for builtins or no module;
/// the name where there is no qualified name).
fn module_names(
    name: Option<String>,
    qualname: Option<String>,
    module: Option<String>,
) -> CallableNames {
    let qualname = qualname.or_else(|| name.clone());
    let qualname = match (qualname, module.as_deref()) {
        (None, _) => NameText::Unknown,
        (Some(q), None | Some("builtins")) => NameText::owned(q),
        (Some(q), Some(module)) => NameText::owned(format!("{module}.{q}")),
    };
    CallableNames::new(name.map_or(NameText::Unknown, NameText::owned), qualname)
}

/// Another C callable: its own `__name__`, `__qualname__` and `__module__`;
/// its class's names where it has no `__name__` at all.
unsafe fn object_names(object: *mut ffi::PyObject) -> CallableNames {
    let name = match attribute_text(object, c"__name__") {
        Attribute::Text(text) => Some(text),
        Attribute::Missing => return class_names(ffi::Py_TYPE(object)),
        Attribute::Unreadable => None,
    };
    let qualname = match attribute_text(object, c"__qualname__") {
        Attribute::Text(text) => Some(text),
        _ => None,
    };
    let module = match attribute_text(object, c"__module__") {
        Attribute::Text(text) => Some(text),
        _ => None,
    };
    module_names(name, qualname, module)
}

/// What reading an attribute gave.
enum Attribute {
    Text(String),
    /// There is no such attribute.
    Missing,
    /// Reading it raised, or it is not a string.
    Unreadable,
}

/// `object.NAME` as text. Leaves no error set.
unsafe fn attribute_text(object: *mut ffi::PyObject, name: &CStr) -> Attribute {
    let value = ffi::PyObject_GetAttrString(object, name.as_ptr());
    if value.is_null() {
        let missing = ffi::PyErr_ExceptionMatches(ffi::PyExc_AttributeError) != 0;
        ffi::PyErr_Clear();
        return if missing {
            Attribute::Missing
        } else {
            Attribute::Unreadable
        };
    }
    let text = text_of(value);
    ffi::Py_DECREF(value);
    text.map_or(Attribute::Unreadable, Attribute::Text)
}

/// A `str` as UTF-8 text (lone surrogates replaced, cut at a NUL); `None`
/// for null or anything else.
unsafe fn text_of(object: *mut ffi::PyObject) -> Option<String> {
    if object.is_null() || ffi::PyUnicode_Check(object) == 0 {
        return None;
    }
    let utf8 = ProbeString::from_str_object(object);
    CStr::from_ptr(utf8.as_ptr())
        .to_str()
        .ok()
        .map(str::to_owned)
}

/// CALL(code, offset, callable): `cfunction__entry` if `callable` is C and
/// the calling code is in the scope in force. Returns false for a C call
/// out of the scope (its location may be disabled).
///
/// Out of line, so that the callbacks it shares with the instance-new probes
/// stay as small as they were for those.
///
/// # Safety
/// GIL held; the arguments as `sys.monitoring` passes them (null or alive).
#[inline(never)]
pub unsafe fn entry(
    code: *mut ffi::PyObject,
    offset: *mut ffi::PyObject,
    callable: *mut ffi::PyObject,
) -> bool {
    fire_for_c_call(
        code,
        offset,
        callable,
        probes::CFUNCTION_ENTRY,
        fire::cfunction_entry,
    )
}

/// C_RETURN or C_RAISE(code, offset, callable): `cfunction__return` if
/// `callable` is C and the calling code in scope (the rule of [`entry`],
/// so that the two pair).
///
/// # Safety
/// As [`entry`].
#[inline(never)]
pub unsafe fn exit(
    code: *mut ffi::PyObject,
    offset: *mut ffi::PyObject,
    callable: *mut ffi::PyObject,
) {
    fire_for_c_call(
        code,
        offset,
        callable,
        probes::CFUNCTION_RETURN,
        fire::cfunction_return,
    );
}

/// The rule [`entry`] and [`exit`] share: `fire` with the caller's file and
/// line and the callable's names if `callable` is C and the calling code in
/// scope. False only for a C call out of the scope.
#[inline(always)]
unsafe fn fire_for_c_call(
    code: *mut ffi::PyObject,
    offset: *mut ffi::PyObject,
    callable: *mut ffi::PyObject,
    probe: usize,
    fire: impl FnOnce(*const c_char, *const c_char, i32, *const c_char),
) -> bool {
    let Some(callable) = classify(callable) else {
        return true;
    };
    let Some(caller) = names::of_event_code(code, probe) else {
        return true;
    };
    if !scope::allows_names(code, caller) {
        return false;
    }
    let line = caller.line_at(code, names::event_int(offset));
    with_names(callable, |names| {
        fire(caller.filename(), names.name, line, names.qualname);
    });
    true
}
