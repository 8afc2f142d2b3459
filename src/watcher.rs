//! The thread that notices consumers attach and detach.
//!
//! The kernel raises a probe's semaphore without telling the process, so a
//! native thread polls the semaphores every [`POLL_INTERVAL`]. It holds no
//! GIL and touches no Python object while nothing changes; when the set of
//! enabled probes changes it takes the GIL once and lets `arming` switch
//! the interpreter's hooks to match.
//!
//! Two moments need the thread out of the way:
//! - `os.fork()`: Python 3.12+ warns when a process with other OS threads
//!   forks, and a thread that is gone cannot hold a lock the child needs.
//!   The shim's `os.register_at_fork` hooks stop and join the thread before
//!   the fork and start it again in parent and child.
//! - Interpreter shutdown: on 3.12 and 3.13 a thread that asks for the GIL
//!   of a finalizing interpreter is ended with `pthread_exit`. An `atexit`
//!   hook stops and joins the thread before finalization begins, and it is
//!   never started again.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use pyo3::prelude::*;

use crate::arming;
use crate::enablement;
use crate::error::Error;
use crate::probes::ProbeSet;

/// How often the semaphores are read: a consumer's probes are live, or
/// switched off after it leaves, within about this long.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Probes armed whether or not a consumer enables them (benchmarks' switch).
static FORCED: AtomicU32 = AtomicU32::new(0);
/// Set when the enabled set must be applied again although it did not change.
static KICK: AtomicBool = AtomicBool::new(false);
/// How often the watcher has taken the GIL, for the tests' idle guard.
static GIL_TAKEN: AtomicU64 = AtomicU64::new(0);
/// How often the watcher has read the semaphores.
static POLLS: AtomicU64 = AtomicU64::new(0);

/// (times the watcher read the semaphores, times it took the GIL) in this process.
pub fn stats() -> (u64, u64) {
    (
        POLLS.load(Ordering::Relaxed),
        GIL_TAKEN.load(Ordering::Relaxed),
    )
}

/// How the thread is told to stop.
struct Control {
    stop: Mutex<bool>,
    wake: Condvar,
}

/// A running watcher thread.
struct Running {
    handle: JoinHandle<()>,
    control: Arc<Control>,
    /// The process that started it: after a fork that bypassed the fork
    /// hooks (a C library calling fork()), the child has no such thread.
    pid: u32,
}

/// The watcher's lifecycle.
struct State {
    running: Option<Running>,
    /// Whether to start again after a fork.
    resume_after_fork: bool,
    /// Set at interpreter exit: never start again.
    shut_down: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    running: None,
    resume_after_fork: false,
    shut_down: false,
});

fn state() -> MutexGuard<'static, State> {
    STATE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The probes armed regardless of consumers.
pub fn forced() -> ProbeSet {
    ProbeSet::from_bits(FORCED.load(Ordering::Relaxed))
}

/// Starts the watcher (if it is not running) with `forced` probes armed
/// regardless of consumers. Does nothing after interpreter exit began.
pub fn start(forced: ProbeSet) -> Result<(), Error> {
    FORCED.store(forced.bits(), Ordering::Relaxed);
    let mut state = state();
    if state
        .running
        .as_ref()
        .is_some_and(|r| r.pid != std::process::id())
    {
        state.running = None; // forked behind our back: that thread is not here
    }
    if state.shut_down || state.running.is_some() {
        kick();
        return Ok(());
    }
    let control = Arc::new(Control {
        stop: Mutex::new(false),
        wake: Condvar::new(),
    });
    let handle = thread::Builder::new()
        .name("pydtrace-watcher".into())
        .spawn({
            let control = Arc::clone(&control);
            move || watch(&control)
        })
        .map_err(Error::WatcherSpawn)?;
    state.running = Some(Running {
        handle,
        control,
        pid: std::process::id(),
    });
    Ok(())
}

/// Whether the watcher runs in this process.
pub fn is_running() -> bool {
    state()
        .running
        .as_ref()
        .is_some_and(|r| r.pid == std::process::id())
}

/// Stops the watcher and waits for its thread to end, with the GIL
/// released (the thread may be waiting for it). Returns whether it ran.
pub fn stop(py: Python<'_>) -> bool {
    let Some(running) = state().running.take() else {
        return false;
    };
    if running.pid != std::process::id() {
        return false;
    }
    *running
        .control
        .stop
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = true;
    running.control.wake.notify_all();
    py.detach(|| {
        let _ = running.handle.join();
    });
    true
}

/// Asks the watcher to apply the enabled set again at its next poll.
pub fn kick() {
    KICK.store(true, Ordering::Release);
}

/// `os.register_at_fork(before=...)`: stops the thread before a fork.
pub fn before_fork(py: Python<'_>) {
    let was_running = stop(py);
    state().resume_after_fork = was_running;
}

/// `os.register_at_fork(after_in_parent=..., after_in_child=...)`: starts
/// the thread again if it ran before the fork. In a child the hooks stay
/// as the parent left them; the new thread applies what the child's
/// semaphores say (DECISIONS.md, 8: a child of a traced parent sees the
/// parent's semaphores until its first probe hit, then goes idle).
pub fn after_fork() -> Result<(), Error> {
    let resume = std::mem::take(&mut state().resume_after_fork);
    if resume {
        start(forced())?;
    }
    Ok(())
}

/// `atexit`: stops the thread for good before the interpreter finalizes.
pub fn at_exit(py: Python<'_>) {
    state().shut_down = true;
    stop(py);
}

/// The thread's loop.
fn watch(control: &Control) {
    // What is hooked in already: nothing on a fresh start, the parent's hooks
    // in a forked child. Applying only on a difference keeps the GIL untouched.
    let mut applied = arming::live();
    loop {
        POLLS.fetch_add(1, Ordering::Relaxed);
        let wanted = enablement::consumer_enabled().union(forced());
        let kicked = KICK.swap(false, Ordering::AcqRel);
        if applied != wanted || kicked {
            let attached = Python::try_attach(|py| {
                GIL_TAKEN.fetch_add(1, Ordering::Relaxed);
                if let Err(err) = arming::apply(py, wanted) {
                    PyErr::from(err).write_unraisable(py, None);
                }
            });
            if attached.is_none() {
                return; // the interpreter is going away
            }
            // Also after a failure: retried when the enabled set changes again.
            applied = wanted;
        }
        let stop = control.stop.lock().unwrap_or_else(|p| p.into_inner());
        if *stop {
            return;
        }
        let (stop, _) = control
            .wake
            .wait_timeout(stop, POLL_INTERVAL)
            .unwrap_or_else(|p| p.into_inner());
        if *stop {
            return;
        }
    }
}
