//! The interpreter's own probes of provider `python`.
//!
//! A CPython configured `--with-dtrace` (the builds of Debian, Ubuntu and
//! Fedora) declares provider `python` in its own executable or libpython:
//! gc, import and audit from 3.12 on, function entry and return again from
//! 3.15. A consumer that attaches to every object of the process declaring
//! `python:gc__start` (bpftrace's `usdt:*:python:gc__start`, system-wide)
//! would see each collection twice if both fired it. So for a probe that both
//! declare (docs/decisions.md, "One event, one firing"):
//!
//! - the interpreter fires it whenever its own semaphore is raised (it checks
//!   that semaphore itself; nothing here can change that);
//! - this module fires it when a consumer raised *our* semaphore and the
//!   interpreter's is down, or when a tool asked for it through the channel
//!   (the tools attach to our probe sites by address, where bpftrace 0.17
//!   cannot tell two objects' probes of one name apart; `channel`).
//!
//! A consumer of both objects thus gets each event once (the interpreter's),
//! and a consumer of ours alone gets ours, with what this provider adds (the
//! qualified name, balanced entries and returns).
//!
//! What the interpreter declares is read once, at import, from the SDT notes
//! (`.note.stapsdt`) of the objects that hold it: the main executable and a
//! libpython, found with `dl_iterate_phdr`. Each note gives the address of
//! the probe's semaphore, which the watcher reads at every poll. The symbols
//! such a build exports differ between builds (Debian's export none), the
//! notes do not. On the DTrace platforms the interpreter's probes are asked
//! from `sysconfig` (`WITH_DTRACE`), and left to it whenever declared.

use std::sync::OnceLock;

use pyo3::prelude::*;

use crate::probes::{self, ProbeSet};

/// What the interpreter declares, read once.
struct Declared {
    /// The probes it declares.
    probes: ProbeSet,
    /// Each declared probe's semaphore in this process (probe index,
    /// address), where its note names one inside a writable segment.
    semaphores: Vec<(usize, usize)>,
    /// The object that declares each probe (probe index, path).
    objects: Vec<(usize, String)>,
    /// Why the interpreter's notes could not be read, if they could not.
    unreadable: Option<String>,
}

static DECLARED: OnceLock<Declared> = OnceLock::new();

/// Reads what the interpreter declares; at module initialisation (an import,
/// where reading a few kilobytes of its files is in order; never under the
/// watcher's hand-off).
pub fn detect(py: Python<'_>) {
    DECLARED.get_or_init(|| read(py));
}

fn declared_info() -> Option<&'static Declared> {
    DECLARED.get()
}

/// The probes the interpreter declares itself.
pub fn declared() -> ProbeSet {
    declared_info().map_or(ProbeSet::EMPTY, |d| d.probes)
}

/// The declared probes the interpreter fires now: those whose semaphore in
/// the interpreter a consumer has raised. A few loads; no lock.
pub fn firing() -> ProbeSet {
    let Some(declared) = declared_info() else {
        return ProbeSet::EMPTY;
    };
    if !cfg!(target_os = "linux") {
        return declared.probes; // no semaphores to read: left to the interpreter
    }
    declared
        .semaphores
        .iter()
        .filter(|&&(_, address)| {
            // SAFETY: `address` lies in a writable segment of an object mapped
            // for the life of the process (checked when read), two-byte
            // aligned as SDT semaphores are; the kernel changes it under us.
            unsafe { std::ptr::read_volatile(address as *const u16) != 0 }
        })
        .fold(ProbeSet::EMPTY, |set, &(index, _)| set.with(index))
}

/// Each declared probe's object, as `(DTrace name, path)`.
pub fn objects() -> Vec<(&'static str, String)> {
    declared_info().map_or_else(Vec::new, |d| {
        d.objects
            .iter()
            .map(|(index, path)| (probes::PROBE_DTRACE_NAMES[*index], path.clone()))
            .collect()
    })
}

/// Why the interpreter's notes could not be read; `None` when they were.
pub fn unreadable() -> Option<&'static str> {
    declared_info().and_then(|d| d.unreadable.as_deref())
}

#[cfg(target_os = "linux")]
fn read(_py: Python<'_>) -> Declared {
    let mut declared = Declared {
        probes: ProbeSet::EMPTY,
        semaphores: Vec::new(),
        objects: Vec::new(),
        unreadable: None,
    };
    let mut problems = Vec::new();
    for object in linux::interpreter_objects() {
        match linux::python_notes(&object.path) {
            Ok(notes) => {
                for note in notes {
                    let Some(index) = probes::PROBE_NAMES.iter().position(|n| *n == note.name)
                    else {
                        continue; // a probe this provider file does not have
                    };
                    if !declared.probes.contains(index) {
                        declared.objects.push((index, linux::shown(&object.path)));
                    }
                    declared.probes = declared.probes.with(index);
                    if note.semaphore != 0 {
                        let address = object.bias.wrapping_add(note.semaphore as usize);
                        if object.writable(address)
                            && !declared.semaphores.contains(&(index, address))
                        {
                            declared.semaphores.push((index, address));
                        }
                    }
                }
            }
            Err(why) => problems.push(format!("{}: {why}", object.path)),
        }
    }
    if !problems.is_empty() {
        declared.unreadable = Some(problems.join("; "));
    }
    declared
}

#[cfg(not(target_os = "linux"))]
fn read(py: Python<'_>) -> Declared {
    use crate::arming::{AUDIT_PROBES, GC_PROBES, IMPORT_PROBES};
    let with_dtrace = py
        .import("sysconfig")
        .and_then(|sysconfig| sysconfig.call_method1("get_config_var", ("WITH_DTRACE",)))
        .and_then(|value| value.is_truthy())
        .unwrap_or(false);
    let mut own = GC_PROBES.union(IMPORT_PROBES).union(AUDIT_PROBES);
    if py.version_info() >= (3, 15) {
        own = own.union(ProbeSet::of(&[
            probes::FUNCTION_ENTRY,
            probes::FUNCTION_RETURN,
        ]));
    }
    Declared {
        probes: if with_dtrace { own } else { ProbeSet::EMPTY },
        semaphores: Vec::new(),
        objects: Vec::new(),
        unreadable: None,
    }
}

/// Finding the interpreter's objects and reading their SDT notes.
#[cfg(target_os = "linux")]
mod linux {
    use std::ffi::CStr;
    use std::fs::File;
    use std::os::raw::{c_int, c_void};
    use std::os::unix::fs::FileExt;

    /// An object mapped into this process that may hold the interpreter.
    pub struct Object {
        pub path: String,
        /// Its load bias: runtime address minus the address in the file.
        pub bias: usize,
        /// Its writable segments, as runtime address ranges.
        writable: Vec<(usize, usize)>,
    }

    impl Object {
        /// Whether a two-byte word at `address` lies in a writable segment.
        pub fn writable(&self, address: usize) -> bool {
            address % 2 == 0
                && self
                    .writable
                    .iter()
                    .any(|&(start, end)| address >= start && address + 2 <= end)
        }
    }

    /// How the main program's file is opened (also after it was replaced on disk).
    pub const MAIN_PROGRAM: &str = "/proc/self/exe";

    /// An object's path for people: the main program's real path.
    pub fn shown(path: &str) -> String {
        if path == MAIN_PROGRAM {
            if let Ok(real) = std::fs::read_link(path) {
                return real.to_string_lossy().into_owned();
            }
        }
        path.to_owned()
    }

    /// The main executable and any libpython, in the order the loader lists them.
    pub fn interpreter_objects() -> Vec<Object> {
        let mut found = Visit {
            entries: 0,
            objects: Vec::new(),
        };
        // SAFETY: the callback only reads the entries it is handed, during the call.
        unsafe {
            libc::dl_iterate_phdr(Some(visit), (&mut found as *mut Visit).cast());
        }
        found.objects
    }

    /// What `dl_iterate_phdr`'s callback gathers.
    struct Visit {
        entries: usize,
        objects: Vec<Object>,
    }

    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: `data` is the Visit handed to dl_iterate_phdr; `info` is valid during the call.
        let found = unsafe { &mut *data.cast::<Visit>() };
        let info = unsafe { &*info };
        let first = found.entries == 0;
        found.entries += 1;
        let name = if info.dlpi_name.is_null() {
            String::new()
        } else {
            // SAFETY: a NUL-terminated string owned by the loader.
            unsafe { CStr::from_ptr(info.dlpi_name) }
                .to_string_lossy()
                .into_owned()
        };
        let path = if first && name.is_empty() {
            // The first entry is the main program, named "": its file is /proc/self/exe.
            MAIN_PROGRAM.to_owned()
        } else if name
            .rsplit('/')
            .next()
            .is_some_and(|base| base.starts_with("libpython"))
        {
            name
        } else {
            return 0;
        };
        let bias = info.dlpi_addr as usize;
        let mut writable = Vec::new();
        if !info.dlpi_phdr.is_null() {
            // SAFETY: dlpi_phnum program headers at dlpi_phdr, valid during the call.
            let headers =
                unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
            for header in headers {
                if header.p_type == libc::PT_LOAD && header.p_flags & libc::PF_W != 0 {
                    let start = bias.wrapping_add(header.p_vaddr as usize);
                    writable.push((start, start + header.p_memsz as usize));
                }
            }
        }
        found.objects.push(Object {
            path,
            bias,
            writable,
        });
        0
    }

    /// One SDT note of provider `python`.
    pub struct Note {
        pub name: String,
        /// The semaphore's address in the file (0: none).
        pub semaphore: u64,
    }

    /// The largest note section read: CPython's is a few kilobytes.
    const MAX_NOTES: u64 = 1 << 20;

    /// The SDT notes of provider `python` in the ELF object at `path`: none
    /// where it has no `.note.stapsdt` section; an error where the file is
    /// not a 64-bit little-endian ELF object that can be read.
    pub fn python_notes(path: &str) -> Result<Vec<Note>, String> {
        let file = File::open(path).map_err(|e| e.to_string())?;
        let read = |offset: u64, len: usize| -> Result<Vec<u8>, String> {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset)
                .map_err(|e| format!("reading {len} bytes at {offset}: {e}"))?;
            Ok(buf)
        };
        let header = read(0, 64)?;
        if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
            return Err("not a 64-bit little-endian ELF object".into());
        }
        let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at =
            |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u64_at =
            |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let (shoff, shentsize, shnum, shstrndx) = (
            u64_at(&header, 0x28),
            u16_at(&header, 0x3a) as usize,
            u16_at(&header, 0x3c) as usize,
            u16_at(&header, 0x3e) as usize,
        );
        if shoff == 0 || shnum == 0 {
            return Ok(Vec::new()); // no section headers (stripped to the bone): no notes to read
        }
        if shentsize < 64 || shstrndx >= shnum {
            return Err("malformed section headers".into());
        }
        let sections = read(shoff, shentsize * shnum)?;
        let section = |i: usize| {
            let s = &sections[i * shentsize..];
            (u32_at(s, 0), u32_at(s, 4), u64_at(s, 24), u64_at(s, 32)) // name, type, offset, size
        };
        let (_, _, names_offset, names_size) = section(shstrndx);
        let names = read(names_offset, names_size.min(MAX_NOTES) as usize)?;
        let notes_section = (0..shnum).map(section).find(|&(name, kind, _, _)| {
            kind == 7 // SHT_NOTE
                && names.get(name as usize..).is_some_and(|rest| rest.starts_with(b".note.stapsdt\0"))
        });
        let Some((_, _, offset, size)) = notes_section else {
            return Ok(Vec::new());
        };
        if size > MAX_NOTES {
            return Err(format!("a .note.stapsdt section of {size} bytes"));
        }
        let data = read(offset, size as usize)?;
        Ok(parse_notes(&data))
    }

    /// The `stapsdt` notes of provider `python` in a note section's bytes;
    /// a truncated or malformed note ends the list.
    fn parse_notes(data: &[u8]) -> Vec<Note> {
        let align = |n: usize| (n + 3) & !3;
        let mut notes = Vec::new();
        let mut at = 0;
        while at + 12 <= data.len() {
            let word = |o: usize| {
                u32::from_le_bytes(data[o..o + 4].try_into().unwrap_or_default()) as usize
            };
            let (namesz, descsz, kind) = (word(at), word(at + 4), word(at + 8));
            let name_at = at + 12;
            let desc_at = name_at + align(namesz);
            let end = desc_at + align(descsz);
            if end > data.len() || desc_at + descsz > data.len() {
                break;
            }
            if kind == 3 && &data[name_at..name_at + namesz] == b"stapsdt\0" && descsz >= 24 {
                let desc = &data[desc_at..desc_at + descsz];
                let semaphore = u64::from_le_bytes(desc[16..24].try_into().unwrap_or_default());
                let mut strings = desc[24..].split(|&b| b == 0);
                if let (Some(provider), Some(name)) = (strings.next(), strings.next()) {
                    if provider == b"python" {
                        notes.push(Note {
                            name: String::from_utf8_lossy(name).into_owned(),
                            semaphore,
                        });
                    }
                }
            }
            at = end;
        }
        notes
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn note(provider: &str, name: &str, semaphore: u64) -> Vec<u8> {
            let mut desc = Vec::new();
            desc.extend_from_slice(&0x1000u64.to_le_bytes());
            desc.extend_from_slice(&0x2000u64.to_le_bytes());
            desc.extend_from_slice(&semaphore.to_le_bytes());
            for text in [provider, name, "8@%rdi"] {
                desc.extend_from_slice(text.as_bytes());
                desc.push(0);
            }
            let mut out = Vec::new();
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            out.extend_from_slice(&3u32.to_le_bytes());
            out.extend_from_slice(b"stapsdt\0");
            out.extend_from_slice(&desc);
            while out.len() % 4 != 0 {
                out.push(0);
            }
            out
        }

        #[test]
        fn notes_of_provider_python_only_and_a_truncated_one_ends_the_list() {
            let mut data = note("python", "gc__start", 0x3000);
            data.extend(note("libc", "setjmp", 0));
            data.extend(note("python", "audit", 0));
            let whole = parse_notes(&data);
            let names: Vec<(&str, u64)> = whole
                .iter()
                .map(|n| (n.name.as_str(), n.semaphore))
                .collect();
            assert_eq!(names, [("gc__start", 0x3000), ("audit", 0)]);
            let cut = parse_notes(&data[..data.len() - 5]);
            assert_eq!(cut.len(), 1);
        }

        #[test]
        fn this_test_binary_declares_the_providers_probes() {
            // The crate's own probes are linked into its test binary (the Linux SDT backend).
            let mut names: Vec<String> = python_notes(MAIN_PROGRAM)
                .expect("readable")
                .into_iter()
                .map(|note| note.name)
                .collect();
            names.sort();
            let mut expected: Vec<&str> = crate::probes::PROBE_NAMES.to_vec();
            expected.sort();
            if cfg!(probe_backend = "stapsdt") {
                assert_eq!(names, expected);
            }
            assert!(python_notes("/nonexistent").is_err());
        }
    }
}
