//! The per-code-object cache of what the code probes pass.
//!
//! A probe passes `co_filename`, `co_name` and `co_qualname` as
//! NUL-terminated UTF-8 and a line number. Working those out is done once per code object, on
//! the first event that needs it, and kept in the code object's "extra"
//! slot (PEP 523's `PyUnstable_Code_SetExtra`). That ties the cache to the
//! code object's lifetime: it is freed when the code object is, so the cache
//! keeps nothing alive and cannot grow beyond the live code objects.
//!
//! The strings are borrowed where they can be: CPython keeps a UTF-8 copy
//! inside every `str` once asked for it (for ASCII text it is the text
//! itself), and the code object owns its name strings, so a pointer to that
//! copy stays valid as long as the cache entry does. Only names that have
//! no UTF-8 form (lone surrogates) get an owned, lossy copy.
//!
//! Offsets are mapped to lines through a table built from `co_lines()` on
//! the first return or resume event of a code object: a binary search per
//! event instead of a walk over the location table.
//!
//! An entry also holds what other modules keep per code object, as values
//! they pass in: the scope verdict ([`Verdict`], decided by `scope`) and the
//! aggregate counts (`aggregate::CodeCounts`). This module reaches down to
//! `aggregate`, `error` and `faults`, never to `scope`.

use std::cell::{Cell, OnceCell};
use std::ffi::{c_void, CString};
use std::os::raw::c_char;
use std::ptr;
use std::sync::atomic::{AtomicIsize, Ordering};

use pyo3::ffi;

/// Index of our slot in every code object's extra array; -1 until requested.
static EXTRA_INDEX: AtomicIsize = AtomicIsize::new(-1);
/// Cache entries alive now: one per code object that fired a probe and lives.
static LIVE_ENTRIES: AtomicIsize = AtomicIsize::new(0);

/// How many code objects carry a cache entry now.
pub fn live_entries() -> isize {
    LIVE_ENTRIES.load(Ordering::Relaxed)
}

/// Asks the interpreter for a code-extra slot. Called once, with the GIL,
/// when the module is initialised.
pub fn init() -> Result<(), crate::error::Error> {
    if EXTRA_INDEX.load(Ordering::Relaxed) >= 0 {
        return Ok(());
    }
    // SAFETY: called with the GIL held; `free_code_names` matches `freefunc`.
    let index = unsafe { ffi::PyUnstable_Eval_RequestCodeExtraIndex(free_code_names) };
    if index < 0 {
        return Err(pyo3::exceptions::PyRuntimeError::new_err(
            "the interpreter has no free code-extra slot for the probes' name cache",
        )
        .into());
    }
    EXTRA_INDEX.store(index, Ordering::Relaxed);
    Ok(())
}

/// Whether the interpreter is finalizing: then `sys.modules` may be gone,
/// and asking for it is a fatal error.
pub fn interpreter_finalizing() -> bool {
    extern "C" {
        #[cfg_attr(not(Py_3_13), link_name = "_Py_IsFinalizing")]
        fn Py_IsFinalizing() -> std::os::raw::c_int;
    }
    // SAFETY: reads a flag of the runtime; callable from any thread.
    unsafe { Py_IsFinalizing() != 0 }
}

/// A NUL-terminated UTF-8 string as a probe passes it.
pub enum ProbeString {
    /// The UTF-8 buffer CPython keeps inside a `str` that the code object owns.
    Borrowed(*const c_char),
    /// A lossy copy, for text that has no UTF-8 form.
    Owned(CString),
}

impl ProbeString {
    /// The string of `text` (a `str`): borrowed when it encodes as UTF-8,
    /// otherwise a copy with every lone surrogate replaced by U+FFFD. The C
    /// string ends at the first NUL character, if the text has one.
    ///
    /// # Safety
    /// GIL held; `text` must be a live object that outlives the result.
    pub unsafe fn from_str_object(text: *mut ffi::PyObject) -> ProbeString {
        if ffi::PyUnicode_Check(text) != 0 {
            let utf8 = ffi::PyUnicode_AsUTF8AndSize(text, ptr::null_mut());
            if !utf8.is_null() {
                return ProbeString::Borrowed(utf8);
            }
            ffi::PyErr_Clear();
            if let Some(lossy) = lossy_utf8(text) {
                return ProbeString::Owned(lossy);
            }
        }
        ProbeString::Owned(CString::from(c"<unknown>"))
    }

    /// The string, valid while `self` (and the `str` it may borrow from) lives.
    pub fn as_ptr(&self) -> *const c_char {
        match self {
            ProbeString::Borrowed(p) => *p,
            ProbeString::Owned(s) => s.as_ptr(),
        }
    }
}

/// `text` as UTF-8 with lone surrogates replaced by U+FFFD, cut at the first
/// NUL; `None` (with no Python error set) if the interpreter cannot say.
///
/// # Safety
/// GIL held; `text` must be a `str`.
unsafe fn lossy_utf8(text: *mut ffi::PyObject) -> Option<CString> {
    let len = ffi::PyUnicode_GetLength(text);
    let ucs4 = ffi::PyUnicode_AsUCS4Copy(text);
    if len < 0 || ucs4.is_null() {
        ffi::PyErr_Clear();
        return None;
    }
    let code_points = std::slice::from_raw_parts(ucs4, len as usize);
    let lossy: String = code_points
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect();
    ffi::PyMem_Free(ucs4.cast());
    CString::new(lossy).ok()
}

/// Offset-to-line map of one code object: the start offsets of its line
/// ranges (ascending) and the line of each, 0 where the range has no line.
struct LineTable {
    starts: Vec<u32>,
    lines: Vec<i32>,
}

impl LineTable {
    /// Builds the table from `code.co_lines()`; `None` if that fails.
    ///
    /// # Safety
    /// GIL held; `code` must be a live code object.
    unsafe fn build(code: *mut ffi::PyObject) -> Option<LineTable> {
        let iter = ffi::PyObject_CallMethod(code, c"co_lines".as_ptr(), ptr::null());
        if iter.is_null() {
            ffi::PyErr_Clear();
            return None;
        }
        let mut table = LineTable {
            starts: Vec::new(),
            lines: Vec::new(),
        };
        loop {
            let item = ffi::PyIter_Next(iter);
            if item.is_null() {
                break; // exhausted, or failed with an error set (checked below)
            }
            // Each item is (start, end, line), line None where there is none.
            if ffi::PyTuple_Check(item) != 0 && ffi::PyTuple_Size(item) == 3 {
                let start = ffi::PyLong_AsLong(ffi::PyTuple_GetItem(item, 0));
                let line_obj = ffi::PyTuple_GetItem(item, 2);
                let line = if line_obj == ffi::Py_None() {
                    0
                } else {
                    ffi::PyLong_AsLong(line_obj)
                };
                if start >= 0 && table.lines.last() != Some(&(line as i32)) {
                    table.starts.push(start as u32);
                    table.lines.push(line as i32);
                }
            }
            ffi::Py_DECREF(item);
        }
        ffi::Py_DECREF(iter);
        if !ffi::PyErr_Occurred().is_null() {
            ffi::PyErr_Clear();
            return None;
        }
        Some(table)
    }

    /// The line of the instruction at byte `offset`, 0 where it has none.
    fn line_at(&self, offset: u32) -> i32 {
        match self.starts.partition_point(|&start| start <= offset) {
            0 => 0,
            i => self.lines[i - 1],
        }
    }
}

/// What the code probes pass for one code object.
pub struct CodeNames {
    /// `co_filename`, `co_name` and `co_qualname` as the probes pass them,
    /// resolved once (no per-event match on how each is held).
    filename: *const c_char,
    name: *const c_char,
    qualname: *const c_char,
    /// The strings behind those pointers where they are copies.
    _held: [ProbeString; 3],
    first_line: i32,
    /// The line of the code's first instruction: what `function__entry`
    /// passes for a fresh call.
    entry_line: i32,
    /// Built on the first event that needs an offset's line.
    lines: OnceCell<Option<LineTable>>,
    /// Whether the code is in the scope in force, and under which generation (`scope` decides).
    scope: Verdict,
    /// What the aggregate probes gathered for the code since their last flush.
    counts: crate::aggregate::CodeCounts,
}

/// A yes-or-no decided under a numbered generation, kept in a cache entry:
/// whether the code object is in the scope in force. `scope` decides it and
/// numbers the generations (a change of the scope makes a new one); this
/// module only keeps it. Read and written with the GIL.
pub struct Verdict {
    generation: Cell<u32>,
    allowed: Cell<bool>,
}

impl Verdict {
    /// Not decided yet (generation 0, which `scope` never uses).
    pub const fn new() -> Verdict {
        Verdict {
            generation: Cell::new(0),
            allowed: Cell::new(true),
        }
    }

    /// The verdict, if it was decided under `generation`.
    #[inline(always)]
    pub fn get(&self, generation: u32) -> Option<bool> {
        (self.generation.get() == generation).then(|| self.allowed.get())
    }

    /// Records the verdict decided under `generation`.
    #[inline(always)]
    pub fn set(&self, generation: u32, allowed: bool) {
        self.generation.set(generation);
        self.allowed.set(allowed);
    }
}

impl CodeNames {
    /// `co_filename`, NUL-terminated UTF-8.
    #[inline]
    pub fn filename(&self) -> *const c_char {
        self.filename
    }

    /// `co_name`, NUL-terminated UTF-8: CPython's `funcname`.
    #[inline]
    pub fn name(&self) -> *const c_char {
        self.name
    }

    /// `co_qualname`, NUL-terminated UTF-8.
    #[inline]
    pub fn qualname(&self) -> *const c_char {
        self.qualname
    }

    /// What the aggregate probes gathered for this code object (`aggregate`).
    #[inline(always)]
    pub fn counts(&self) -> &crate::aggregate::CodeCounts {
        &self.counts
    }

    /// The cached scope verdict (see `scope::allows_names`).
    #[inline(always)]
    pub fn scope_verdict(&self) -> &Verdict {
        &self.scope
    }

    /// The line of the code's first instruction, as CPython 3.15 passes it
    /// to `function__entry`: the `def` line (the decorator's, for a
    /// decorated function), 0 for a module; `co_firstlineno` where that
    /// instruction has no line (a closure's cell set-up).
    #[inline]
    pub fn entry_line(&self) -> i32 {
        self.entry_line
    }

    /// The line of the instruction at byte `offset` of `code`, or
    /// `co_firstlineno` where the code object maps it to no line.
    ///
    /// # Safety
    /// GIL held; `code` must be the live code object these names belong to.
    pub unsafe fn line_at(&self, code: *mut ffi::PyObject, offset: ffi::Py_ssize_t) -> i32 {
        let table = self.lines.get_or_init(|| LineTable::build(code));
        match table {
            Some(table) if offset >= 0 => match table.line_at(offset as u32) {
                0 => self.first_line,
                line => line,
            },
            _ => self.first_line,
        }
    }

    /// # Safety
    /// GIL held; `code` must be a live code object.
    unsafe fn build(code: *mut ffi::PyObject) -> Option<CodeNames> {
        let filename = ffi::PyObject_GetAttrString(code, c"co_filename".as_ptr());
        let name = ffi::PyObject_GetAttrString(code, c"co_name".as_ptr());
        let qualname = ffi::PyObject_GetAttrString(code, c"co_qualname".as_ptr());
        let first_line = ffi::PyObject_GetAttrString(code, c"co_firstlineno".as_ptr());
        let names =
            if filename.is_null() || name.is_null() || qualname.is_null() || first_line.is_null() {
                None
            } else {
                // The attributes are the code object's own (immutable) fields, so
                // the borrowed UTF-8 buffers live as long as the code object.
                let held = [
                    ProbeString::from_str_object(filename),
                    ProbeString::from_str_object(name),
                    ProbeString::from_str_object(qualname),
                ];
                let first_line = ffi::PyLong_AsLong(first_line) as i32;
                let entry_line = first_instruction_line(code).unwrap_or(first_line);
                Some(CodeNames {
                    filename: held[0].as_ptr(),
                    name: held[1].as_ptr(),
                    qualname: held[2].as_ptr(),
                    counts: crate::aggregate::CodeCounts::new(
                        held[0].as_ptr(),
                        held[1].as_ptr(),
                        held[2].as_ptr(),
                        entry_line,
                    ),
                    _held: held,
                    first_line,
                    entry_line,
                    lines: OnceCell::new(),
                    scope: Verdict::new(),
                })
            };
        for obj in [filename, name, qualname, first_line] {
            if !obj.is_null() {
                ffi::Py_DECREF(obj);
            }
        }
        if !ffi::PyErr_Occurred().is_null() {
            ffi::PyErr_Clear();
            return None;
        }
        names
    }
}

/// The line of the instruction at offset 0 of `code`, from the first item
/// of `co_lines()`; `None` where it has no line or the interpreter cannot
/// say (no Python error is left set).
///
/// # Safety
/// GIL held; `code` must be a live code object.
unsafe fn first_instruction_line(code: *mut ffi::PyObject) -> Option<i32> {
    let iter = ffi::PyObject_CallMethod(code, c"co_lines".as_ptr(), ptr::null());
    if iter.is_null() {
        ffi::PyErr_Clear();
        return None;
    }
    let item = ffi::PyIter_Next(iter);
    ffi::Py_DECREF(iter);
    if item.is_null() {
        ffi::PyErr_Clear();
        return None;
    }
    let mut line = None;
    if ffi::PyTuple_Check(item) != 0 && ffi::PyTuple_Size(item) == 3 {
        let line_obj = ffi::PyTuple_GetItem(item, 2);
        if line_obj != ffi::Py_None() {
            let value = ffi::PyLong_AsLong(line_obj);
            if value == -1 && !ffi::PyErr_Occurred().is_null() {
                ffi::PyErr_Clear();
            } else {
                line = Some(value as i32);
            }
        }
    }
    ffi::Py_DECREF(item);
    line
}

/// The cached names of `code`, computed on first use; `None` if `code` is not
/// a code object or its names cannot be had (no Python error is left set).
///
/// # Safety
/// GIL held; `code` must be a live object. The reference is valid while
/// `code` is alive.
#[inline(always)]
pub unsafe fn of_code<'a>(code: *mut ffi::PyObject) -> Option<&'a CodeNames> {
    let index = EXTRA_INDEX.load(Ordering::Relaxed);
    if index < 0 || ffi::PyCode_Check(code) == 0 {
        return None;
    }
    let mut extra: *mut c_void = ptr::null_mut();
    if ffi::PyUnstable_Code_GetExtra(code, index, &mut extra) != 0 {
        ffi::PyErr_Clear();
        return None;
    }
    if extra.is_null() {
        return create_entry(code, index);
    }
    Some(&*(extra as *const CodeNames))
}

/// The names of `code`, argument 0 of a `sys.monitoring` event; on failure
/// `probe` is reported (once, as an internal error) and `None` returned.
///
/// # Safety
/// As [`of_code`], except that `code` may be null.
#[inline(always)]
pub unsafe fn of_event_code<'a>(code: *mut ffi::PyObject, probe: usize) -> Option<&'a CodeNames> {
    if code.is_null() {
        crate::faults::report_internal_error(probe, "the interpreter passed no code object");
        return None;
    }
    let found = of_code(code);
    if found.is_none() {
        crate::faults::report_internal_error(probe, "cannot read the code object's names");
    }
    found
}

/// An integer argument of a `sys.monitoring` event (an instruction offset or
/// a line number) as a C integer; -1 if it is null or no integer.
///
/// # Safety
/// GIL held; `obj` null or a live object.
#[inline]
pub unsafe fn event_int(obj: *mut ffi::PyObject) -> ffi::Py_ssize_t {
    if obj.is_null() {
        return -1;
    }
    let value = ffi::PyLong_AsSsize_t(obj);
    if value == -1 && !ffi::PyErr_Occurred().is_null() {
        ffi::PyErr_Clear();
    }
    value
}

/// The first event of a code object: works its names out and stores them in
/// its extra slot. Kept out of line so that the per-event path stays small.
#[cold]
#[inline(never)]
unsafe fn create_entry<'a>(
    code: *mut ffi::PyObject,
    index: ffi::Py_ssize_t,
) -> Option<&'a CodeNames> {
    let names = Box::into_raw(Box::new(CodeNames::build(code)?));
    if ffi::PyUnstable_Code_SetExtra(code, index, names.cast()) != 0 {
        ffi::PyErr_Clear();
        drop(Box::from_raw(names));
        return None;
    }
    LIVE_ENTRIES.fetch_add(1, Ordering::Relaxed);
    Some(&*names)
}

/// Frees a cache entry when its code object is freed (first reporting what
/// the aggregate probes gathered for it: its names are alive until then).
unsafe extern "C" fn free_code_names(extra: *mut c_void) {
    if !extra.is_null() {
        let names = Box::from_raw(extra as *mut CodeNames);
        names.counts.retire();
        drop(names);
        LIVE_ENTRIES.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::LineTable;

    #[test]
    fn offsets_map_to_the_line_of_their_range() {
        // Ranges as co_lines() gives them, after merging runs of one line: offsets 0-1 have
        // no line, 2-9 are line 5, 10-13 line 6, 14 on line 5 again.
        let table = LineTable {
            starts: vec![0, 2, 10, 14],
            lines: vec![0, 5, 6, 5],
        };
        assert_eq!(table.line_at(0), 0);
        assert_eq!(table.line_at(1), 0);
        assert_eq!(table.line_at(2), 5);
        assert_eq!(table.line_at(9), 5);
        assert_eq!(table.line_at(10), 6);
        assert_eq!(table.line_at(14), 5);
        assert_eq!(table.line_at(1000), 5);
        let empty = LineTable {
            starts: vec![],
            lines: vec![],
        };
        assert_eq!(empty.line_at(4), 0);
    }
}
