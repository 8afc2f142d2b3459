//! `-p PID --children`: while a tool's lease names its socket, the
//! processes this one starts report to that tool.
//!
//! A command that a tool starts (`-c`) gets `PYDTRACE_FOLLOW` (the path of
//! the tool's Unix socket) and `PYDTRACE=1` in its environment from the
//! start, and every Python process of its tree reports there: one started by
//! exec when it imports dtrace at start-up, one forked in its
//! `os.register_at_fork` hook (`dtrace/_startup.py`). A running process is
//! told the same through the scope channel: a lease line `follow:PATH`
//! (parsed with the rest of the lease, `grammar::Lease`). While such a
//! lease is held, the process has both variables in its environment, in
//! `os.environ` and the C environment alike, so that `os.exec*`,
//! `subprocess` and multiprocessing's spawn and forkserver pass them on, and
//! its fork hook reports each forked child; when the lease ends (released,
//! or its tool died) the variables go back to what they were, exactly.
//! Children started before the lease are not followed: nothing tells them.
//!
//! The watcher reads the leases without the GIL and records the path they
//! ask for here ([`want`]); the change is made with the GIL in the
//! watcher's hand-off (a pending call, as arming is: docs/internals.md) by
//! the package's function `dtrace._follow_children`, which only sets
//! dictionary items and calls `putenv`/`unsetenv`: no import and no I/O
//! under the GIL. The lease is
//! acknowledged after that, so a tool that saw its acknowledgement knows
//! that every process started from then on reports to it.
//!
//! One tool at a time follows a process's children: a second lease naming
//! a socket while one does is refused (`channel`), since the environment
//! can name one socket only.
//!
//! Reaches down to `faults` only; `channel` tells it which socket the leases
//! name, `watcher` has it applied in the hand-off.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use pyo3::prelude::*;

use crate::faults;

/// What the leases ask for and what the environment says now.
struct Follow {
    /// The socket the leases in force name (`None`: no lease follows).
    wanted: Option<String>,
    /// The socket the environment names after the last change made here.
    applied: Option<String>,
}

static FOLLOW: Mutex<Follow> = Mutex::new(Follow {
    wanted: None,
    applied: None,
});
/// Whether `wanted` differs from `applied` (read by every hand-off, without a lock).
static WAITING: AtomicBool = AtomicBool::new(false);
/// `dtrace._follow_children(path or None)`, which makes the environment say `path`: looked up
/// when a lease asks for a change. The package is imported by then (this module is its native
/// part), so this is a lookup in `sys.modules`, no import. Holding the function from import on
/// kept the package's namespace alive to the end, and every interpreter exit did more work
/// (435 thousand instructions of `import dtrace`'s budget, measured with callgrind).
fn hook(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    py.import("dtrace")?.getattr("_follow_children")
}

/// The socket the leases name now (from the watcher's poll, without the GIL).
pub fn want(path: Option<String>) {
    let mut follow = faults::lock(&FOLLOW);
    follow.wanted = path;
    WAITING.store(follow.wanted != follow.applied, Ordering::Release);
}

/// Whether the environment must change.
pub fn waiting() -> bool {
    WAITING.load(Ordering::Acquire)
}

/// Makes the environment name the socket the leases ask for; with the GIL,
/// in the watcher's hand-off, before the leases are acknowledged.
pub fn apply(py: Python<'_>) {
    if !waiting() {
        return;
    }
    let wanted = faults::lock(&FOLLOW).wanted.clone();
    if let Err(err) = hook(py).and_then(|hook| hook.call1((wanted.clone(),))) {
        err.write_unraisable(py, None);
    }
    let mut follow = faults::lock(&FOLLOW);
    follow.applied = wanted;
    WAITING.store(follow.wanted != follow.applied, Ordering::Release);
}

/// In a forked child: the parent's leases are not the child's (they are
/// dropped, `channel::after_fork_child`), but the environment it inherited
/// stays as it is, so that its own children report to the same tool.
pub fn after_fork_child() {
    let mut follow = faults::lock(&FOLLOW);
    follow.wanted = None;
    follow.applied = None;
    WAITING.store(false, Ordering::Release);
}
