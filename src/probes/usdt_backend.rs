//! The DTrace platforms' backend: the usdt crate emits the probes from the
//! same `provider/pydtrace.d` (macOS: DOF made by the linker; illumos: DOF
//! registered with the kernel when the module loads).
//!
//! Written to build on macOS and illumos and untested there (DECISIONS.md,
//! 10); `cargo check --features usdt-backend` type-checks it on Linux.
//!
//! Differences from the Linux backend, both from the usdt crate: each
//! string argument is copied into a NUL-terminated buffer per firing, and
//! the probes are spelt as DTrace spells them (`function-entry`).

use std::ffi::CStr;
use std::os::raw::c_char;

use crate::probes::ProbeSet;

include!(concat!(env!("OUT_DIR"), "/usdt_probes.rs"));

/// A probe's string argument as the usdt macros take it.
fn text<'a>(p: *const c_char) -> &'a str {
    if p.is_null() {
        return "";
    }
    // SAFETY: the callers pass NUL-terminated strings that outlive the firing.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .unwrap_or("<invalid UTF-8>")
}

/// The probe-firing functions, with the same signatures as on Linux.
pub mod fire {
    use super::{python, text};
    use std::os::raw::c_char;

    /// Fires `python:::function-entry`.
    pub fn function_entry(file: *const c_char, func: *const c_char, line: i32) {
        python::function__entry!(|| (text(file), text(func), line));
    }
    /// Fires `python:::function-return`.
    pub fn function_return(file: *const c_char, func: *const c_char, line: i32) {
        python::function__return!(|| (text(file), text(func), line));
    }
    /// Fires `python:::line`.
    pub fn line(file: *const c_char, func: *const c_char, line: i32) {
        python::line!(|| (text(file), text(func), line));
    }
    /// Fires `python:::gc-start`.
    pub fn gc_start(generation: i32) {
        python::gc__start!(|| generation);
    }
    /// Fires `python:::gc-done`.
    pub fn gc_done(collected: i64) {
        python::gc__done!(|| collected);
    }
    /// Fires `python:::instance-new-start`.
    pub fn instance_new_start(class: *const c_char, file: *const c_char) {
        python::instance__new__start!(|| (text(class), text(file)));
    }
    /// Fires `python:::instance-new-done`.
    pub fn instance_new_done(class: *const c_char, file: *const c_char) {
        python::instance__new__done!(|| (text(class), text(file)));
    }
    /// Fires `python:::instance-delete-start`.
    pub fn instance_delete_start(class: *const c_char, file: *const c_char) {
        python::instance__delete__start!(|| (text(class), text(file)));
    }
    /// Fires `python:::instance-delete-done`.
    pub fn instance_delete_done(class: *const c_char, file: *const c_char) {
        python::instance__delete__done!(|| (text(class), text(file)));
    }
    /// Fires `python:::import-find-load-start`.
    pub fn import_find_load_start(module: *const c_char) {
        python::import__find__load__start!(|| text(module));
    }
    /// Fires `python:::import-find-load-done`.
    pub fn import_find_load_done(module: *const c_char, found: i32) {
        python::import__find__load__done!(|| (text(module), found));
    }
    /// Fires `python:::audit`.
    pub fn audit(event: *const c_char, args: usize) {
        python::audit!(|| (text(event), args));
    }
}

/// Registers the probes with DTrace (illumos needs it before they are
/// visible; elsewhere it does nothing).
pub fn register() -> Result<(), String> {
    usdt::register_probes().map_err(|err| err.to_string())
}

/// The probes a DTrace consumer enables: macOS answers through is-enabled
/// sites, which its linker makes from these symbols (the same ones the
/// usdt macros use).
#[cfg(target_os = "macos")]
pub fn enabled() -> ProbeSet {
    macro_rules! is_enabled {
        ($($index:path => $symbol:literal),* $(,)?) => {{
            let mut set = ProbeSet::EMPTY;
            $(
                {
                    extern "C" {
                        #[link_name = $symbol]
                        fn probe_is_enabled() -> i32;
                    }
                    // SAFETY: the linker turns the call into a patchable is-enabled site.
                    if unsafe { probe_is_enabled() } != 0 {
                        set = set.with($index);
                    }
                }
            )*
            set
        }};
    }
    use crate::probes::*;
    is_enabled!(
        FUNCTION_ENTRY => "__dtrace_isenabled$python$function__entry$v1",
        FUNCTION_RETURN => "__dtrace_isenabled$python$function__return$v1",
        LINE => "__dtrace_isenabled$python$line$v1",
        GC_START => "__dtrace_isenabled$python$gc__start$v1",
        GC_DONE => "__dtrace_isenabled$python$gc__done$v1",
        INSTANCE_NEW_START => "__dtrace_isenabled$python$instance__new__start$v1",
        INSTANCE_NEW_DONE => "__dtrace_isenabled$python$instance__new__done$v1",
        INSTANCE_DELETE_START => "__dtrace_isenabled$python$instance__delete__start$v1",
        INSTANCE_DELETE_DONE => "__dtrace_isenabled$python$instance__delete__done$v1",
        IMPORT_FIND_LOAD_START => "__dtrace_isenabled$python$import__find__load__start$v1",
        IMPORT_FIND_LOAD_DONE => "__dtrace_isenabled$python$import__find__load__done$v1",
        AUDIT => "__dtrace_isenabled$python$audit$v1",
    )
}

/// Elsewhere (illumos, and Linux builds of this backend for checking) the
/// usdt crate keeps its is-enabled sites inside its probe macros, so the
/// probes to arm are named by `PYDTRACE_PROBES` (comma-separated, or `all`).
#[cfg(not(target_os = "macos"))]
pub fn enabled() -> ProbeSet {
    match std::env::var("PYDTRACE_PROBES") {
        Ok(names) if names.trim() == "all" => ProbeSet::ALL,
        Ok(names) => {
            let names: Vec<&str> = names
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .collect();
            ProbeSet::from_names(&names).unwrap_or(ProbeSet::EMPTY)
        }
        Err(_) => ProbeSet::EMPTY,
    }
}
