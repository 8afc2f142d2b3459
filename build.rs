//! Turns `provider/pydtrace.d` into Rust probe code, for every backend.
//!
//! The provider file is the single source of the probe set: everything
//! below is generated from it, and nothing in `src/` lists the probes again.
//!
//! One backend is chosen here and named to the crate by one cfg,
//! `probe_backend = "stapsdt" | "usdt" | "none"`:
//! - `stapsdt` (Linux): the project's own SystemTap SDT emitter. One
//!   `#[inline(never)]` function per probe whose inline assembly places a
//!   `nop` at the probe site and records it in a `.note.stapsdt` note, with
//!   CPython's probe spelling (`function__entry`), a two-byte aligned
//!   semaphore per probe in the `.probes` section, and arguments passed
//!   straight from registers (no per-event copies). The usdt crate's Linux
//!   backend renames the probes, leaves the semaphores unaligned and copies
//!   strings on every firing (docs/decisions.md, 1), so it is not used there.
//! - `usdt` (macOS, illumos, or any platform with the `usdt-backend`
//!   feature, for type-checking): the usdt crate's macros, wrapped in firing
//!   functions with the Linux signatures, and the macOS is-enabled symbols.
//! - `none` (no probe mechanism): firing functions that do nothing.
//!
//! Every backend also gets `$OUT_DIR/provider.rs`: the probe names in file
//! order and one constant per probe index.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

use dtrace_parser::File;

#[path = "build/codegen.rs"]
mod codegen;

use codegen::{
    argument_names, macos_is_enabled, noop_probes, provider_table, stapsdt_probes, usdt_wrappers,
    PROVIDER_NAME,
};

const PROVIDER_FILE: &str = "provider/pydtrace.d";

/// The emission backend, printed as `cfg(probe_backend = "...")`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Stapsdt,
    Usdt,
    None,
}

impl Backend {
    const ALL: [Backend; 3] = [Backend::Stapsdt, Backend::Usdt, Backend::None];

    fn name(self) -> &'static str {
        match self {
            Backend::Stapsdt => "stapsdt",
            Backend::Usdt => "usdt",
            Backend::None => "none",
        }
    }

    /// The backend for this target (and features).
    fn for_target() -> Backend {
        if env::var_os("CARGO_FEATURE_USDT_BACKEND").is_some() {
            return Backend::Usdt;
        }
        match env::var("CARGO_CFG_TARGET_OS").unwrap_or_default().as_str() {
            "linux" => Backend::Stapsdt,
            "macos" | "illumos" => Backend::Usdt,
            _ => Backend::None,
        }
    }
}

fn main() {
    println!("cargo:rerun-if-changed={PROVIDER_FILE}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build/codegen.rs");
    pyo3_build_config::use_pyo3_cfgs();
    require_cpython_3_12();

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let source =
        fs::read_to_string(PROVIDER_FILE).unwrap_or_else(|err| panic!("{PROVIDER_FILE}: {err}"));
    let file =
        File::try_from(source.as_str()).unwrap_or_else(|err| panic!("{PROVIDER_FILE}: {err}"));
    let provider = file
        .providers()
        .iter()
        .find(|p| p.name == PROVIDER_NAME)
        .unwrap_or_else(|| panic!("{PROVIDER_FILE} declares no provider `{PROVIDER_NAME}`"));
    let probes = &provider.probes;

    let backend = Backend::for_target();
    let values: Vec<String> = Backend::ALL
        .iter()
        .map(|b| format!("\"{}\"", b.name()))
        .collect();
    println!(
        "cargo::rustc-check-cfg=cfg(probe_backend, values({}))",
        values.join(", ")
    );
    println!("cargo:rustc-cfg=probe_backend=\"{}\"", backend.name());

    let write = |name: &str, code: String| {
        fs::write(out_dir.join(name), code).unwrap_or_else(|err| panic!("write {name}: {err}"))
    };
    let arguments =
        argument_names(&source, probes).unwrap_or_else(|err| panic!("{PROVIDER_FILE}: {err}"));
    write("provider.rs", provider_table(probes, &arguments));
    match backend {
        Backend::Stapsdt => {
            let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
            let version = pyo3_build_config::get().version();
            write(
                "fire.rs",
                stapsdt_probes(probes, &arch, (version.major, version.minor)),
            );
        }
        Backend::Usdt => {
            build_usdt(&out_dir);
            write("fire.rs", usdt_wrappers(probes));
            write("is_enabled.rs", macos_is_enabled(probes));
        }
        Backend::None => write("fire.rs", noop_probes(probes)),
    }
}

/// On the DTrace platforms, the usdt crate's builder emits the probe macros.
#[cfg(any(target_os = "macos", target_os = "illumos", feature = "usdt-backend"))]
fn build_usdt(out_dir: &Path) {
    usdt::Builder::new(PROVIDER_FILE)
        .out_file(out_dir.join("usdt_probes.rs"))
        .build()
        .expect("usdt could not compile provider/pydtrace.d");
}

#[cfg(not(any(target_os = "macos", target_os = "illumos", feature = "usdt-backend")))]
fn build_usdt(_out_dir: &Path) {
    panic!("building for a DTrace platform needs the usdt build dependency of that host");
}

/// The oldest interpreter the extension is built for: `sys.monitoring` (PEP 669) came with 3.12.
const OLDEST_PYTHON: (u8, u8) = (3, 12);

/// Stops a build for an interpreter the extension cannot support (an older CPython, or another
/// implementation) with a message that says so, rather than a Rust compile error deep in the
/// code (`cannot find function PyErr_GetRaisedException` under 3.11).
fn require_cpython_3_12() {
    let config = pyo3_build_config::get();
    let version = config.version();
    let interpreter = config.executable().unwrap_or("the interpreter PyO3 found");
    let cpython = matches!(
        config.implementation(),
        pyo3_build_config::PythonImplementation::CPython
    );
    if (version.major, version.minor) < OLDEST_PYTHON || !cpython {
        let found = format!(
            "{:?} {}.{}",
            config.implementation(),
            version.major,
            version.minor
        );
        panic!(
            "\n\npydtrace-rs needs CPython {}.{} or later (it is built on sys.monitoring, PEP 669); \
             this build is for {found} ({interpreter}). Build with a CPython >= {}.{}: \
             `maturin build -i python3.12`, or `pip install .` from a virtual environment of one.\n\n",
            OLDEST_PYTHON.0, OLDEST_PYTHON.1, OLDEST_PYTHON.0, OLDEST_PYTHON.1
        );
    }
}
