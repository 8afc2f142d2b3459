//! The channel through which a tool sets the scope of a running process.
//!
//! It is a buffer in the probe object's own writable data, exported as the
//! dynamic symbol `pydtrace_scope_channel`: a tool finds it through the ELF
//! dynamic symbols of the object named in `/proc/PID/maps`, and reads and
//! writes it through `/proc/PID/mem`. Opening that file for writing needs
//! ptrace access to the process (`PTRACE_MODE_ATTACH`: root, or the same
//! user where the Yama policy allows it), no less than attaching uprobes to
//! it. There is no socket, no file and no other way in (docs/scope.md has
//! the whole argument).
//!
//! Layout (version 1, native byte order, every field naturally aligned; the
//! tool side is `python/dtrace/tools/proc/scope.py`):
//!
//! | offset | field | written by |
//! |---|---|---|
//! | 0 | magic `"pydtrace:scope\0\0"` (16 bytes) | build |
//! | 16 | version (u32), slots (u32), slot size (u32), slot text capacity (u32) | build |
//! | 32 | doorbell (u32): a tool adds 1 after writing its slot | tools |
//! | 36 | generation (u32): the scope generation in force | process |
//! | 40 | published sequence (u32): odd while the process writes what follows | process |
//! | 44 | published length (u32) | process |
//! | 48 | the PID of the process whose watcher thread runs (u32; 0, or a parent's after a fork: not armed) | process |
//! | 56 | the tools whose leases make the scope in force (4 u32 PIDs, 0 for none) | process |
//! | 72 | the scope in force as text (`module:NAME` / `file:GLOB` lines), 4096 bytes | process |
//! | 4168 | the slots (4) | |
//!
//! A slot (1328 bytes): lease PID (u32), request number (u32), the lease
//! holder's start time (u64, clock ticks after boot, field 22 of
//! `/proc/PID/stat`), text length (u32), reserved (u32), the scope's text
//! (1024 bytes); then, written by the process, the acknowledgement: PID
//! (u32), request number (u32), FNV-1a hash of the text it read (u64),
//! status (u32: 0 in force, 1 refused), message length (u32) and message
//! (256 bytes).
//!
//! Protocol: a tool takes a free slot (lease PID 0) while holding an
//! exclusive `flock` on `/proc/PID/mem` (which only a process with ptrace
//! access can open, so tools never race for a slot), writes the text, its
//! start time and its PID, bumps the request number and rings the doorbell.
//! The watcher thread sees the doorbell at its next poll, checks the lease
//! (the PID runs and started when the slot says), parses the text without
//! the GIL, and hands the new scope to the main thread; once the scope is in
//! force it writes the acknowledgement. To leave, the tool writes lease PID
//! 0, bumps the request number, rings, and waits for the acknowledgement.
//! A tool that dies without leaving is noticed by the watcher (a pidfd of
//! the lease holder becomes readable; elsewhere, its start time changes),
//! which drops the lease and frees the slot.
//!
//! While leases are held the scope in force is the union of their scopes;
//! without any, it is the base scope (`PYDTRACE_SCOPE`).
//!
//! A lease's text may also name probes, one `probe:NAME` line each: the
//! process fires them while the lease is held, whatever the semaphores say.
//! The tools ask for their probes this way where they attach to the probe
//! sites by address rather than as USDT probes (an interpreter that declares
//! the same probes itself: `interpreter`), which raises no semaphore. A lease
//! may name probes, a scope, or both; it is acknowledged once both are in
//! force (the probes armed).
//!
//! A lease may also name a Unix socket, one `follow:PATH` line: while it
//! is held, the processes this one starts report to that tool (`-p PID
//! --children`, see `follow`). One lease at a time may: another is refused.
//!
//! This module reads the slots and writes the answers; it reads a lease's
//! text with `grammar`, tells `follow` which socket the leases name, and
//! reaches down to `probes` and `faults` otherwise. What a poll finds is a
//! [`Proposal`] that the watcher hands, with the probes it wants armed, to a
//! thread with the GIL, which puts the scope in force (`scope`), publishes
//! it here ([`publish`]) and acknowledges the leases ([`acknowledge`]).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::faults;
use crate::grammar::{Lease, Scope, ScopeError};
use crate::probes::ProbeSet;

pub const SLOTS: usize = 4;
pub const SLOT_TEXT: usize = 1024;
pub const MESSAGE_TEXT: usize = 256;
pub const PUBLISHED_TEXT: usize = 4096;
pub const MAGIC: [u8; 16] = *b"pydtrace:scope\0\0";
pub const VERSION: u32 = 1;

/// Acknowledgement status: the scope is in force.
const STATUS_IN_FORCE: u32 = 0;
/// Acknowledgement status: the lease is refused (the message says why).
const STATUS_REFUSED: u32 = 1;

/// One tool's lease and request, and the process's answer.
#[repr(C)]
pub struct Slot {
    lease_pid: AtomicU32,
    request: AtomicU32,
    lease_start: AtomicU64,
    text_len: AtomicU32,
    _reserved: AtomicU32,
    text: [AtomicU8; SLOT_TEXT],
    ack_pid: AtomicU32,
    ack_request: AtomicU32,
    ack_hash: AtomicU64,
    ack_status: AtomicU32,
    ack_message_len: AtomicU32,
    ack_message: [AtomicU8; MESSAGE_TEXT],
}

/// The channel (see the module documentation for the layout).
#[repr(C)]
pub struct Channel {
    magic: [u8; 16],
    version: u32,
    slot_count: u32,
    slot_size: u32,
    slot_text: u32,
    doorbell: AtomicU32,
    generation: AtomicU32,
    published_seq: AtomicU32,
    published_len: AtomicU32,
    watcher_pid: AtomicU32,
    _reserved: u32,
    published_tools: [AtomicU32; SLOTS],
    published: [AtomicU8; PUBLISHED_TEXT],
    slots: [Slot; SLOTS],
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            lease_pid: AtomicU32::new(0),
            request: AtomicU32::new(0),
            lease_start: AtomicU64::new(0),
            text_len: AtomicU32::new(0),
            _reserved: AtomicU32::new(0),
            text: [const { AtomicU8::new(0) }; SLOT_TEXT],
            ack_pid: AtomicU32::new(0),
            ack_request: AtomicU32::new(0),
            ack_hash: AtomicU64::new(0),
            ack_status: AtomicU32::new(0),
            ack_message_len: AtomicU32::new(0),
            ack_message: [const { AtomicU8::new(0) }; MESSAGE_TEXT],
        }
    }
}

/// The channel itself. Exported under this name so that a tool finds it in
/// the object's dynamic symbol table; in writable data (it has atomics).
#[no_mangle]
#[used]
#[allow(non_upper_case_globals)]
pub static pydtrace_scope_channel: Channel = Channel {
    magic: MAGIC,
    version: VERSION,
    slot_count: SLOTS as u32,
    slot_size: std::mem::size_of::<Slot>() as u32,
    slot_text: SLOT_TEXT as u32,
    doorbell: AtomicU32::new(0),
    generation: AtomicU32::new(0),
    published_seq: AtomicU32::new(0),
    published_len: AtomicU32::new(0),
    watcher_pid: AtomicU32::new(0),
    _reserved: 0,
    published_tools: [const { AtomicU32::new(0) }; SLOTS],
    published: [const { AtomicU8::new(0) }; PUBLISHED_TEXT],
    slots: [const { Slot::new() }; SLOTS],
};

// The layout the tools read (python/dtrace/tools/proc/scope.py) and docs/scope.md describe.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(offset_of!(Channel, version) == 16);
    assert!(offset_of!(Channel, doorbell) == 32);
    assert!(offset_of!(Channel, generation) == 36);
    assert!(offset_of!(Channel, published_seq) == 40);
    assert!(offset_of!(Channel, published_len) == 44);
    assert!(offset_of!(Channel, watcher_pid) == 48);
    assert!(offset_of!(Channel, published_tools) == 56);
    assert!(offset_of!(Channel, published) == 72);
    assert!(offset_of!(Channel, slots) == 4168);
    assert!(size_of::<Slot>() == 1328);
    assert!(offset_of!(Slot, lease_start) == 8);
    assert!(offset_of!(Slot, text_len) == 16);
    assert!(offset_of!(Slot, text) == 24);
    assert!(offset_of!(Slot, ack_pid) == 1048);
    assert!(offset_of!(Slot, ack_hash) == 1056);
    assert!(offset_of!(Slot, ack_status) == 1064);
    assert!(offset_of!(Slot, ack_message_len) == 1068);
    assert!(offset_of!(Slot, ack_message) == 1072);
};

fn channel() -> &'static Channel {
    &pydtrace_scope_channel
}

/// The layout, for the tests that check the tool side against it.
pub fn layout() -> Vec<(&'static str, usize)> {
    use std::mem::{offset_of, size_of};
    vec![
        ("size", size_of::<Channel>()),
        ("doorbell", offset_of!(Channel, doorbell)),
        ("generation", offset_of!(Channel, generation)),
        ("published_seq", offset_of!(Channel, published_seq)),
        ("published_len", offset_of!(Channel, published_len)),
        ("watcher_pid", offset_of!(Channel, watcher_pid)),
        ("published_tools", offset_of!(Channel, published_tools)),
        ("published", offset_of!(Channel, published)),
        ("slots", offset_of!(Channel, slots)),
        ("slot_size", size_of::<Slot>()),
        ("slot_request", offset_of!(Slot, request)),
        ("slot_lease_start", offset_of!(Slot, lease_start)),
        ("slot_text_len", offset_of!(Slot, text_len)),
        ("slot_text", offset_of!(Slot, text)),
        ("slot_ack_pid", offset_of!(Slot, ack_pid)),
        ("slot_ack_request", offset_of!(Slot, ack_request)),
        ("slot_ack_hash", offset_of!(Slot, ack_hash)),
        ("slot_ack_status", offset_of!(Slot, ack_status)),
        ("slot_ack_message_len", offset_of!(Slot, ack_message_len)),
        ("slot_ack_message", offset_of!(Slot, ack_message)),
        ("slot_text_capacity", SLOT_TEXT),
        ("message_capacity", MESSAGE_TEXT),
        ("published_capacity", PUBLISHED_TEXT),
        ("slot_count", SLOTS),
    ]
}

/// FNV-1a, 64 bits: the acknowledgement proves which text was read.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn read_bytes(cells: &[AtomicU8], len: usize) -> Vec<u8> {
    cells[..len.min(cells.len())]
        .iter()
        .map(|b| b.load(Ordering::Relaxed))
        .collect()
}

/// Writes `bytes` (cut to fit) into `cells`; returns how many were written.
fn write_bytes(cells: &[AtomicU8], bytes: &[u8]) -> usize {
    let len = bytes.len().min(cells.len());
    for (cell, &b) in cells.iter().zip(&bytes[..len]) {
        cell.store(b, Ordering::Relaxed);
    }
    len
}

// --- the watcher's side --------------------------------------------------------

/// A slot the watcher has read: whose it is, its request, and what came of it.
struct Tracked {
    pid: u32,
    request: u32,
    holder: Holder,
    /// What the lease asks for; `None` when it was refused (kept so that the
    /// slot is freed when its holder dies without clearing it).
    asked: Option<Lease>,
}

/// What the watcher knows about the slots.
struct Watch {
    slots: [Option<Tracked>; SLOTS],
}

static WATCH: Mutex<Watch> = Mutex::new(Watch {
    slots: [const { None }; SLOTS],
});
/// The last doorbell the watcher answered.
static SEEN_DOORBELL: AtomicU32 = AtomicU32::new(0);
/// Whether any slot is tracked (then every poll checks its holder).
static TRACKING: AtomicBool = AtomicBool::new(false);
/// Whether a lease with a scope is in force (accepted and not dropped).
static LEASES: AtomicBool = AtomicBool::new(false);
/// The probes the leases in force ask for (bits of a [`ProbeSet`]).
static LEASED_PROBES: AtomicU32 = AtomicU32::new(0);

fn watch() -> MutexGuard<'static, Watch> {
    faults::lock(&WATCH)
}

/// Whether any tool's lease with a scope is in force.
pub fn leases_held() -> bool {
    LEASES.load(Ordering::Acquire)
}

/// The probes that tools' leases ask for: fired whatever the semaphores say.
pub fn leased_probes() -> ProbeSet {
    ProbeSet::from_bits(LEASED_PROBES.load(Ordering::Acquire))
}

/// A lease to acknowledge once its change is in force.
pub struct Ack {
    slot: usize,
    pid: u32,
    request: u32,
    hash: u64,
}

/// Writes `ack`'s slot's acknowledgement: status and message first, the
/// request number last (the tool waits for its PID and request).
fn write_ack(ack: &Ack, status: u32, message: &str) {
    let slot = &channel().slots[ack.slot];
    slot.ack_status.store(status, Ordering::Relaxed);
    let len = write_bytes(&slot.ack_message, message.as_bytes());
    slot.ack_message_len.store(len as u32, Ordering::Relaxed);
    slot.ack_hash.store(ack.hash, Ordering::Relaxed);
    slot.ack_pid.store(ack.pid, Ordering::Release);
    slot.ack_request.store(ack.request, Ordering::Release);
}

/// Acknowledges leases whose change is in force now (with the GIL, from the watcher's hand-off).
pub fn acknowledge(acks: &[Ack]) {
    for ack in acks {
        write_ack(ack, STATUS_IN_FORCE, "");
    }
}

/// Says in the channel whether this process's watcher runs (its PID) or not (0):
/// a tool refuses at once to lease a scope that nobody would put in force.
pub fn set_watcher_running(running: bool) {
    let pid = if running { std::process::id() } else { 0 };
    channel().watcher_pid.store(pid, Ordering::Release);
}

/// Publishes the scope in force, for tools to read (`dtrace list`, and a
/// tool that warns about another's scope).
pub fn publish(scope: Option<&Scope>, tools: &[u32], generation: u32) {
    let channel = channel();
    let seq = channel.published_seq.load(Ordering::Relaxed);
    let odd = seq.wrapping_add(1) | 1;
    channel.published_seq.store(odd, Ordering::Release);
    std::sync::atomic::fence(Ordering::Release);
    let text = scope.map(Scope::text).unwrap_or_default();
    let len = write_bytes(&channel.published, text.as_bytes());
    channel.published_len.store(len as u32, Ordering::Relaxed);
    for (i, cell) in channel.published_tools.iter().enumerate() {
        cell.store(tools.get(i).copied().unwrap_or(0), Ordering::Relaxed);
    }
    channel.generation.store(generation, Ordering::Relaxed);
    channel
        .published_seq
        .store(odd.wrapping_add(1), Ordering::Release);
}

/// The scope the leases make, for the process to put in force.
pub enum Leased {
    /// No lease sets a scope: the base scope (`PYDTRACE_SCOPE`) is back.
    Base,
    /// The union of the leases' scopes, and the tools whose leases make it.
    Scope(Arc<Scope>, Vec<u32>),
}

/// What a poll found for the process to do with the GIL: the watcher hands
/// it over with the probes it wants armed.
#[derive(Default)]
pub struct Proposal {
    /// The scope to put in force, when it changes.
    pub change: Option<Leased>,
    /// Leases to acknowledge once the change is in force (and the probes armed).
    pub acks: Vec<Ack>,
    /// A malformed scope to warn about (once per process).
    pub warning: Option<String>,
}

impl Proposal {
    /// Adds a later proposal to one not applied yet: its change and warning
    /// replace the earlier ones, its acknowledgements come after theirs.
    pub fn merge(&mut self, later: Proposal) {
        if later.change.is_some() {
            self.change = later.change;
        }
        self.acks.extend(later.acks);
        if later.warning.is_some() {
            self.warning = later.warning;
        }
    }
}

/// One poll of the watcher thread, without the GIL: reads the doorbell, and
/// when it rang, the slots; checks that the holders of tracked slots still
/// run. When the scope in force must change (or a lease be acknowledged, or
/// a refusal be warned about), returns what to apply with the GIL. Costs two
/// loads while no tool has rung and no slot is tracked.
pub fn poll() -> Option<Proposal> {
    let bell = channel().doorbell.load(Ordering::Acquire);
    let rang = bell != SEEN_DOORBELL.load(Ordering::Relaxed);
    if !rang && !TRACKING.load(Ordering::Relaxed) {
        return None;
    }
    SEEN_DOORBELL.store(bell, Ordering::Relaxed);
    let mut watch = watch();
    let mut changed = false;
    let mut acks = Vec::new();
    let mut warning = None;
    for index in 0..SLOTS {
        let slot = &channel().slots[index];
        let pid = slot.lease_pid.load(Ordering::Acquire);
        let request = slot.request.load(Ordering::Acquire);
        if let Some(tracked) = &watch.slots[index] {
            if tracked.pid == pid && tracked.request == request {
                if !tracked.holder.runs() {
                    // The holder died without leaving: free the slot.
                    changed |= tracked.asked.is_some();
                    slot.lease_pid.store(0, Ordering::Release);
                    watch.slots[index] = None;
                }
                continue;
            }
        }
        if !rang {
            continue; // a changed slot is read when its tool rings
        }
        let old = watch.slots[index].take();
        let had_request = old.as_ref().is_some_and(|t| t.asked.is_some());
        if pid == 0 {
            if old.is_some() {
                // Released: acknowledged once the scope without it is in force.
                let ack = Ack {
                    slot: index,
                    pid: 0,
                    request,
                    hash: 0,
                };
                if had_request {
                    acks.push(ack);
                    changed = true;
                } else {
                    acknowledge(&[ack]);
                }
            }
            continue;
        }
        changed |= had_request;
        let Some((text, hash)) = read_slot_text(slot, request) else {
            continue; // being written: read at the next ring (the tool rings again)
        };
        let ack = Ack {
            slot: index,
            pid,
            request,
            hash,
        };
        let start = slot.lease_start.load(Ordering::Relaxed);
        let holder = match Holder::check(pid, start) {
            Ok(holder) => holder,
            Err((why, gone)) => {
                write_ack(&ack, STATUS_REFUSED, &why);
                if gone {
                    slot.lease_pid.store(0, Ordering::Release); // nobody will release it
                }
                continue;
            }
        };
        // A refused scope is tracked too, so that the slot is freed if its
        // tool dies without clearing it.
        let accepted = match text
            .and_then(|text| Lease::parse(&text))
            .and_then(|lease| one_follower(&watch, index, lease))
        {
            Ok(accepted) => {
                acks.push(ack);
                changed = true;
                Some(accepted)
            }
            Err(err) => {
                write_ack(&ack, STATUS_REFUSED, &format!("refused: {err}"));
                if !matches!(err, ScopeError::Follow(_)) {
                    // (Two tools that both follow children is the tools' business, not the program's.)
                    warning = Some(format!("the scope from tool {pid}: {err}"));
                }
                None
            }
        };
        watch.slots[index] = Some(Tracked {
            pid,
            request,
            holder,
            asked: accepted,
        });
    }
    TRACKING.store(watch.slots.iter().any(Option::is_some), Ordering::Relaxed);
    let requests = || {
        watch
            .slots
            .iter()
            .flatten()
            .filter_map(|t| t.asked.as_ref())
    };
    LEASES.store(requests().any(|r| r.scope.is_some()), Ordering::Release);
    let probes = requests().fold(ProbeSet::EMPTY, |set, r| set.union(r.probes));
    LEASED_PROBES.store(probes.bits(), Ordering::Release);
    crate::follow::want(requests().find_map(|r| r.follow.clone()));
    if changed || warning.is_some() || !acks.is_empty() {
        let change = changed.then(|| effective(&watch));
        return Some(Proposal {
            change,
            acks,
            warning,
        });
    }
    None
}

/// The scope the leases make (their union), or the base scope without any.
fn effective(watch: &Watch) -> Leased {
    let mut union: Option<Scope> = None;
    let mut tools = Vec::new();
    for tracked in watch.slots.iter().flatten() {
        if let Some(scope) = tracked.asked.as_ref().and_then(|r| r.scope.as_ref()) {
            union = Some(match union {
                None => (**scope).clone(),
                Some(u) => u.union(scope),
            });
            tools.push(tracked.pid);
        }
    }
    match union {
        Some(scope) => Leased::Scope(Arc::new(scope), tools),
        None => Leased::Base,
    }
}

/// A slot's text and its hash, read consistently (the request number did
/// not change meanwhile); `None` while a tool is writing it.
fn read_slot_text(slot: &Slot, request: u32) -> Option<(Result<String, ScopeError>, u64)> {
    let len = slot.text_len.load(Ordering::Acquire) as usize;
    if len > SLOT_TEXT {
        return Some((
            Err(ScopeError::TooLong {
                len,
                limit: SLOT_TEXT,
            }),
            0,
        ));
    }
    let bytes = read_bytes(&slot.text, len);
    std::sync::atomic::fence(Ordering::Acquire);
    if slot.request.load(Ordering::Acquire) != request {
        return None;
    }
    let hash = fnv1a(&bytes);
    let text = String::from_utf8(bytes).map_err(|_| ScopeError::NotUtf8);
    Some((text, hash))
}

/// `request`, unless it names a socket while another slot's lease does: the
/// environment names one socket, so one tool at a time follows children.
fn one_follower(watch: &Watch, index: usize, request: Lease) -> Result<Lease, ScopeError> {
    if request.follow.is_none() {
        return Ok(request);
    }
    let other = watch.slots.iter().enumerate().find_map(|(i, tracked)| {
        // A follower that died since the last poll is not one: its slot is freed in this poll.
        let tracked = tracked
            .as_ref()
            .filter(|tracked| i != index && tracked.holder.runs())?;
        tracked.asked.as_ref()?.follow.as_ref().map(|_| tracked.pid)
    });
    match other {
        Some(pid) => Err(ScopeError::Follow(format!(
            "tool {pid} follows the children of this process already (one tool at a time)"
        ))),
        None => Ok(request),
    }
}

/// A forked child does not inherit its parent's leases (the tools leased
/// the parent): the slots are freed and the base scope comes back at the
/// child's first poll: returns the change to hand over when the parent's
/// leases set a scope or asked for probes. Called in the child, before its
/// watcher starts.
pub fn after_fork_child() -> Option<Proposal> {
    let mut watch = watch();
    let mut had_lease = false;
    for (index, tracked) in watch.slots.iter_mut().enumerate() {
        if let Some(tracked) = tracked.take() {
            had_lease |= tracked.asked.is_some();
            channel().slots[index].lease_pid.store(0, Ordering::Release);
        }
    }
    TRACKING.store(false, Ordering::Relaxed);
    LEASES.store(false, Ordering::Release);
    LEASED_PROBES.store(0, Ordering::Release);
    crate::follow::after_fork_child();
    SEEN_DOORBELL.store(
        channel().doorbell.load(Ordering::Acquire),
        Ordering::Relaxed,
    );
    had_lease.then(|| Proposal {
        change: Some(Leased::Base),
        ..Proposal::default()
    })
}

// --- the lease holder -----------------------------------------------------------

/// The process that holds a lease, watched for its end.
struct Holder {
    pid: u32,
    start: u64,
    /// A pidfd (Linux 5.3+): readable once the process has ended.
    #[cfg(target_os = "linux")]
    pidfd: Option<std::os::fd::OwnedFd>,
}

impl Holder {
    /// The holder of a new lease: PID `pid` must run and have started at
    /// `start` (so that a PID reused since the tool wrote it is not taken
    /// for the tool). On refusal, the reason and whether the PID has gone.
    fn check(pid: u32, start: u64) -> Result<Holder, (String, bool)> {
        #[cfg(target_os = "linux")]
        let pidfd = {
            // SAFETY: a plain system call; a non-negative result is a new descriptor we own.
            let fd = unsafe {
                libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0 as libc::c_long)
            };
            if fd >= 0 {
                use std::os::fd::FromRawFd;
                // SAFETY: `fd` is a new descriptor, owned by nobody else.
                Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
            } else {
                None
            }
        };
        let holder = Holder {
            pid,
            start,
            #[cfg(target_os = "linux")]
            pidfd,
        };
        match start_time(pid) {
            None => Err((
                format!("refused: the lease holder, process {pid}, does not run"),
                true,
            )),
            Some(actual) if start != 0 && actual != 0 && actual != start => Err((
                format!(
                    "refused: process {pid} is not the lease holder (it started at {actual}, \
                     the lease says {start})"
                ),
                false,
            )),
            Some(_) => Ok(holder),
        }
    }

    /// Whether the holder still runs.
    fn runs(&self) -> bool {
        #[cfg(target_os = "linux")]
        if let Some(fd) = &self.pidfd {
            use std::os::fd::AsRawFd;
            let mut poll = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; a zero timeout does not block.
            let ready = unsafe { libc::poll(&mut poll, 1, 0) };
            return ready == 0;
        }
        start_time(self.pid)
            .is_some_and(|actual| actual == 0 || self.start == 0 || actual == self.start)
    }
}

/// When process `pid` started (clock ticks after boot), if it runs.
#[cfg(target_os = "linux")]
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 is the command in parentheses (which may hold spaces and
    // parentheses); field 22, the start time, is the 20th after it.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let state = fields.first()?;
    if *state == "Z" || *state == "X" {
        return None; // a zombie has ended
    }
    fields.get(19)?.parse().ok()
}

/// Elsewhere: whether `pid` runs (start times are not compared).
#[cfg(not(target_os = "linux"))]
fn start_time(pid: u32) -> Option<u64> {
    // SAFETY: signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    alive.then_some(0)
}
