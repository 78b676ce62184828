//! The counters: each worker writes its own 128-byte block of atomics, alone,
//! with a plain load and store; the scrape thread only reads. That there is
//! one writer is in the types: a handle is taken once, `Send`, not `Sync`
//! (`docs/metrics.md`, "Counting").

use std::cell::Cell;
use std::io;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::network::io::CloseReason;
use crate::policy::Refusal;

/// A failed `accept(2)` (`xps_accept_errors_total`'s `error` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AcceptError {
    /// The process is out of file descriptors.
    Emfile,
    /// The system is out of file descriptors.
    Enfile,
    /// Out of socket buffers.
    Enobufs,
    /// Out of memory.
    Enomem,
    /// Anything else (ECONNABORTED, EPERM, network errors …).
    Other,
}

impl AcceptError {
    /// Every kind, in the order the exposition lists them.
    pub const ALL: [AcceptError; 5] = [
        AcceptError::Emfile,
        AcceptError::Enfile,
        AcceptError::Enobufs,
        AcceptError::Enomem,
        AcceptError::Other,
    ];

    /// The kind of an accept error. Call it for real failures only, not
    /// for `WouldBlock` (the backlog is empty) or `Interrupted`.
    pub fn from_io(e: &io::Error) -> AcceptError {
        match e.raw_os_error() {
            Some(libc::EMFILE) => AcceptError::Emfile,
            Some(libc::ENFILE) => AcceptError::Enfile,
            Some(libc::ENOBUFS) => AcceptError::Enobufs,
            Some(libc::ENOMEM) => AcceptError::Enomem,
            _ => AcceptError::Other,
        }
    }

    /// The label value: `EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`, `other`.
    pub fn label(self) -> &'static str {
        match self {
            AcceptError::Emfile => "EMFILE",
            AcceptError::Enfile => "ENFILE",
            AcceptError::Enobufs => "ENOBUFS",
            AcceptError::Enomem => "ENOMEM",
            AcceptError::Other => "other",
        }
    }
}

/// A counter with one writer. `add` is a load and a store, not a locked
/// read-modify-write; it is exact only because the handles that reach it
/// (`WorkerMetrics`, `ListenerCounter`) are unique and not `Sync`.
#[derive(Debug, Default)]
pub(super) struct Single(AtomicU64);

impl Single {
    #[inline]
    fn add(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }

    #[inline]
    fn set(&self, n: u64) {
        if self.0.load(Ordering::Relaxed) != n {
            self.0.store(n, Ordering::Relaxed);
        }
    }

    #[inline]
    fn sub(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_sub(n), Ordering::Relaxed);
    }

    pub(super) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Whether the one handle on a block exists. Taken when the handle is made,
/// given back when it drops; the pair orders the counts between holders.
#[derive(Debug, Default)]
struct Claim(AtomicBool);

impl Claim {
    /// Takes the claim if it is free. Acquire: the new holder sees the last
    /// count the previous one stored before it adds to it.
    fn take(&self) -> bool {
        self.0
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Gives the claim back. Release: pairs with [`Claim::take`].
    fn give_back(&self) {
        self.0.store(false, Ordering::Release);
    }
}

/// One worker's counters, on cache lines no other worker writes.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(super) struct WorkerBlock {
    /// A [`WorkerMetrics`] handle exists for this block.
    taken: Claim,
    /// Connections accepted and not yet closed or refused.
    pub(super) open: Single,
    /// By [`CloseReason::index`].
    pub(super) closed: [Single; CloseReason::LABELS.len()],
    /// By [`Refusal::index`].
    pub(super) refused: [Single; Refusal::LABELS.len()],
    /// Replies queued.
    pub(super) lines: Single,
    /// Bytes read from clients, after any PROXY header (not the client's).
    pub(super) received: Single,
    /// Bytes written to clients.
    pub(super) sent: Single,
    /// By [`AcceptError`] as index.
    pub(super) accept_errors: [Single; AcceptError::ALL.len()],
    /// Times reading paused at the high-water mark.
    pub(super) flow_pauses: Single,
    /// Access-log lines this worker dropped.
    pub(super) access_log_dropped: Single,
    /// Connections holding bytes (an unterminated line or unsent replies)
    /// at the end of the last turn: `/api`'s `req_current`.
    pub(super) holding: Single,
}

/// One listener's accept count (per worker), on its own cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(super) struct ListenerCell {
    pub(super) accepted: Single,
    /// A [`ListenerCounter`] handle exists for this cell.
    in_use: Claim,
}

/// A registered listener counter: the label and the cell.
#[derive(Debug)]
pub(super) struct ListenerEntry {
    pub(super) addr: Box<str>,
    pub(super) cell: Arc<ListenerCell>,
}

/// Makes a handle `Send` but not `Sync`.
type NotSync = PhantomData<Cell<()>>;

/// The counter of connections one worker accepted on one listener. Held by
/// the worker's listener slot; pass it to [`WorkerMetrics::accepted`].
/// Dropping it (the listener was removed by a reload) keeps its count in the
/// totals.
#[derive(Debug)]
pub struct ListenerCounter {
    cell: Arc<ListenerCell>,
    _not_sync: NotSync,
}

impl Drop for ListenerCounter {
    fn drop(&mut self) {
        self.cell.in_use.give_back();
    }
}

/// One worker's counting handle: unique, `Send`, not `Sync` (see the module
/// docs). Every method is a couple of plain stores into the worker's own
/// block: call them per read pass or per connection event.
///
/// Not `Sync`, so two threads can never write one block at once:
/// ```compile_fail
/// fn shared<T: Sync>() {}
/// shared::<xps::observe::metrics::WorkerMetrics>();
/// ```
/// and the same for a listener's counter:
/// ```compile_fail
/// fn shared<T: Sync>() {}
/// shared::<xps::observe::metrics::ListenerCounter>();
/// ```
#[derive(Debug)]
pub struct WorkerMetrics {
    block: Arc<WorkerBlock>,
    _not_sync: NotSync,
}

impl Drop for WorkerMetrics {
    fn drop(&mut self) {
        self.block.taken.give_back();
    }
}

impl WorkerMetrics {
    /// A connection was accepted on `listener`: counts it there and opens
    /// it. It must later end with exactly one [`closed`](Self::closed) or
    /// [`refused`](Self::refused) on this same handle.
    #[inline]
    pub fn accepted(&self, listener: &ListenerCounter) {
        listener.cell.accepted.add(1);
        self.block.open.add(1);
    }

    /// An accepted connection that was served ended.
    #[inline]
    pub fn closed(&self, reason: &CloseReason) {
        self.block.closed[reason.index()].add(1);
        self.block.open.sub(1);
    }

    /// An accepted connection was turned away before it was served.
    #[inline]
    pub fn refused(&self, reason: Refusal) {
        self.block.refused[reason.index()].add(1);
        self.block.open.sub(1);
    }

    /// An open connection moved to another process (an upgrade): it is no
    /// longer open here, and did not end.
    #[inline]
    pub fn handed_over(&self) {
        self.block.open.sub(1);
    }

    /// A connection moved here from another process: open, not accepted
    /// here (that process counted its accept).
    #[inline]
    pub fn adopted(&self) {
        self.block.open.add(1);
    }

    /// `n` replies were queued (lines and overlong segments).
    #[inline]
    pub fn lines(&self, n: u64) {
        self.block.lines.add(n);
    }

    /// `n` bytes were read from clients.
    #[inline]
    pub fn received(&self, n: u64) {
        self.block.received.add(n);
    }

    /// `n` bytes were written to clients.
    #[inline]
    pub fn sent(&self, n: u64) {
        self.block.sent.add(n);
    }

    /// `accept(2)` failed.
    #[inline]
    pub fn accept_error(&self, kind: AcceptError) {
        self.block.accept_errors[kind as usize].add(1);
    }

    /// A connection reached the high-water mark and reading from it paused.
    #[inline]
    pub fn flow_pause(&self) {
        self.block.flow_pauses.add(1);
    }

    /// `n` of this worker's connections hold bytes (a gauge, set once per
    /// turn; stored only when it changed).
    #[inline]
    pub fn holding(&self, n: u64) {
        self.block.holding.set(n);
    }

    /// This worker dropped an access-log line because the writer was behind.
    #[inline]
    pub fn access_log_dropped(&self) {
        self.block.access_log_dropped.add(1);
    }
}

/// The registry: every worker's block, the listener counters, and the
/// process-wide counters. Shared as `Arc<Metrics>` between the workers (to
/// take their handles), the control thread (reloads) and the scrape thread.
///
/// ```
/// use xps::network::io::CloseReason;
/// use xps::observe::metrics::Metrics;
///
/// let metrics = Metrics::new(2); // at start-up: Arc<Metrics>
/// // In worker 0 (the handle moves into its thread):
/// let counting = metrics.take_worker(0).expect("taken once");
/// let listener = metrics.listener("0.0.0.0:8001"); // per worker, per listener
/// counting.accepted(&listener); // accept(2) returned a connection
/// counting.received(6); // per read pass …
/// counting.lines(1);
/// counting.sent(6); // … and per write pass
/// counting.closed(&CloseReason::Finished); // it ended
/// assert!(metrics.render().contains("\nxps_lines_total 1\n"));
/// ```
#[derive(Debug)]
pub struct Metrics {
    pub(super) workers: Box<[Arc<WorkerBlock>]>,
    pub(super) listeners: Mutex<Vec<ListenerEntry>>,
    pub(super) reloads_ok: AtomicU64,
    pub(super) reloads_failed: AtomicU64,
    pub(super) access_log_dropped: Arc<AtomicU64>,
    /// An old process's `_total` values, added at render (an upgrade).
    pub(super) carried: Mutex<std::collections::BTreeMap<String, String>>,
}

impl Metrics {
    /// A registry for `workers` workers, every count zero.
    pub fn new(workers: usize) -> Arc<Metrics> {
        Arc::new(Metrics {
            workers: (0..workers).map(|_| Arc::default()).collect(),
            listeners: Mutex::new(Vec::new()),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            access_log_dropped: Arc::new(AtomicU64::new(0)),
            carried: Mutex::default(),
        })
    }

    /// The number of workers (`xps_workers`).
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Worker `i`'s counting handle, or `None` if `i` is out of range or the
    /// handle is already taken (it is given back when dropped).
    pub fn take_worker(&self, i: usize) -> Option<WorkerMetrics> {
        let block = self.workers.get(i)?;
        if !block.taken.take() {
            return None;
        }
        Some(WorkerMetrics {
            block: Arc::clone(block),
            _not_sync: PhantomData,
        })
    }

    /// A counter for one worker's socket on the listener labelled `addr`
    /// (the address as configured, e.g. `0.0.0.0:8001` or `[::1]:8001`).
    /// Call it once per worker per listener, when the listener is opened
    /// (at start-up or by a reload); each worker needs its own.
    pub fn listener(&self, addr: &str) -> ListenerCounter {
        let mut entries = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let reuse = entries
            .iter()
            .find(|e| *e.addr == *addr && e.cell.in_use.take());
        let cell = match reuse {
            Some(e) => Arc::clone(&e.cell),
            None => {
                let cell = Arc::new(ListenerCell::default());
                cell.in_use.take(); // a new cell: always free
                entries.push(ListenerEntry {
                    addr: addr.into(),
                    cell: Arc::clone(&cell),
                });
                cell
            }
        };
        ListenerCounter {
            cell,
            _not_sync: PhantomData,
        }
    }

    /// A reload finished: `ok` if it took effect, `false` if it was refused.
    pub fn reload(&self, ok: bool) {
        let c = if ok {
            &self.reloads_ok
        } else {
            &self.reloads_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A counter of dropped access-log lines for code that is not a worker
    /// (the access-log writer thread): bump it with `fetch_add(n, Relaxed)`.
    /// Workers use [`WorkerMetrics::access_log_dropped`]; the two are summed.
    pub fn access_log_dropped(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.access_log_dropped)
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::super::exposition::{line_of, xps_text};
    use super::*;

    #[test]
    fn sums_over_two_workers_counting_on_their_own_threads() {
        let m = Metrics::new(2);
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let w = m.take_worker(i).unwrap();
                let l = m.listener(if i == 0 { "a:1" } else { "b:2" });
                let shared = m.listener("c:3");
                thread::spawn(move || {
                    for _ in 0..10_000 {
                        w.accepted(&l);
                        w.accepted(&shared);
                        w.lines(2);
                        w.received(10);
                        w.sent(10);
                        w.closed(&CloseReason::Reset(io::ErrorKind::ConnectionReset.into()));
                        w.refused(Refusal::ProxyHeader(
                            crate::policy::proxy_protocol::HeaderFailure::Closed,
                        ));
                    }
                    w.accept_error(AcceptError::Other);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = xps_text(&m);
        for (series, v) in [
            ("xps_workers", "2"),
            ("xps_connections_accepted_total{listener=\"a:1\"}", "10000"),
            ("xps_connections_accepted_total{listener=\"b:2\"}", "10000"),
            ("xps_connections_accepted_total{listener=\"c:3\"}", "20000"),
            ("xps_connections_open", "0"),
            ("xps_connections_closed_total{reason=\"reset\"}", "20000"),
            (
                "xps_connections_refused_total{reason=\"proxy_header\"}",
                "20000",
            ),
            ("xps_lines_total", "40000"),
            ("xps_received_bytes_total", "200000"),
            ("xps_sent_bytes_total", "200000"),
            ("xps_accept_errors_total{error=\"other\"}", "2"),
        ] {
            assert_eq!(line_of(&text, series), format!("{series} {v}"));
        }
        // Three listener series, one per address.
        assert_eq!(text.matches("xps_connections_accepted_total{").count(), 3);
    }

    #[test]
    fn handles_are_unique_and_given_back_on_drop() {
        let m = Metrics::new(2);
        let w0 = m.take_worker(0).unwrap();
        assert!(m.take_worker(0).is_none());
        assert!(m.take_worker(2).is_none());
        assert!(m.take_worker(1).is_some()); // dropped at once: given back
        assert!(m.take_worker(1).is_some());
        w0.lines(5);
        drop(w0);
        let w0 = m.take_worker(0).unwrap();
        w0.lines(1);
        assert_eq!(
            line_of(&xps_text(&m), "xps_lines_total"),
            "xps_lines_total 6"
        );
    }

    #[test]
    fn removed_listener_keeps_its_count_and_reopening_reuses_the_cell() {
        let m = Metrics::new(1);
        let w = m.take_worker(0).unwrap();
        let l = m.listener("[::1]:8001");
        w.accepted(&l);
        w.accepted(&l);
        drop(l); // removed by a reload
        let text = xps_text(&m);
        let series = "xps_connections_accepted_total{listener=\"[::1]:8001\"}";
        assert_eq!(line_of(&text, series), format!("{series} 2"));
        // Opened again: same cell, no growth.
        let l = m.listener("[::1]:8001");
        w.accepted(&l);
        // Opened while the first handle lives (two workers' sockets, say):
        // a second cell, summed under the same label.
        let l2 = m.listener("[::1]:8001");
        w.accepted(&l2);
        assert_eq!(m.listeners.lock().unwrap().len(), 2);
        let text = xps_text(&m);
        assert_eq!(line_of(&text, series), format!("{series} 4"));
        assert_eq!(text.matches("xps_connections_accepted_total{").count(), 1);
    }

    #[test]
    fn accepted_equals_open_plus_ended() {
        let m = Metrics::new(1);
        let w = m.take_worker(0).unwrap();
        let l = m.listener("x:1");
        for _ in 0..5 {
            w.accepted(&l);
        }
        w.closed(&CloseReason::IdleTimeout {
            stalled_writer: false,
            after_secs: 1,
        });
        w.closed(&CloseReason::Shutdown);
        w.refused(Refusal::PerSourceLimit);
        let text = xps_text(&m);
        assert_eq!(
            line_of(&text, "xps_connections_open"),
            "xps_connections_open 2"
        );
    }

    #[test]
    fn accept_error_kinds() {
        let k = |n| AcceptError::from_io(&io::Error::from_raw_os_error(n));
        assert_eq!(k(libc::EMFILE), AcceptError::Emfile);
        assert_eq!(k(libc::ENFILE), AcceptError::Enfile);
        assert_eq!(k(libc::ENOBUFS), AcceptError::Enobufs);
        assert_eq!(k(libc::ENOMEM), AcceptError::Enomem);
        assert_eq!(k(libc::ECONNABORTED), AcceptError::Other);
        let custom = io::Error::other("x");
        assert_eq!(AcceptError::from_io(&custom), AcceptError::Other);
    }

    #[test]
    fn blocks_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<WorkerBlock>(), 128);
        assert_eq!(std::mem::align_of::<ListenerCell>(), 128);
        let m = Metrics::new(2);
        let a = Arc::as_ptr(&m.workers[0]) as usize;
        let b = Arc::as_ptr(&m.workers[1]) as usize;
        assert_eq!(a % 128, 0);
        assert_eq!(b % 128, 0);
        assert!(a.abs_diff(b) >= std::mem::size_of::<WorkerBlock>());
    }
}
