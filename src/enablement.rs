//! Which probes a consumer enables right now.
//!
//! On Linux a consumer (bpftrace, perf, SystemTap, bcc) raises a probe's SDT
//! semaphore while it is attached, so the answer is a read of the semaphore
//! array. On the DTrace platforms the usdt backend answers through the
//! probes' is-enabled sites. Elsewhere no probe is ever enabled.

use crate::probes::ProbeSet;

/// The probes whose semaphores a consumer has raised.
#[cfg(probe_backend = "stapsdt")]
pub fn consumer_enabled() -> ProbeSet {
    use std::sync::atomic::Ordering;

    crate::probes::stapsdt::SEMAPHORES
        .iter()
        .enumerate()
        .filter(|(_, semaphore)| semaphore.load(Ordering::Relaxed) != 0)
        .fold(ProbeSet::EMPTY, |set, (index, _)| set.with(index))
}

/// The probes a DTrace consumer has enabled.
#[cfg(probe_backend = "usdt")]
pub fn consumer_enabled() -> ProbeSet {
    crate::probes::usdt_backend::enabled()
}

/// No probe mechanism: nothing is ever enabled.
#[cfg(probe_backend = "none")]
pub fn consumer_enabled() -> ProbeSet {
    ProbeSet::EMPTY
}
