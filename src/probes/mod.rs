//! The probes of provider `python`, generated from `provider/pydtrace.d`.
//!
//! Everything above this module sees one interface whatever the platform:
//! the probe table (`PROBE_NAMES`, one index constant per probe), a
//! [`ProbeSet`] of probe indices, and `fire::<probe>(args)` functions that
//! cost a `nop` while no consumer is attached. The emission backend behind
//! `fire` is chosen by `build.rs` and named by `cfg(probe_backend)`:
//! SystemTap SDT notes on Linux, the usdt crate on macOS and illumos
//! (docs/decisions.md, 1), none elsewhere. Every backend's code is generated
//! from the provider file.

include!(concat!(env!("OUT_DIR"), "/provider.rs"));

#[cfg(probe_backend = "stapsdt")]
pub mod stapsdt;
#[cfg(probe_backend = "stapsdt")]
pub use stapsdt::fire;

#[cfg(probe_backend = "usdt")]
pub mod usdt_backend;
#[cfg(probe_backend = "usdt")]
pub use usdt_backend::fire;

/// Probe functions that do nothing, with the same signatures as elsewhere.
#[cfg(probe_backend = "none")]
pub mod fire {
    include!(concat!(env!("OUT_DIR"), "/fire.rs"));
}

/// Whether this build has a probe mechanism at all.
const BACKEND_BUILT: bool = !cfg!(probe_backend = "none");

/// Set when registering the probes with the kernel failed (DTrace platforms).
static REGISTRATION_FAILED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Makes the probes visible to consumers: on illumos the usdt crate hands
/// them to the kernel now; elsewhere there is nothing to do. A failure
/// leaves the module importable with `available` False.
pub fn register() {
    #[cfg(probe_backend = "usdt")]
    if usdt_backend::register().is_err() {
        REGISTRATION_FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether probes can work here: a probe mechanism, and the probes registered with it.
pub fn backend_available() -> bool {
    BACKEND_BUILT && !REGISTRATION_FAILED.load(std::sync::atomic::Ordering::Relaxed)
}

/// A probe name that provider `python` does not declare.
#[derive(Debug)]
pub struct UnknownProbe(pub String);

/// A set of probes, by their index in the provider file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeSet(u32);

const _: () = assert!(PROBE_COUNT <= 32, "ProbeSet holds at most 32 probes");

impl ProbeSet {
    /// No probe.
    pub const EMPTY: ProbeSet = ProbeSet(0);
    /// Every probe of the provider.
    pub const ALL: ProbeSet = ProbeSet(((1u64 << PROBE_COUNT) - 1) as u32);

    /// The set holding the given probe indices.
    pub const fn of(indices: &[usize]) -> ProbeSet {
        let mut bits = 0;
        let mut i = 0;
        while i < indices.len() {
            bits |= 1 << indices[i];
            i += 1;
        }
        ProbeSet(bits)
    }

    /// The set with these bits (bit `i` for probe index `i`).
    pub const fn from_bits(bits: u32) -> ProbeSet {
        ProbeSet(bits & ProbeSet::ALL.0)
    }

    /// The set's bits (bit `i` for probe index `i`).
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// The set with `index` added.
    pub const fn with(self, index: usize) -> ProbeSet {
        ProbeSet(self.0 | (1 << index))
    }

    /// Whether the set holds probe `index`.
    pub const fn contains(self, index: usize) -> bool {
        self.0 & (1 << index) != 0
    }

    /// Whether the set holds every probe of `other`.
    pub const fn is_superset(self, other: ProbeSet) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The probes of both sets.
    pub const fn union(self, other: ProbeSet) -> ProbeSet {
        ProbeSet(self.0 | other.0)
    }

    /// The probes in both sets.
    pub const fn intersection(self, other: ProbeSet) -> ProbeSet {
        ProbeSet(self.0 & other.0)
    }

    /// The probes of `self` that are not in `other`.
    pub const fn difference(self, other: ProbeSet) -> ProbeSet {
        ProbeSet(self.0 & !other.0)
    }

    /// The probe indices in the set, in file order.
    pub fn indices(self) -> impl Iterator<Item = usize> {
        (0..PROBE_COUNT).filter(move |&i| self.contains(i))
    }

    /// The names of the probes in the set, as DTrace spells them (`function-entry`).
    pub fn dtrace_names(self) -> impl Iterator<Item = &'static str> {
        self.indices().map(|i| PROBE_DTRACE_NAMES[i])
    }

    /// The set named by `names`, each spelt as DTrace (`gc-start`) or as the
    /// provider file (`gc__start`) spells it.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<ProbeSet, UnknownProbe> {
        names.iter().try_fold(ProbeSet::EMPTY, |set, name| {
            let name = name.as_ref();
            PROBE_DTRACE_NAMES
                .iter()
                .zip(PROBE_NAMES.iter())
                .position(|(dtrace, file)| *dtrace == name || *file == name)
                .map(|index| set.with(index))
                .ok_or_else(|| UnknownProbe(name.to_owned()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_combine_by_index() {
        let gc = ProbeSet::of(&[GC_START, GC_DONE]);
        let entry = ProbeSet::EMPTY.with(FUNCTION_ENTRY);
        let both = gc.union(entry);
        assert!(both.contains(GC_DONE) && both.contains(FUNCTION_ENTRY) && !both.contains(LINE));
        assert!(both.is_superset(gc) && !gc.is_superset(both));
        assert_eq!(both.intersection(gc), gc);
        assert_eq!(both.difference(gc), entry);
        assert_eq!(
            both.indices().collect::<Vec<_>>(),
            vec![FUNCTION_ENTRY, GC_START, GC_DONE]
        );
        assert_eq!(ProbeSet::from_bits(u32::MAX), ProbeSet::ALL);
        assert_eq!(ProbeSet::ALL.indices().count(), PROBE_COUNT);
    }

    #[test]
    fn names_are_taken_in_either_spelling_and_unknown_ones_refused() {
        let set = ProbeSet::from_names(&["gc-start", "function__entry"]).expect("known names");
        assert_eq!(set, ProbeSet::of(&[GC_START, FUNCTION_ENTRY]));
        assert_eq!(
            set.dtrace_names().collect::<Vec<_>>(),
            vec!["function-entry", "gc-start"]
        );
        let err = ProbeSet::from_names(&["gc-start", "nope"]).expect_err("unknown name");
        assert_eq!(err.0, "nope");
        assert_eq!(
            ProbeSet::from_names::<&str>(&[]).ok(),
            Some(ProbeSet::EMPTY)
        );
    }
}
