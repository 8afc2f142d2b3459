//! Aggregation inside the process: calls, times, lines and the call tree,
//! gathered by the `sys.monitoring` callbacks and reported through probes of
//! their own (docs/decisions.md, 21).
//!
//! An attached per-event probe costs the kernel's uprobe trap, about 0.5 to
//! 1 µs, 15 to 40 Python calls' worth: a tool that counts every call through
//! `function__entry` slows call-heavy code ten times. Counting in the
//! callback instead costs an increment in the code object's cache entry
//! (and, to time or build the tree, a clock read and a per-thread stack
//! push and pop); what was gathered reaches the consumer in a few probe
//! firings per code object at each flush.
//!
//! - **Switched on by a consumer.** The mode is the set of report probes a
//!   consumer enables (`aggregate__calls` counts, `aggregate__time` also
//!   times, `aggregate__lines` counts lines, `aggregate__node` builds the tree);
//!   `arming` sets it with the events they need, and nothing of it runs
//!   while nobody wants it. When a kind is switched off, what it gathered
//!   and did not report is dropped: nobody is there to receive it.
//! - **Flushes.** Every [`FLUSH_EVERY`], when a tool asks (it writes its PID
//!   into [`pydtrace_flush_requests`] through `/proc/PID/mem`; the watcher
//!   sees it at its next poll and hands the flush to a thread with the
//!   GIL), and at exit. Each report carries what was gathered since the
//!   previous flush; `aggregate__flush(requester, dropped)` ends each flush,
//!   once per tool that asked, so a tool knows when its counts are complete.
//!   A code object freed with counts not yet reported reports them as it
//!   goes (its names are still alive then).
//! - **Memory.** Counts and line counts live in the code object's cache
//!   entry, freed with it. The call tree holds at most [`MAX_NODES`] nodes
//!   (each keeps its code object alive until the tree is dropped); calls on
//!   a new stack beyond that, and lines more than [`MAX_LINE_SPAN`] from a
//!   code object's first counted line, are counted as dropped, reported with
//!   each flush. Per-thread stacks are bounded by [`MAX_DEPTH`].
//! - **Threads.** Everything here is touched with the GIL held: the
//!   counters need no atomics. Each thread has its own stack of frames.
//! - **Fork.** A child drops what its parent gathered and had not reported
//!   (the parent reports it).

use std::cell::{Cell, UnsafeCell};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::raw::c_char;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pyo3::ffi;

use crate::faults;
use crate::probes::fire;

/// Count calls per code object (`aggregate__calls`).
pub const COUNT: u8 = 1;
/// Also time them (`aggregate__time`).
pub const TIME: u8 = 2;
/// Count lines per code object and line (`aggregate__lines`).
pub const LINES: u8 = 4;
/// Build the call tree (`aggregate__node`).
pub const TREE: u8 = 8;

/// The most call-tree nodes kept (the bpftrace flame tool keeps 65536 keys).
pub const MAX_NODES: usize = 65_000;
/// The most frames a thread's stack holds; deeper calls are not timed.
pub const MAX_DEPTH: usize = 1 << 16;
/// The widest range of lines counted per code object.
pub const MAX_LINE_SPAN: usize = 1 << 16;
/// How often the process flushes while it aggregates, unasked.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How many tools can ask for a flush at once.
pub const REQUEST_SLOTS: usize = 8;

/// What is gathered now (the bits above).
static MODE: AtomicU8 = AtomicU8::new(0);

/// What is gathered now.
#[inline(always)]
pub fn mode() -> u8 {
    MODE.load(Ordering::Relaxed)
}

/// Where tools ask for a flush: a tool writes its PID into a slot that
/// holds 0 (taking the slots under an exclusive `flock` on `/proc/PID/mem`,
/// as with the scope channel), the watcher swaps it back to 0 at its next
/// poll and the flush ends with `aggregate__flush(PID, ...)`. Exported
/// under this name so that a tool finds it in the dynamic symbol table.
#[no_mangle]
#[used]
#[allow(non_upper_case_globals)]
pub static pydtrace_flush_requests: [AtomicU32; REQUEST_SLOTS] =
    [const { AtomicU32::new(0) }; REQUEST_SLOTS];

/// A cell of state touched only with the GIL held.
struct GilCell<T>(UnsafeCell<T>);

// SAFETY: every access happens with the GIL held (see `state`).
unsafe impl<T> Sync for GilCell<T> {}

/// A multiplicative hasher for the tree's (parent, code) keys: the keys are
/// addresses and small numbers, not attacker-chosen text.
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// A node of the call tree.
struct Node {
    parent: u32,
    /// A strong reference: the names behind `counts` live as long as it.
    code: *mut ffi::PyObject,
    counts: *const CodeCounts,
    calls: u64,
    time_ns: u64,
    /// Whether it is in `Tree::dirty` (or marked for the flush under way).
    dirty: bool,
}

/// The call tree: node 0 is the root (no code).
#[derive(Default)]
struct Tree {
    nodes: Vec<Node>,
    children: HashMap<(u32, usize), u32, BuildHasherDefault<AddressHasher>>,
    dirty: Vec<u32>,
}

/// Everything gathered that is not in the code objects' entries.
struct State {
    /// Code objects with counts not yet reported (null: freed meanwhile).
    dirty: Vec<*const CodeCounts>,
    tree: Option<Tree>,
    /// Calls and lines not gathered since the last flush (a bound was reached).
    dropped: u64,
    /// Generations of timing and of the tree: a frame pushed under an older
    /// one (before its kind was switched off and on again) counts for nothing.
    time_gen: u32,
    tree_gen: u32,
    /// Bumped each time stacks are switched on (times or the tree).
    stack_epoch: u32,
}

static STATE: GilCell<State> = GilCell(UnsafeCell::new(State {
    dirty: Vec::new(),
    tree: None,
    dropped: 0,
    time_gen: 1,
    tree_gen: 1,
    stack_epoch: 1,
}));

/// # Safety
/// GIL held, and no other reference from this function alive.
#[allow(clippy::mut_from_ref)]
#[inline(always)]
unsafe fn state() -> &'static mut State {
    &mut *STATE.0.get()
}

/// The node number of a frame outside the tree: pushed while the tree was
/// not gathered (its callees hang from the root, as on a fresh start).
const NO_NODE: u32 = 0;
/// The node number of a frame whose node did not fit ([`MAX_NODES`]): its
/// callees are dropped too.
const DROPPED: u32 = u32::MAX;

/// One frame of a thread's stack.
#[derive(Clone, Copy)]
struct Frame {
    code: usize,
    node: u32,
    time_gen: u32,
    tree_gen: u32,
    start_ns: u64,
}

/// A thread's frames, and the stack epoch they belong to.
struct Stack {
    epoch: u32,
    frames: Vec<Frame>,
}

thread_local! {
    static STACK: UnsafeCell<Stack> = const {
        UnsafeCell::new(Stack { epoch: 0, frames: Vec::new() })
    };
}

/// This thread's frames; emptied when they are from before the last time
/// the stacks were switched on (a thread idle since keeps stale ones).
///
/// # Safety
/// GIL held, and no other reference from this function alive.
#[allow(clippy::mut_from_ref)]
#[inline(always)]
unsafe fn frames(state: &State) -> &'static mut Vec<Frame> {
    let stack = &mut *STACK.with(UnsafeCell::get);
    if stack.epoch != state.stack_epoch {
        stack.epoch = state.stack_epoch;
        stack.frames.clear();
    }
    &mut stack.frames
}

/// CLOCK_MONOTONIC in nanoseconds (bpftrace's `nsecs` clock).
#[inline(always)]
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What one code object gathered since the last flush, and the names its
/// reports pass. Lives in the code object's cache entry (`names`).
pub struct CodeCounts {
    filename: *const c_char,
    name: *const c_char,
    qualname: *const c_char,
    entry_line: i32,
    calls: Cell<u64>,
    time_ns: Cell<u64>,
    /// Line counts from `line_base` on.
    lines: UnsafeCell<Vec<u64>>,
    line_base: Cell<i32>,
    /// 1 + its index in `State::dirty`, 0 while it has nothing to report.
    dirty: Cell<usize>,
}

impl CodeCounts {
    /// Counts for a code object with these names (which live as long as it).
    pub fn new(
        filename: *const c_char,
        name: *const c_char,
        qualname: *const c_char,
        entry_line: i32,
    ) -> CodeCounts {
        CodeCounts {
            filename,
            name,
            qualname,
            entry_line,
            calls: Cell::new(0),
            time_ns: Cell::new(0),
            lines: UnsafeCell::new(Vec::new()),
            line_base: Cell::new(0),
            dirty: Cell::new(0),
        }
    }

    /// # Safety
    /// GIL held.
    #[inline(always)]
    unsafe fn mark_dirty(&self) {
        if self.dirty.get() == 0 {
            let state = state();
            state.dirty.push(self);
            self.dirty.set(state.dirty.len());
        }
    }

    /// Fires the reports the mode asks for and clears the counts.
    ///
    /// # Safety
    /// GIL held.
    unsafe fn report(&self, mode: u8) {
        let (calls, time_ns) = (self.calls.take(), self.time_ns.take());
        if mode & COUNT != 0 && calls > 0 {
            fire::aggregate_calls(
                self.filename,
                self.name,
                self.entry_line,
                self.qualname,
                calls as i64,
            );
        }
        if mode & TIME != 0 && (calls > 0 || time_ns > 0) {
            fire::aggregate_time(
                self.filename,
                self.name,
                self.entry_line,
                self.qualname,
                calls as i64,
                time_ns as i64,
            );
        }
        let lines = &mut *self.lines.get();
        if mode & LINES != 0 {
            let base = self.line_base.get();
            for (i, count) in lines.iter().enumerate().filter(|(_, c)| **c > 0) {
                fire::aggregate_lines(
                    self.filename,
                    self.name,
                    base + i as i32,
                    self.qualname,
                    *count as i64,
                );
            }
        }
        lines.clear();
        self.dirty.set(0);
    }

    /// The code object is being freed: what it gathered is reported now,
    /// while its names live.
    ///
    /// # Safety
    /// GIL held (code objects are freed with it).
    pub unsafe fn retire(&self) {
        let index = self.dirty.get();
        if index == 0 {
            return;
        }
        let state = state();
        if let Some(slot) = state.dirty.get_mut(index - 1) {
            *slot = std::ptr::null();
        }
        self.report(mode());
    }
}

/// A call or resume of `code`: counted, and pushed on this thread's stack
/// when times or the tree are gathered.
///
/// # Safety
/// GIL held; `code` is the live code object `counts` belongs to.
#[inline]
pub unsafe fn enter(code: *mut ffi::PyObject, counts: &CodeCounts, mode: u8) {
    if mode & (COUNT | TIME) != 0 {
        counts.calls.set(counts.calls.get() + 1);
        counts.mark_dirty();
    }
    if mode & (TIME | TREE) != 0 {
        push(code, counts, mode);
    }
}

#[inline]
unsafe fn push(code: *mut ffi::PyObject, counts: &CodeCounts, mode: u8) {
    let state = state();
    let stack = frames(state);
    if stack.len() >= MAX_DEPTH {
        return;
    }
    let node = if mode & TREE != 0 {
        let parent = match stack.last() {
            Some(top) if top.tree_gen == state.tree_gen => top.node,
            _ => NO_NODE,
        };
        child(state, parent, code, counts)
    } else {
        NO_NODE
    };
    stack.push(Frame {
        code: code as usize,
        node,
        time_gen: if mode & TIME != 0 { state.time_gen } else { 0 },
        tree_gen: state.tree_gen,
        start_ns: now_ns(),
    });
}

/// The node for a call of `code` under `parent`, counted; [`DROPPED`] when
/// the tree is full.
#[inline]
unsafe fn child(
    state: &mut State,
    parent: u32,
    code: *mut ffi::PyObject,
    counts: &CodeCounts,
) -> u32 {
    if parent == DROPPED {
        state.dropped += 1;
        return DROPPED;
    }
    let tree = state.tree.get_or_insert_with(Tree::default);
    let node = match tree.children.get(&(parent, code as usize)) {
        Some(&node) => node,
        None => {
            if tree.nodes.is_empty() {
                tree.nodes.push(Node {
                    parent: 0,
                    code: std::ptr::null_mut(),
                    counts: std::ptr::null(),
                    calls: 0,
                    time_ns: 0,
                    dirty: false,
                });
            }
            if tree.nodes.len() > MAX_NODES {
                state.dropped += 1;
                return DROPPED;
            }
            let node = tree.nodes.len() as u32;
            ffi::Py_INCREF(code);
            tree.nodes.push(Node {
                parent,
                code,
                counts,
                calls: 0,
                time_ns: 0,
                dirty: false,
            });
            tree.children.insert((parent, code as usize), node);
            node
        }
    };
    let entry = &mut tree.nodes[node as usize];
    entry.calls += 1;
    if !entry.dirty {
        entry.dirty = true;
        tree.dirty.push(node);
    }
    node
}

/// A return, yield or unwind of `code`: pops this thread's top frame if it
/// is `code`'s (a return whose entry was not seen changes nothing) and adds
/// its time.
///
/// # Safety
/// GIL held; `code` is the live code object `counts` belongs to.
#[inline]
pub unsafe fn leave(code: *mut ffi::PyObject, counts: &CodeCounts, mode: u8) {
    if mode & (TIME | TREE) == 0 {
        return;
    }
    let state = state();
    let stack = frames(state);
    let Some(top) = stack.last().copied() else {
        return;
    };
    if top.code != code as usize {
        return;
    }
    stack.pop();
    let elapsed = now_ns().saturating_sub(top.start_ns);
    if mode & TIME != 0 && top.time_gen == state.time_gen {
        counts.time_ns.set(counts.time_ns.get() + elapsed);
        counts.mark_dirty();
    }
    if mode & TREE != 0
        && top.tree_gen == state.tree_gen
        && top.node != NO_NODE
        && top.node != DROPPED
    {
        if let Some(tree) = state.tree.as_mut() {
            if let Some(node) = tree.nodes.get_mut(top.node as usize) {
                node.time_ns += elapsed;
                if !node.dirty {
                    node.dirty = true;
                    tree.dirty.push(top.node);
                }
            }
        }
    }
}

/// A line of `code` starts.
///
/// # Safety
/// GIL held.
#[inline]
pub unsafe fn line(counts: &CodeCounts, line: i32) {
    let lines = &mut *counts.lines.get();
    if lines.is_empty() {
        counts.line_base.set(line);
    }
    let base = counts.line_base.get();
    if line < base {
        let grow = (base - line) as usize;
        if lines.len() + grow > MAX_LINE_SPAN {
            state().dropped += 1;
            return;
        }
        lines.splice(0..0, std::iter::repeat_n(0, grow));
        counts.line_base.set(line);
    }
    let index = (line - counts.line_base.get()) as usize;
    if index >= lines.len() {
        if index >= MAX_LINE_SPAN {
            state().dropped += 1;
            return;
        }
        lines.resize(index + 1, 0);
    }
    lines[index] += 1;
    counts.mark_dirty();
}

/// `aggregate__flush`'s requester for the exit flush (every other flush: 0).
pub const EXIT_FLUSH: i32 = -1;

/// Reports everything gathered since the last flush, then
/// `aggregate__flush(ended, dropped)` (`ended`: 0, or [`EXIT_FLUSH`]) and
/// `aggregate__flush(PID, 0)` once per requester.
///
/// # Safety
/// GIL held.
pub unsafe fn flush(ended: i32, requesters: &[u32]) {
    let mode = mode();
    let state = state();
    if mode != 0 {
        let dirty = std::mem::take(&mut state.dirty);
        for &counts in &dirty {
            if !counts.is_null() {
                (*counts).report(mode);
            }
        }
        // Reports run no Python: nothing was added meanwhile; the capacity is kept.
        let mut dirty = dirty;
        dirty.clear();
        state.dirty = dirty;
        if let Some(tree) = state.tree.as_mut() {
            report_tree(tree);
        }
    }
    let dropped = std::mem::take(&mut state.dropped) as i64;
    fire::aggregate_flush(ended, dropped);
    for &pid in requesters {
        fire::aggregate_flush(pid as i32, 0);
    }
}

/// Fires `aggregate__node` for every node with something new, and for their
/// ancestors (so that a consumer that attached later sees every path).
unsafe fn report_tree(tree: &mut Tree) {
    let mut marked = std::mem::take(&mut tree.dirty);
    let mut i = 0;
    while i < marked.len() {
        let parent = tree.nodes[marked[i] as usize].parent;
        if parent != 0 && !tree.nodes[parent as usize].dirty {
            tree.nodes[parent as usize].dirty = true;
            marked.push(parent);
        }
        i += 1;
    }
    for &id in &marked {
        let node = &mut tree.nodes[id as usize];
        let counts = &*node.counts;
        fire::aggregate_node(
            i64::from(id),
            i64::from(node.parent),
            counts.filename,
            counts.qualname,
            std::mem::take(&mut node.calls) as i64,
            std::mem::take(&mut node.time_ns) as i64,
        );
        node.dirty = false;
    }
    marked.clear();
    tree.dirty = marked;
}

/// Switches to gathering `new` (from `arming`, with the GIL). A kind
/// switched off drops what it gathered and did not report; a kind switched
/// on starts from nothing (frames already on a stack are not timed, and
/// their callees hang from the root).
pub fn set_mode(_py: pyo3::Python<'_>, new: u8) {
    let old = mode();
    if old == new {
        return;
    }
    // SAFETY: GIL held (`_py`).
    let state = unsafe { state() };
    if new & TIME != 0 && old & TIME == 0 {
        state.time_gen = state.time_gen.wrapping_add(1).max(1);
    }
    if new & TREE != 0 && old & TREE == 0 {
        state.tree_gen = state.tree_gen.wrapping_add(1).max(1);
    }
    if new & (TIME | TREE) != 0 && old & (TIME | TREE) == 0 {
        state.stack_epoch = state.stack_epoch.wrapping_add(1).max(1);
    }
    let counted = COUNT | TIME | LINES;
    if new & counted == 0 && old & counted != 0 {
        // SAFETY: GIL held; the entries are alive (a freed one nulled its slot).
        unsafe { discard_counts(state) };
    }
    let dropped_tree = if new & TREE == 0 {
        state.tree.take()
    } else {
        None
    };
    if new == 0 {
        state.dropped = 0;
    }
    if old == 0 {
        // The first periodic flush comes a period after gathering starts.
        let mut pending = faults::lock(&PENDING);
        pending.last = None;
        pending.due = false;
    }
    MODE.store(new, Ordering::Relaxed);
    // Last: releasing code objects may free them, which reaches `retire`.
    drop_tree(dropped_tree);
}

/// Zeroes every code object's unreported counts.
unsafe fn discard_counts(state: &mut State) {
    for counts in std::mem::take(&mut state.dirty) {
        if !counts.is_null() {
            let counts = &*counts;
            counts.calls.set(0);
            counts.time_ns.set(0);
            (*counts.lines.get()).clear();
            counts.dirty.set(0);
        }
    }
}

/// Releases the tree's references to code objects (GIL held).
fn drop_tree(tree: Option<Tree>) {
    if let Some(tree) = tree {
        for node in tree.nodes {
            if !node.code.is_null() {
                // SAFETY: GIL held by the callers; the node owned this reference.
                unsafe { ffi::Py_DECREF(node.code) };
            }
        }
    }
}

/// In a forked child: what the parent gathered is the parent's to report.
pub fn after_fork_child() {
    // SAFETY: after-fork hooks run with the GIL.
    let state = unsafe { state() };
    unsafe { discard_counts(state) };
    if let Some(tree) = state.tree.as_mut() {
        for node in &mut tree.nodes {
            node.calls = 0;
            node.time_ns = 0;
            node.dirty = false;
        }
        tree.dirty.clear();
    }
    state.dropped = 0;
    state.time_gen = state.time_gen.wrapping_add(1).max(1);
    state.tree_gen = state.tree_gen.wrapping_add(1).max(1);
    state.stack_epoch = state.stack_epoch.wrapping_add(1).max(1);
    *faults::lock(&PENDING) = Pending::new();
}

// --- flush requests: the watcher's side ------------------------------------------------

/// Flushes waiting for a thread with the GIL.
struct Pending {
    requesters: Vec<u32>,
    due: bool,
    last: Option<Instant>,
}

impl Pending {
    const fn new() -> Pending {
        Pending {
            requesters: Vec::new(),
            due: false,
            last: None,
        }
    }
}

static PENDING: Mutex<Pending> = Mutex::new(Pending::new());

/// One poll of the watcher, without the GIL: takes the tools' requests and
/// sees whether the periodic flush is due; true when a flush waits for the
/// GIL. A request while nothing is gathered is answered at once, from this
/// thread, with an empty flush (`aggregate__flush(PID, 0)`).
pub fn poll() -> bool {
    let mut requesters = Vec::new();
    for slot in &pydtrace_flush_requests {
        if slot.load(Ordering::Relaxed) != 0 {
            let pid = slot.swap(0, Ordering::AcqRel);
            if pid != 0 && !requesters.contains(&pid) {
                requesters.push(pid);
            }
        }
    }
    let gathering = mode() != 0;
    if !gathering && requesters.is_empty() {
        return false; // idle: a few loads, no lock
    }
    let mut pending = faults::lock(&PENDING);
    if !gathering {
        pending.due = false;
        let waiting = std::mem::take(&mut pending.requesters);
        drop(pending);
        for pid in waiting.into_iter().chain(requesters) {
            fire::aggregate_flush(pid as i32, 0);
        }
        return false;
    }
    let now = Instant::now();
    let last = *pending.last.get_or_insert(now);
    if now.duration_since(last) >= FLUSH_EVERY {
        pending.due = true;
    }
    for pid in requesters {
        if !pending.requesters.contains(&pid) {
            pending.requesters.push(pid);
        }
    }
    pending.due || !pending.requesters.is_empty()
}

/// Runs the flush the watcher found due, if any (with the GIL).
pub fn flush_pending(_py: pyo3::Python<'_>) {
    let requesters = {
        let mut pending = faults::lock(&PENDING);
        if !pending.due && pending.requesters.is_empty() {
            return;
        }
        pending.due = false;
        pending.last = Some(Instant::now());
        std::mem::take(&mut pending.requesters)
    };
    // SAFETY: GIL held (`_py`).
    unsafe { flush(0, &requesters) };
}

/// At exit: the last flush, so that nothing gathered is lost.
pub fn at_exit(_py: pyo3::Python<'_>) {
    if mode() != 0 {
        let requesters = std::mem::take(&mut faults::lock(&PENDING).requesters);
        // SAFETY: GIL held (`_py`).
        unsafe { flush(EXIT_FLUSH, &requesters) };
    }
}

/// (mode, code objects with unreported counts, tree nodes), for tests.
pub fn stats(_py: pyo3::Python<'_>) -> (u8, usize, usize) {
    // SAFETY: GIL held (`_py`).
    let state = unsafe { state() };
    let live = state.dirty.iter().filter(|c| !c.is_null()).count();
    let nodes = state
        .tree
        .as_ref()
        .map_or(0, |t| t.nodes.len().saturating_sub(1));
    (mode(), live, nodes)
}
