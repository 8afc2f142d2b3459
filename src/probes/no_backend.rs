//! No probe mechanism on this platform: the firing functions do nothing and
//! `dtrace.available` is False.

/// Probe functions that do nothing, with the same signatures as elsewhere.
pub mod fire {
    use std::os::raw::c_char;

    /// Does nothing: no probe mechanism here.
    pub fn function_entry(_: *const c_char, _: *const c_char, _: i32) {}
    /// Does nothing: no probe mechanism here.
    pub fn function_return(_: *const c_char, _: *const c_char, _: i32) {}
    /// Does nothing: no probe mechanism here.
    pub fn line(_: *const c_char, _: *const c_char, _: i32) {}
    /// Does nothing: no probe mechanism here.
    pub fn gc_start(_: i32) {}
    /// Does nothing: no probe mechanism here.
    pub fn gc_done(_: i64) {}
    /// Does nothing: no probe mechanism here.
    pub fn instance_new_start(_: *const c_char, _: *const c_char) {}
    /// Does nothing: no probe mechanism here.
    pub fn instance_new_done(_: *const c_char, _: *const c_char) {}
    /// Does nothing: no probe mechanism here.
    pub fn instance_delete_start(_: *const c_char, _: *const c_char) {}
    /// Does nothing: no probe mechanism here.
    pub fn instance_delete_done(_: *const c_char, _: *const c_char) {}
    /// Does nothing: no probe mechanism here.
    pub fn import_find_load_start(_: *const c_char) {}
    /// Does nothing: no probe mechanism here.
    pub fn import_find_load_done(_: *const c_char, _: i32) {}
    /// Does nothing: no probe mechanism here.
    pub fn audit(_: *const c_char, _: usize) {}
}
