//! SystemTap SDT probes, the Linux backend.
//!
//! Each probe is a `nop` in its own `#[inline(never)]` function (generated
//! by `build.rs`), described by a note in `.note.stapsdt`: the `nop`'s
//! address, the address of `_.stapsdt.base` (which lets tools correct for
//! a prelinked object), the probe's semaphore, the provider and probe names
//! and the argument registers. A consumer such as `bpftrace -p PID` turns
//! the `nop` into a breakpoint and raises the semaphore; the enablement
//! watcher polls the semaphores to learn which probes someone wants.
//!
//! The semaphores are the `u16` counters the SDT convention prescribes,
//! kept in one array in the `.probes` section so that every one is two-byte
//! aligned (the kernel's reference-counter update requires it) and so that
//! the watcher reads them all in one pass.

use std::sync::atomic::AtomicU16;

use super::PROBE_COUNT;

/// One SDT semaphore per probe, in provider-file order. The kernel adds one
/// for every consumer attached to the probe and takes it back on detach.
#[link_section = ".probes"]
pub static SEMAPHORES: [AtomicU16; PROBE_COUNT] = [const { AtomicU16::new(0) }; PROBE_COUNT];

// The base every note refers to. "R" (SHF_GNU_RETAIN) keeps the linker's
// section garbage collection from dropping it: only the non-allocated notes
// refer to it, and a note pointing at nothing would carry base 0.
//
// "x" puts it in the executable segment, beside the probe sites. perf and
// SystemTap turn a note's location into a file offset by adding the
// difference between `.stapsdt.base`'s file offset and its address; that
// is right only when the base and the sites are laid out alike. sys/sdt.h
// leaves the base read-only, which works with GNU ld's layout, but rust-lld
// (and zig's linker) put the executable segment 0x1000 further from its
// file offset than the read-only one, and every perf probe then missed.
// bpftrace and bcc go through the program headers and work either way.
macro_rules! stapsdt_base {
    ($($options:tt)*) => {
        core::arch::global_asm!(
            ".pushsection .stapsdt.base, \"axGR\", \"progbits\", .stapsdt.base, comdat",
            ".weak _.stapsdt.base",
            ".hidden _.stapsdt.base",
            "_.stapsdt.base: .space 1",
            ".size _.stapsdt.base, 1",
            ".popsection",
            $($options)*
        );
    };
}
// x86_64 templates are AT&T syntax, as SDT argument strings are written.
#[cfg(target_arch = "x86_64")]
stapsdt_base!(options(att_syntax));
#[cfg(not(target_arch = "x86_64"))]
stapsdt_base!();

/// The probe-firing functions, one per probe, named after the probe with
/// `__` written `_` (`fire::function_entry`).
pub mod fire {
    include!(concat!(env!("OUT_DIR"), "/fire.rs"));
}
