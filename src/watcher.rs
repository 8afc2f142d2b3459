//! The thread that notices consumers attach and detach.
//!
//! The kernel raises a probe's semaphore without telling the process, so a
//! native thread polls the semaphores every [`POLL_INTERVAL`]. It holds no
//! GIL and touches no Python object while nothing changes.
//!
//! When the set of enabled probes changes, `arming` must run once with the
//! GIL. Taking the GIL from this thread can starve: CPython asks its holder
//! to let go only after 5 ms without a wake-up, and a main thread that keeps
//! releasing the GIL for I/O keeps winning it back, for seconds. So the
//! change is handed to the main thread as a pending call
//! (`Py_AddPendingCall`), which the interpreter runs at its next check,
//! within microseconds while it runs Python. Only when that has not happened
//! within one poll (the main thread is blocked in C) does this thread take
//! the GIL itself. Either way the GIL is taken once per change, and arming
//! does no import or I/O under it. What a tool asks for through the channel
//! (`channel`: a scope, probes, the end of its lease) travels in the same
//! hand-off, with the probes to arm: the thread with the GIL puts the scope
//! in force (`scope`), publishes it in the channel, arms, and then
//! acknowledges the leases. This module is where the channel and the scope
//! meet; neither knows the other.
//!
//! Two moments need the thread out of the way:
//! - `os.fork()`: Python 3.12+ warns when a process with other OS threads
//!   forks, and a thread that is gone cannot hold a lock the child needs.
//!   The shim's `os.register_at_fork` hooks stop and join the thread before
//!   the fork and start it again in parent and child. CPython 3.13.0 counts
//!   the parent's threads after its after-fork hooks have run, so there the
//!   parent's thread is started again only once `os.fork()` has returned to
//!   its caller (a pending call that waits for that), not in the hook.
//! - Interpreter shutdown: on 3.12 and 3.13 a thread that asks for the GIL
//!   of a finalizing interpreter is ended with `pthread_exit`. An `atexit`
//!   hook stops and joins the thread before finalization begins, and it is
//!   never started again.
//!
//! An interpreter that is not initialised yet is not one going away. A
//! `.pth` file (`PYDTRACE=1`, a tool's `-c`) imports this module while
//! `site` runs, inside `Py_Initialize`: 3.15 reports `Py_IsInitialized()`
//! 0 until that returns (3.12 to 3.14 report 1), and PyO3's checked attach
//! refuses such an interpreter. Its GIL and thread states work already (it
//! runs `site`'s Python code), and a tool's `-c` command waits there, on
//! the tool's pipe with the GIL released, until the tool's scope has been
//! taken up: so the thread attaches without PyO3's check while the
//! interpreter has never been seen initialised and is not finalizing. Once
//! seen initialised, a refusal means finalization, and the thread ends.
//!
//! The top of the crate below `testing` and `lib`: reaches down to
//! `channel`, `follow`, `interpreter`, `arming`, `scope`, `grammar`,
//! `names`, `aggregate`, `enablement`, `error`, `faults` and `probes`.

use std::ffi::c_void;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use pyo3::ffi;
use pyo3::prelude::*;

use crate::aggregate;
use crate::arming;
use crate::channel::{self, Leased, Proposal};
use crate::enablement;
use crate::error::Error;
use crate::faults;
use crate::grammar::Scope;
use crate::interpreter;
use crate::names::interpreter_finalizing;
use crate::probes::ProbeSet;
use crate::scope;

/// How often the semaphores are read: a consumer's probes are live, or
/// switched off after it leaves, within about this long.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Probes armed whether or not a consumer enables them (benchmarks' switch).
static FORCED: AtomicU32 = AtomicU32::new(0);
/// How often the watcher thread has taken the GIL itself.
static GIL_TAKEN: AtomicU64 = AtomicU64::new(0);
/// How often the main thread has applied a change in a pending call.
static HANDED_OFF: AtomicU64 = AtomicU64::new(0);
/// How often the watcher has read the semaphores.
static POLLS: AtomicU64 = AtomicU64::new(0);

/// (times the watcher read the semaphores, times it took the GIL itself,
/// times the main thread applied a change for it) in this process.
pub fn stats() -> (u64, u64, u64) {
    (
        POLLS.load(Ordering::Relaxed),
        GIL_TAKEN.load(Ordering::Relaxed),
        HANDED_OFF.load(Ordering::Relaxed),
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
    faults::lock(&STATE)
}

/// How this module came into the process, for tools that look from outside
/// (`python -m dtrace list`): the watcher thread's name says it, in
/// `/proc/PID/task/TID/comm`, which anyone may read. 0: imported by the
/// program (or `PYDTRACE=1`), the thread is `pydtrace-watcher` (the kernel
/// keeps 15 bytes: `pydtrace-watche`); otherwise `pydtrace-watch` and this
/// letter: `G` loaded through gdb, `R` through `sys.remote_exec`, by
/// `python -m dtrace --inject`. Kept across the thread's restarts (fork).
static ORIGIN: AtomicU8 = AtomicU8::new(0);

/// The watcher thread's name, from [`ORIGIN`].
fn thread_name() -> String {
    match ORIGIN.load(Ordering::Relaxed) {
        0 => "pydtrace-watcher".into(),
        tag => format!("pydtrace-watch{}", tag as char),
    }
}

/// Records how the module came into the process (see [`ORIGIN`]) and names
/// the running watcher thread after it, at once (a thread that has only
/// just started names itself after [`ORIGIN`] at its next poll: the name
/// given at its spawn may land after this one).
pub fn set_origin(tag: u8) {
    ORIGIN.store(tag, Ordering::Relaxed);
    #[cfg(target_os = "linux")]
    if let Some(running) = state()
        .running
        .as_ref()
        .filter(|r| r.pid == std::process::id())
    {
        use std::os::unix::thread::JoinHandleExt;
        name_thread(running.handle.as_pthread_t());
    }
}

/// Gives `thread` (a live thread of this process) the name [`ORIGIN`] says.
#[cfg(target_os = "linux")]
fn name_thread(thread: std::os::unix::thread::RawPthread) {
    if let Ok(name) = std::ffi::CString::new(thread_name()) {
        // SAFETY: a live thread of this process; a name of at most 15 bytes.
        unsafe { libc::pthread_setname_np(thread, name.as_ptr()) };
    }
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
        faults::kick();
        return Ok(());
    }
    let control = Arc::new(Control {
        stop: Mutex::new(false),
        wake: Condvar::new(),
    });
    let handle = thread::Builder::new()
        .name(thread_name())
        .spawn({
            let control = Arc::clone(&control);
            let origin = ORIGIN.load(Ordering::Relaxed);
            move || watch(&control, origin)
        })
        .map_err(Error::WatcherSpawn)?;
    state.running = Some(Running {
        handle,
        control,
        pid: std::process::id(),
    });
    channel::set_watcher_running(true);
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
    channel::set_watcher_running(false);
    *faults::lock(&running.control.stop) = true;
    running.control.wake.notify_all();
    py.detach(|| {
        let _ = running.handle.join();
    });
    true
}

/// `os.register_at_fork(before=...)`: stops the thread before a fork.
pub fn before_fork(py: Python<'_>) {
    let was_running = stop(py);
    // A restart still waiting from the previous fork counts as running.
    let restart_waiting = faults::lock(&FORK_RESTART).take().is_some();
    state().resume_after_fork = was_running || restart_waiting;
}

/// `os.register_at_fork(after_in_child=...)`: starts the thread again if it
/// ran before the fork. The hooks stay as the parent left them; the new
/// thread applies what the child's semaphores say (a child of a traced
/// parent sees the parent's semaphores until its first probe hit, then the
/// kernel drops them and the child goes idle).
pub fn after_fork_child() -> Result<(), Error> {
    if let Some(proposal) = channel::after_fork_child() {
        propose(proposal);
    }
    if std::mem::take(&mut state().resume_after_fork) {
        start(forced())?;
    }
    Ok(())
}

/// `os.register_at_fork(after_in_parent=...)`: starts the thread again if
/// it ran before the fork; on 3.13, once `os.fork()` has returned.
pub fn after_fork_parent(py: Python<'_>) -> Result<(), Error> {
    if !std::mem::take(&mut state().resume_after_fork) {
        return Ok(());
    }
    // 3.13.0 moved its count of the parent's threads after these hooks
    // (gh-116522); 3.12 counts before them, and 3.14 moved it back.
    if py.version_info() < (3, 13) || py.version_info() >= (3, 14) {
        return start(forced());
    }
    // SAFETY: GIL held; the frame that called os.fork() (borrowed), if any.
    let caller = unsafe { ffi::PyEval_GetFrame() };
    if caller.is_null() {
        return start(forced()); // forked from C code: no Python thread count follows
    }
    // SAFETY: `caller` is a live frame object.
    let lasti = unsafe { ffi::PyFrame_GetLasti(caller) };
    *faults::lock(&FORK_RESTART) = Some(ForkCaller {
        frame: caller as usize,
        lasti,
        tries: 0,
    });
    // SAFETY: a static function; callable with the GIL held.
    if unsafe { ffi::Py_AddPendingCall(Some(restart_after_fork), std::ptr::null_mut()) } != 0 {
        faults::lock(&FORK_RESTART).take();
        return start(forced()); // the queue is full: better a warning than no probes
    }
    Ok(())
}

/// Where `os.fork()` was called from, while the parent's restart waits for
/// it to return: the caller's frame and the offset of its call.
struct ForkCaller {
    frame: usize,
    lasti: c_int,
    tries: u32,
}

static FORK_RESTART: Mutex<Option<ForkCaller>> = Mutex::new(None);

/// Pending calls after which the restart gives up waiting for `os.fork()`
/// to return (a frame that never shows its caller again) and starts anyway.
const FORK_RESTART_TRIES: u32 = 100_000;

/// The parent's restart after a fork on 3.13: runs as a pending call on the
/// main thread, and again until the fork's caller is the running frame.
/// Pending calls also run inside other after-fork hooks written in Python
/// (logging's, for one), while the thread count is still to come: there the
/// caller's frame is on the stack, below the hook's, at the same offset.
extern "C" fn restart_after_fork(_: *mut c_void) -> c_int {
    let mut waiting = faults::lock(&FORK_RESTART);
    let Some(caller) = waiting.as_mut() else {
        return 0; // already restarted, or a fork came in between
    };
    // SAFETY: pending calls run on the main thread with the GIL held.
    let inside = unsafe { fork_caller_below_top(caller) };
    caller.tries += 1;
    if inside && caller.tries < FORK_RESTART_TRIES {
        // SAFETY: as above.
        if unsafe { ffi::Py_AddPendingCall(Some(restart_after_fork), std::ptr::null_mut()) } == 0 {
            return 0;
        }
    }
    waiting.take();
    drop(waiting);
    if let Err(err) = start(forced()) {
        // SAFETY: as above.
        faults::report_arming_error(unsafe { Python::assume_attached() }, &err.to_string());
    }
    0
}

/// Whether the frame that called `os.fork()` is on the stack, still at its
/// call, under another frame (a Python after-fork hook).
///
/// # Safety
/// GIL held.
unsafe fn fork_caller_below_top(caller: &ForkCaller) -> bool {
    let top = ffi::PyEval_GetFrame();
    if top.is_null() || top as usize == caller.frame {
        return false;
    }
    let mut frame = ffi::PyFrame_GetBack(top); // a new reference
    while !frame.is_null() {
        let found = frame as usize == caller.frame && ffi::PyFrame_GetLasti(frame) == caller.lasti;
        let back = if found {
            std::ptr::null_mut()
        } else {
            ffi::PyFrame_GetBack(frame)
        };
        ffi::Py_DECREF(frame.cast());
        if found {
            return true;
        }
        frame = back;
    }
    false
}

/// `atexit`: stops the thread for good before the interpreter finalizes.
pub fn at_exit(py: Python<'_>) {
    state().shut_down = true;
    stop(py);
}

/// The thread's loop.
fn watch(control: &Control, mut named: u8) {
    // What is hooked in already: nothing on a fresh start, the parent's hooks
    // in a forked child. Applying only on a difference keeps the GIL untouched.
    let mut applied = arming::live();
    loop {
        POLLS.fetch_add(1, Ordering::Relaxed);
        let origin = ORIGIN.load(Ordering::Relaxed);
        if origin != named {
            // `set_origin` came while this thread started: its name is the spawn's.
            #[cfg(target_os = "linux")]
            // SAFETY: this thread.
            name_thread(unsafe { libc::pthread_self() });
            named = origin;
        }
        // A tool's scope or probe request (or the end of its lease): applied with the GIL too,
        // also when a proposal of an earlier poll is still waiting; and the environment a
        // `follow:PATH` lease asks for.
        if let Some(proposal) = channel::poll() {
            propose(proposal);
        }
        let scope_changed = PROPOSAL_WAITING.load(Ordering::Acquire) || crate::follow::waiting();
        // A probe the interpreter declares too is left to it while a consumer
        // has the interpreter's own on (one event, one firing: `interpreter`),
        // unless a tool asked for ours through the channel.
        let wanted = enablement::consumer_enabled()
            .difference(interpreter::firing())
            .union(channel::leased_probes())
            .union(forced());
        let kicked = faults::take_kick();
        // A tool's flush request, or the periodic flush: run with the GIL too.
        let flush = aggregate::poll();
        if applied != wanted || kicked || scope_changed || flush {
            if !apply_with_gil(wanted) {
                return; // the interpreter is going away
            }
            // Also after a failure: retried when the enabled set changes again.
            applied = wanted;
        }
        let stop = faults::lock(&control.stop);
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

/// One change of the enabled set, and what the channel asks for, on its way
/// to a thread with the GIL.
struct Handoff {
    /// The set to apply, the number of its request, and the last request applied.
    wanted: ProbeSet,
    /// What the channel asks for, not applied yet (merged across polls).
    proposal: Option<Proposal>,
    requested: u64,
    applied: u64,
    /// The process that asked: a pending call queued before a fork does not
    /// run the parent's request in the child.
    pid: u32,
}

static HANDOFF: Mutex<Handoff> = Mutex::new(Handoff {
    wanted: ProbeSet::EMPTY,
    proposal: None,
    requested: 0,
    applied: 0,
    pid: 0,
});
/// Signalled when a request has been applied.
static HANDOFF_DONE: Condvar = Condvar::new();
/// Whether our pending call is queued (at most one is).
static PENDING_QUEUED: AtomicBool = AtomicBool::new(false);

fn handoff() -> MutexGuard<'static, Handoff> {
    faults::lock(&HANDOFF)
}

/// Whether [`Handoff::proposal`] holds one (read by every poll, without a lock).
static PROPOSAL_WAITING: AtomicBool = AtomicBool::new(false);

/// Hands what the channel asks for to the next application with the GIL;
/// merges it with one not applied yet.
fn propose(proposal: Proposal) {
    let mut handoff = handoff();
    PROPOSAL_WAITING.store(true, Ordering::Release);
    match handoff.proposal.as_mut() {
        None => handoff.proposal = Some(proposal),
        Some(earlier) => earlier.merge(proposal),
    }
}

/// Whether the interpreter has been seen initialised (`Py_IsInitialized()`)
/// in this process: before that it is still starting, after it a refusal
/// of the GIL means it is going away.
static INITIALIZED_SEEN: AtomicBool = AtomicBool::new(false);

/// Has `wanted` applied with the GIL: by the main thread in a pending call,
/// or by this thread if the main thread has not run it within a poll.
/// False when the interpreter is going away.
fn apply_with_gil(wanted: ProbeSet) -> bool {
    let request = {
        let mut handoff = handoff();
        handoff.wanted = wanted;
        handoff.requested += 1;
        handoff.pid = std::process::id();
        handoff.requested
    };
    if !PENDING_QUEUED.swap(true, Ordering::AcqRel) {
        // SAFETY: Py_AddPendingCall may be called without the GIL from any thread.
        if unsafe { ffi::Py_AddPendingCall(Some(apply_pending), std::ptr::null_mut()) } != 0 {
            PENDING_QUEUED.store(false, Ordering::Release);
        }
    }
    let handoff = handoff();
    let (handoff, _) = HANDOFF_DONE
        .wait_timeout_while(handoff, POLL_INTERVAL, |h| h.applied < request)
        .unwrap_or_else(|p| p.into_inner());
    if handoff.applied >= request {
        return true;
    }
    drop(handoff);
    // The main thread runs no Python now (blocked in C): take the GIL here.
    let apply = |py: Python<'_>| {
        GIL_TAKEN.fetch_add(1, Ordering::Relaxed);
        apply_requested(py);
    };
    if initialized_or_seen() {
        return Python::try_attach(apply).is_some();
    }
    if interpreter_finalizing() {
        return false;
    }
    // SAFETY: an interpreter still in Py_Initialize that imported this module
    // runs Python code already: its GIL and thread states work (PyO3's check
    // reads only the flag that 3.15 sets at the end of initialisation).
    unsafe { Python::attach_unchecked(apply) };
    true
}

/// Whether the interpreter is initialised now, or was seen so before.
fn initialized_or_seen() -> bool {
    if !INITIALIZED_SEEN.load(Ordering::Relaxed)
        // SAFETY: reads a flag of the runtime; callable from any thread.
        && unsafe { ffi::Py_IsInitialized() } != 0
    {
        INITIALIZED_SEEN.store(true, Ordering::Relaxed);
    }
    INITIALIZED_SEEN.load(Ordering::Relaxed)
}

/// The pending call: applies the latest request on the main thread. Never
/// raises into the program (it returns 0 with no error set).
extern "C" fn apply_pending(_: *mut c_void) -> c_int {
    PENDING_QUEUED.store(false, Ordering::Release);
    if state().shut_down || interpreter_finalizing() {
        return 0;
    }
    // SAFETY: pending calls run on the main thread with the GIL held.
    let py = unsafe { Python::assume_attached() };
    if apply_requested(py) {
        HANDED_OFF.fetch_add(1, Ordering::Relaxed);
    }
    0
}

/// Applies the latest request unless it was applied already; whether it did.
fn apply_requested(py: Python<'_>) -> bool {
    if arming::arming_here() {
        return false; // inside arming's own Python code: the outer call finishes first
    }
    let (wanted, request, proposal) = {
        let mut handoff = handoff();
        if handoff.pid != std::process::id() || handoff.applied >= handoff.requested {
            return false;
        }
        PROPOSAL_WAITING.store(false, Ordering::Release);
        (handoff.wanted, handoff.requested, handoff.proposal.take())
    };
    // The scope first, then the probes, then the acknowledgements: a tool that
    // saw its acknowledgement starts its tracer knowing that no out-of-scope
    // event will come and that the probes it asked for fire.
    let acks = proposal.map_or_else(Vec::new, |proposal| apply_proposal(py, proposal));
    if let Err(err) = arming::apply(py, wanted) {
        faults::report_arming_error(py, &err.to_string());
    }
    aggregate::flush_pending(py);
    crate::follow::apply(py); // -p --children: the environment, before the lease is acknowledged
    channel::acknowledge(&acks);
    let mut handoff = handoff();
    handoff.applied = handoff.applied.max(request);
    HANDOFF_DONE.notify_all();
    true
}

/// Applies what the channel asks for, with the GIL: warns about a malformed
/// scope, puts the leases' scope (or the base scope) in force. Returns the
/// leases to acknowledge once the probes they ask for are armed too.
fn apply_proposal(py: Python<'_>, proposal: Proposal) -> Vec<channel::Ack> {
    if let Some(what) = &proposal.warning {
        scope::warn_malformed(py, what);
    }
    match proposal.change {
        Some(Leased::Scope(leased, tools)) => put_in_force(py, Some(leased), tools),
        Some(Leased::Base) => put_in_force(py, scope::base(), Vec::new()),
        None => {}
    }
    proposal.acks
}

/// Puts `in_force` in force (made by the leases of `tools`) and publishes it
/// in the channel, for the tools to read; with the GIL.
fn put_in_force(py: Python<'_>, in_force: Option<Arc<Scope>>, tools: Vec<u32>) {
    let generation = scope::install(py, in_force.clone(), tools.clone());
    channel::publish(in_force.as_deref(), &tools, generation);
}

/// Sets the base scope from `PYDTRACE_SCOPE` (with the GIL, at `arm`): in
/// force at once unless tools' leases are (the base comes back when they
/// end). A malformed text is warned about once and changes nothing.
pub fn set_base_scope(py: Python<'_>, text: &str) {
    if let Some(base) = scope::set_base(py, text) {
        if !channel::leases_held() {
            put_in_force(py, base, Vec::new());
        }
    }
}
