//! `--metrics HOST:PORT`: counters that cost the line path nothing it can
//! measure, and the small HTTP endpoint a Prometheus server scrapes them from
//! (SPEC §5).
//!
//! # Counting: one writer per cache line
//!
//! Every worker owns one [`WorkerMetrics`] handle over its own block of
//! `AtomicU64`s, aligned to 128 bytes (two cache lines: x86's adjacent-line
//! prefetcher pulls lines in pairs, which is also why crossbeam's
//! `CachePadded` uses 128) so no other worker's block shares a line with it.
//! Only that worker writes the block; the scrape thread only reads it. A
//! count is therefore a plain `load` and `store` with `Relaxed` ordering, not
//! a locked read-modify-write: on x86 that is two `mov`s, and the line stays
//! in the worker's cache in the Modified state except for the instant after
//! a scrape (every 15 s or so) read it.
//!
//! "Only one writer" is what makes load-then-store exact, so the types
//! enforce it instead of a comment: a block's handle is handed out once
//! ([`Metrics::take_worker`] answers `None` while it is taken), it is not
//! `Clone`, and it is `Send` but not `Sync`, so it can move to the worker's
//! thread but never be used from two threads at once. The same holds for a
//! listener's accept counter ([`ListenerCounter`]).
//!
//! Each connection is counted once when accepted (by its listener, through
//! [`WorkerMetrics::accepted`]) and once when it ends, by exactly one of
//! [`WorkerMetrics::closed`] or [`WorkerMetrics::refused`]. So once the
//! server is quiet,
//! `sum(accepted) = open + sum(closed) + sum(refused)`, exactly. The open
//! gauge is a per-worker count that `accepted` raises and the two ending
//! calls lower; a connection lives on one worker from accept to end, so each
//! worker's gauge is never negative and their sum, read one atomic at a time,
//! never shows a connection twice or below zero.
//!
//! Listeners come and go with reloads. Their counters live in a registry
//! (a mutex taken only when a listener is created and at a scrape, never per
//! connection); a removed listener's counter stays there, so its accepts stay
//! in `xps_connections_accepted_total{listener=...}`. When the same address is
//! opened again, its old counter is reused (if no live handle holds it), so
//! reloading back and forth does not grow the registry.
//!
//! ```
//! use xps::network::io::CloseReason;
//! use xps::observe::metrics::Metrics;
//!
//! let metrics = Metrics::new(2); // at start-up: Arc<Metrics>
//! // In worker 0 (the handle moves into its thread):
//! let counting = metrics.take_worker(0).expect("taken once");
//! let listener = metrics.listener("0.0.0.0:8001"); // per worker, per listener
//! counting.accepted(&listener); // accept(2) returned a connection
//! counting.received(6); // per read pass …
//! counting.lines(1);
//! counting.sent(6); // … and per write pass
//! counting.closed(&CloseReason::Finished); // it ended
//! assert!(metrics.render().contains("\nxps_lines_total 1\n"));
//! ```
//!
//! Process-wide events that are rare (reloads, and an access-log writer
//! dropping lines) use ordinary shared atomics with `fetch_add`.
//!
//! # The format: hand-written text format 0.0.4, not a client crate
//!
//! The exposition is written by hand in the Prometheus text format 0.0.4
//! (`text/plain; version=0.0.4`), the format `promtool check metrics` reads
//! and lints. The `prometheus-client` crate was considered and rejected:
//! * it encodes OpenMetrics, where a counter's family is declared without its
//!   `_total` suffix (`# TYPE xps_lines counter` / `xps_lines_total 1` /
//!   `# EOF`). Fed that, `promtool check metrics` (2.42) exits 3 with
//!   `xps_lines_total no help text` (checked on this machine);
//! * its counters are shared `Arc<AtomicU64>`s bumped with `fetch_add`: the
//!   per-worker blocks summed at scrape time would need a custom collector
//!   anyway, leaving the crate only the text encoding, which is ~60 lines here.
//!
//! The `tests` module pipes [`Metrics::render`] through `promtool check
//! metrics` when the tool is installed (Debian: `apt-get install
//! prometheus`) and requires a clean result, lints included.
//!
//! # The endpoint: a few threads, never the event loops
//!
//! [`serve`] runs one accept thread in blocking mode. Each scrape gets its own
//! short-lived thread, at most [`MAX_SCRAPERS`] at once; a connection past
//! that is answered `503` without waiting and closed. Each has
//! [`SCRAPE_TIMEOUT`] to send its request head (a total deadline, not per
//! read, so a byte every few seconds does not keep it) and that long per
//! write of the answer. So a slow or hostile scraper holds at most its own
//! thread for a few seconds, and the workers never see it: a scrape only
//! reads their counters.
//!
//! What it answers (request parsing is the pure [`parse_request`]):
//! * `GET /metrics` (any query string): `200`, the exposition;
//! * `GET` of any other path: `404`;
//! * a well-formed request with another method (`HEAD`, `POST` …): `405`
//!   with `Allow: GET`;
//! * anything malformed — a bad request line, an HTTP version other than
//!   1.0/1.1, a bad header line, a head over [`MAX_REQUEST_HEAD`] bytes: `400`;
//! * a head not complete within [`SCRAPE_TIMEOUT`]: `408`.
//!
//! Every answer carries `Content-Length` and `Connection: close`, and the
//! connection is closed after it: one request per connection, which is all a
//! scraper needs and leaves no idle keep-alive connection to hold a slot.
//! No async runtime: four blocking threads at most do not need one.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::network::io::CloseReason;
use crate::policy::Refusal;
use crate::utils::logger::Level;
use crate::xps_log;

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
struct Single(AtomicU64);

impl Single {
    #[inline]
    fn add(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }

    #[inline]
    fn sub(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_sub(n), Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One worker's counters, on cache lines no other worker writes.
#[derive(Debug, Default)]
#[repr(align(128))]
struct WorkerBlock {
    /// A [`WorkerMetrics`] handle exists for this block.
    taken: AtomicBool,
    /// Connections accepted and not yet closed or refused.
    open: Single,
    /// By [`CloseReason::index`].
    closed: [Single; CloseReason::LABELS.len()],
    /// By [`Refusal::index`].
    refused: [Single; Refusal::LABELS.len()],
    /// Replies queued.
    lines: Single,
    /// Bytes read from clients, after any PROXY header (not the client's).
    received: Single,
    /// Bytes written to clients.
    sent: Single,
    /// By [`AcceptError`] as index.
    accept_errors: [Single; 5],
    /// Times reading paused at the high-water mark.
    flow_pauses: Single,
    /// Access-log lines this worker dropped.
    access_log_dropped: Single,
}

/// One listener's accept count (per worker), on its own cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct ListenerCell {
    accepted: Single,
    /// A [`ListenerCounter`] handle exists for this cell.
    in_use: AtomicBool,
}

/// A registered listener counter: the label and the cell.
#[derive(Debug)]
struct ListenerEntry {
    addr: Box<str>,
    cell: Arc<ListenerCell>,
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
        // Release: the next holder (reuse in `Metrics::listener`) sees the
        // last count this one stored before it adds to it.
        self.cell.in_use.store(false, Ordering::Release);
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
        self.block.taken.store(false, Ordering::Release);
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

    /// This worker dropped an access-log line because the writer was behind.
    #[inline]
    pub fn access_log_dropped(&self) {
        self.block.access_log_dropped.add(1);
    }
}

/// The registry: every worker's block, the listener counters, and the
/// process-wide counters. Shared as `Arc<Metrics>` between the workers (to
/// take their handles), the control thread (reloads) and the scrape thread.
#[derive(Debug)]
pub struct Metrics {
    workers: Box<[Arc<WorkerBlock>]>,
    listeners: Mutex<Vec<ListenerEntry>>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    access_log_dropped: Arc<AtomicU64>,
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
        block
            .taken
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
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
        let reuse = entries.iter().find(|e| {
            *e.addr == *addr
                && e.cell
                    .in_use
                    .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
        });
        let cell = match reuse {
            Some(e) => Arc::clone(&e.cell),
            None => {
                let cell = Arc::new(ListenerCell::default());
                cell.in_use.store(true, Ordering::Relaxed);
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

    /// The full exposition: the xps series, then the process series.
    pub fn render(&self) -> String {
        let mut out = Exposition(String::with_capacity(4096));
        self.render_xps(&mut out);
        render_process(&ProcessStats::read(), &mut out);
        out.0
    }

    /// The xps series (everything but the process series).
    fn render_xps(&self, out: &mut Exposition) {
        let sum = |f: &dyn Fn(&WorkerBlock) -> u64| -> u64 {
            self.workers.iter().fold(0u64, |a, b| a.wrapping_add(f(b)))
        };

        out.family("xps_build_info", "gauge", "The version of xps; always 1.");
        out.sample(
            "xps_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );
        out.family("xps_workers", "gauge", "Worker threads (event loops).");
        out.sample("xps_workers", &[], self.workers.len());

        let mut by_addr: BTreeMap<Box<str>, u64> = BTreeMap::new();
        {
            let entries = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
            for e in entries.iter() {
                let c = by_addr.entry(e.addr.clone()).or_insert(0);
                *c = c.wrapping_add(e.cell.accepted.get());
            }
        }
        out.family(
            "xps_connections_accepted_total",
            "counter",
            "Connections accepted, by listener address.",
        );
        for (addr, n) in &by_addr {
            out.sample("xps_connections_accepted_total", &[("listener", addr)], n);
        }

        // Per worker the gauge is never negative; as i64 in case a caller
        // broke the accept/end pairing, so the sum shows it instead of 2^64.
        let open: i64 = self
            .workers
            .iter()
            .fold(0i64, |a, b| a.wrapping_add(b.open.get() as i64));
        out.family(
            "xps_connections_open",
            "gauge",
            "Connections accepted and not yet closed or refused.",
        );
        out.sample("xps_connections_open", &[], open);

        out.family(
            "xps_connections_closed_total",
            "counter",
            "Served connections that ended, by reason.",
        );
        for (i, label) in CloseReason::LABELS.iter().enumerate() {
            let n = sum(&|b| b.closed[i].get());
            out.sample("xps_connections_closed_total", &[("reason", label)], n);
        }
        out.family(
            "xps_connections_refused_total",
            "counter",
            "Accepted connections turned away before being served, by reason.",
        );
        for (i, label) in Refusal::LABELS.iter().enumerate() {
            let n = sum(&|b| b.refused[i].get());
            out.sample("xps_connections_refused_total", &[("reason", label)], n);
        }

        for (name, help, n) in [
            (
                "xps_lines_total",
                "Replies sent: lines and overlong segments.",
                sum(&|b| b.lines.get()),
            ),
            (
                "xps_received_bytes_total",
                "Bytes read from clients, not counting PROXY protocol headers.",
                sum(&|b| b.received.get()),
            ),
            (
                "xps_sent_bytes_total",
                "Bytes written to clients.",
                sum(&|b| b.sent.get()),
            ),
        ] {
            out.family(name, "counter", help);
            out.sample(name, &[], n);
        }

        out.family(
            "xps_accept_errors_total",
            "counter",
            "Failed accept() calls, by error.",
        );
        for k in AcceptError::ALL {
            let n = sum(&|b| b.accept_errors[k as usize].get());
            out.sample("xps_accept_errors_total", &[("error", k.label())], n);
        }
        out.family(
            "xps_flow_control_pauses_total",
            "counter",
            "Times reading from a client paused because its replies reached the high-water mark.",
        );
        out.sample(
            "xps_flow_control_pauses_total",
            &[],
            sum(&|b| b.flow_pauses.get()),
        );

        out.family(
            "xps_reloads_total",
            "counter",
            "Configuration reloads, by result.",
        );
        let ok = self.reloads_ok.load(Ordering::Relaxed);
        let failed = self.reloads_failed.load(Ordering::Relaxed);
        out.sample("xps_reloads_total", &[("result", "ok")], ok);
        out.sample("xps_reloads_total", &[("result", "failed")], failed);

        out.family(
            "xps_access_log_dropped_total",
            "counter",
            "Access-log lines dropped because the writer fell behind.",
        );
        let dropped = sum(&|b| b.access_log_dropped.get())
            .wrapping_add(self.access_log_dropped.load(Ordering::Relaxed));
        out.sample("xps_access_log_dropped_total", &[], dropped);
    }
}

/// Text format 0.0.4 being written.
struct Exposition(String);

impl Exposition {
    /// `# HELP` and `# TYPE` lines. `help` is a constant of this module,
    /// written without `\` or newlines, so it needs no escaping.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    /// One sample line, label values escaped.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                self.0.push_str(k);
                self.0.push_str("=\"");
                escape_label_value(v, &mut self.0);
                self.0.push('"');
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// A label value as the text format wants it: `\`, `"` and newline escaped.
fn escape_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The standard process series, from `/proc/self`. A figure that cannot be
/// read is left out (with its family) rather than shown as a false zero.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct ProcessStats {
    /// User plus system CPU time.
    cpu_seconds: Option<f64>,
    /// Resident set size.
    resident_bytes: Option<u64>,
    /// Open file descriptors (the directory listing's own included, as the
    /// Go client counts them).
    open_fds: Option<u64>,
    /// The soft `RLIMIT_NOFILE`.
    max_fds: Option<u64>,
    /// When the process started, in seconds since the Unix epoch.
    start_time_seconds: Option<f64>,
}

impl ProcessStats {
    fn read() -> ProcessStats {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        // SAFETY: sysconf only reads a configuration value.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let ticks = (ticks > 0).then_some(ticks as f64);
        let stat = read("/proc/self/stat").and_then(|s| parse_stat(&s));
        let btime = read("/proc/stat").and_then(|s| parse_btime(&s));
        ProcessStats {
            cpu_seconds: stat.zip(ticks).map(|(s, t)| (s.utime + s.stime) as f64 / t),
            resident_bytes: read("/proc/self/statm")
                .and_then(|s| parse_statm_resident(&s))
                .zip((page > 0).then_some(page as u64))
                .map(|(pages, size)| pages.saturating_mul(size)),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
            max_fds: read("/proc/self/limits").and_then(|s| parse_max_open_files(&s)),
            start_time_seconds: stat
                .zip(ticks)
                .zip(btime)
                .map(|((s, t), b)| b as f64 + s.starttime as f64 / t),
        }
    }
}

fn render_process(p: &ProcessStats, out: &mut Exposition) {
    fn one(out: &mut Exposition, name: &str, kind: &str, help: &str, v: Option<impl fmt::Display>) {
        if let Some(v) = v {
            out.family(name, kind, help);
            out.sample(name, &[], v);
        }
    }
    one(
        out,
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds,
    );
    one(
        out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        p.resident_bytes,
    );
    one(
        out,
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        p.open_fds,
    );
    one(
        out,
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        p.max_fds,
    );
    one(
        out,
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        p.start_time_seconds,
    );
}

/// The fields of `/proc/self/stat` used here, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    utime: u64,
    stime: u64,
    starttime: u64,
}

/// Fields 14, 15 and 22 of `/proc/<pid>/stat` (proc(5)). The command name,
/// field 2, is in parentheses and may itself hold spaces and `)`, so the
/// fields are counted from the last `)`.
fn parse_stat(s: &str) -> Option<Stat> {
    let rest = &s[s.rfind(')')? + 1..];
    // rest starts with field 3 (state).
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        starttime: field(22)?,
    })
}

/// The resident size in pages: the second field of `/proc/<pid>/statm`.
fn parse_statm_resident(s: &str) -> Option<u64> {
    s.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// Boot time in seconds since the epoch: `/proc/stat`'s `btime` line.
fn parse_btime(s: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// The soft limit on the `Max open files` line of `/proc/<pid>/limits`
/// (`None` if it is `unlimited`).
fn parse_max_open_files(s: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix("Max open files"))?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------
// HTTP

/// The largest request head (request line and headers) accepted, in bytes.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Concurrent scrape connections; more are answered 503 and closed.
pub const MAX_SCRAPERS: usize = 4;
/// Time a scraper has to send its request head, and per write of the answer.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one warning about failing accepts per this interval.
const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// A request's method, as far as routing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// Any other well-formed method (answered 405).
    Other,
}

/// A complete, well-formed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// The request target's path, query string removed (`/metrics`).
    pub path: String,
}

/// Why a request head is malformed (answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRequest {
    /// The head is over [`MAX_REQUEST_HEAD`] bytes.
    TooLarge,
    /// The request line is not `METHOD SP /target SP HTTP/x.y`.
    RequestLine,
    /// The version is not HTTP/1.0 or HTTP/1.1.
    Version,
    /// A header line is not `name: value` (or is an obsolete folded line).
    Header,
}

/// Parses a request head from the bytes received so far: `Ok(None)` if it
/// is not complete yet, `Ok(Some)` once the empty line ending it has arrived
/// (anything after it, such as a body, is ignored), `Err` as soon as a
/// complete line is malformed or the head outgrows [`MAX_REQUEST_HEAD`].
/// Lines may end in CRLF or a bare LF (RFC 9112 §2.2); empty lines before
/// the request line are skipped.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, BadRequest> {
    let mut request: Option<Request> = None;
    let mut pos = 0;
    while let Some(nl) = memchr::memchr(b'\n', &buf[pos..]) {
        let end = pos + nl;
        if end >= MAX_REQUEST_HEAD {
            return Err(BadRequest::TooLarge);
        }
        let line = &buf[pos..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        pos = end + 1;
        match &request {
            None if line.is_empty() => {}
            None => request = Some(parse_request_line(line)?),
            Some(_) if line.is_empty() => return Ok(request),
            Some(_) => check_header_line(line)?,
        }
    }
    if buf.len() > MAX_REQUEST_HEAD {
        return Err(BadRequest::TooLarge);
    }
    Ok(None)
}

/// RFC 9110 `tchar`: what a method or a header name is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn parse_request_line(line: &[u8]) -> Result<Request, BadRequest> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BadRequest::RequestLine);
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(BadRequest::RequestLine);
    }
    // Only origin-form targets (`/path`): `*` and absolute URLs are 400.
    if target.first() != Some(&b'/') || !target.iter().all(|&b| (0x21..0x7f).contains(&b)) {
        return Err(BadRequest::RequestLine);
    }
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return Err(BadRequest::Version);
    }
    let path = match memchr::memchr(b'?', target) {
        Some(q) => &target[..q],
        None => target,
    };
    Ok(Request {
        method: if method == b"GET" {
            Method::Get
        } else {
            Method::Other
        },
        // Every byte is printable ASCII (checked above).
        path: String::from_utf8_lossy(path).into_owned(),
    })
}

fn check_header_line(line: &[u8]) -> Result<(), BadRequest> {
    let colon = memchr::memchr(b':', line).ok_or(BadRequest::Header)?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(BadRequest::Header);
    }
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(BadRequest::Header);
    }
    Ok(())
}

/// What a parsed request is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    MethodNotAllowed,
}

fn route(req: &Request) -> Route {
    match (req.method, req.path.as_str()) {
        (Method::Get, "/metrics") => Route::Metrics,
        (Method::Get, _) => Route::NotFound,
        (Method::Other, _) => Route::MethodNotAllowed,
    }
}

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A complete HTTP/1.1 response that closes the connection.
fn response(status: &str, extra: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn plain(status: &str, extra: &str, body: &str) -> Vec<u8> {
    response(status, extra, "text/plain; charset=utf-8", body.as_bytes())
}

/// The answer to a parsed (or malformed) request.
fn answer(req: Result<&Request, BadRequest>, metrics: &Metrics) -> Vec<u8> {
    match req.map(route) {
        Ok(Route::Metrics) => response("200 OK", "", CONTENT_TYPE, metrics.render().as_bytes()),
        Ok(Route::NotFound) => plain("404 Not Found", "", "not found; try /metrics\n"),
        Ok(Route::MethodNotAllowed) => plain(
            "405 Method Not Allowed",
            "Allow: GET\r\n",
            "method not allowed\n",
        ),
        Err(_) => plain("400 Bad Request", "", "bad request\n"),
    }
}

/// Limits of one endpoint (the constants, or shorter ones in tests).
#[derive(Debug, Clone, Copy)]
struct ServeLimits {
    timeout: Duration,
    max_conns: usize,
}

/// Serves `GET /metrics` on `listener` from a thread of its own (see the
/// module docs), until the process exits. The listener is switched to
/// blocking mode. Errors only if the thread cannot be started.
pub fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> io::Result<JoinHandle<()>> {
    serve_with(
        listener,
        metrics,
        ServeLimits {
            timeout: SCRAPE_TIMEOUT,
            max_conns: MAX_SCRAPERS,
        },
    )
}

fn serve_with(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    limits: ServeLimits,
) -> io::Result<JoinHandle<()>> {
    listener.set_nonblocking(false)?;
    thread::Builder::new()
        .name("xps-metrics".to_string())
        .spawn(move || accept_loop(&listener, &metrics, limits))
}

/// Gives a scrape slot back when its thread ends (or never starts).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept_loop(listener: &TcpListener, metrics: &Arc<Metrics>, limits: ServeLimits) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut warned: Option<Instant> = None;
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let now = Instant::now();
                if warned.is_none_or(|t| now.duration_since(t) >= ACCEPT_WARN_INTERVAL) {
                    warned = Some(now);
                    xps_log!(
                        Level::Warning,
                        "xps_metrics_serve()",
                        "accept() on the metrics endpoint failed: {}",
                        crate::os_reason(&e)
                    );
                }
                // Out of descriptors or memory: do not spin.
                if AcceptError::from_io(&e) != AcceptError::Other {
                    thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
        };
        // Only this thread raises `active`, so check-then-raise is exact.
        if active.load(Ordering::Acquire) >= limits.max_conns {
            turn_away(stream);
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(Arc::clone(&active));
        let metrics = Arc::clone(metrics);
        let spawned = thread::Builder::new()
            .name("xps-scrape".to_string())
            .spawn(move || {
                let _slot = slot;
                scrape(stream, &metrics, limits);
            });
        if let Err(e) = spawned {
            // The closure, with its stream and slot, is dropped: closed, freed.
            xps_log!(
                Level::Warning,
                "xps_metrics_serve()",
                "cannot start a scrape thread: {}",
                crate::os_reason(&e)
            );
        }
    }
}

/// Answers a connection past [`MAX_SCRAPERS`] without ever blocking.
/// Whatever request already arrived is read away first, and the write side
/// shut before the close, so the close is less likely to become an RST that
/// destroys the answer; a request arriving later may still cause one, which
/// is acceptable for a connection that is being refused.
fn turn_away(mut stream: TcpStream) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    for _ in 0..4 {
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let msg = plain("503 Service Unavailable", "", "too many scrapes\n");
    let _ = stream.write(&msg);
    let _ = stream.shutdown(Shutdown::Write);
}

/// Serves one scrape connection: one request, one answer, close.
fn scrape(mut stream: TcpStream, metrics: &Metrics, limits: ServeLimits) {
    let deadline = Instant::now() + limits.timeout;
    if stream.set_write_timeout(Some(limits.timeout)).is_err() {
        return;
    }
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let parsed = loop {
        match parse_request(&buf) {
            Ok(None) => {}
            Ok(Some(req)) => break Ok(req),
            Err(e) => break Err(e),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            let _ = stream.write_all(&plain("408 Request Timeout", "", "request timeout\n"));
            return;
        }
        // parse_request answers `Err` past MAX_REQUEST_HEAD, so `room` > 0.
        let room = (MAX_REQUEST_HEAD + 1 - buf.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]) {
            Ok(0) => return, // gave up before finishing its request
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let _ = stream.write_all(&plain("408 Request Timeout", "", "request timeout\n"));
                return;
            }
            Err(_) => return,
        }
    };
    if stream
        .write_all(&answer(parsed.as_ref().map_err(|e| *e), metrics))
        .is_err()
    {
        return;
    }
    // Close gracefully: FIN first, then read away what the client may still
    // send (a body, the rest of a garbage request), so the close does not
    // turn into an RST that could destroy the answer in flight.
    let _ = stream.shutdown(Shutdown::Write);
    let linger = deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_millis(1), Duration::from_secs(1));
    if stream.set_read_timeout(Some(linger)).is_ok() {
        let mut drained = 0usize;
        while drained < 64 * 1024 {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The xps part of the exposition, without the process series.
    fn xps_text(m: &Metrics) -> String {
        let mut out = Exposition(String::new());
        m.render_xps(&mut out);
        out.0
    }

    #[test]
    fn render_exact_for_a_known_state() {
        let m = Metrics::new(1);
        let w = m.take_worker(0).unwrap();
        let l = m.listener("0.0.0.0:8001");
        for _ in 0..3 {
            w.accepted(&l);
        }
        w.closed(&CloseReason::Finished);
        w.refused(Refusal::Denied);
        w.lines(7);
        w.received(70);
        w.sent(69);
        w.accept_error(AcceptError::Emfile);
        w.flow_pause();
        w.access_log_dropped();
        m.access_log_dropped().fetch_add(2, Ordering::Relaxed);
        m.reload(true);
        m.reload(false);
        m.reload(false);
        let version = env!("CARGO_PKG_VERSION");
        let expected = format!(
            "\
# HELP xps_build_info The version of xps; always 1.
# TYPE xps_build_info gauge
xps_build_info{{version=\"{version}\"}} 1
# HELP xps_workers Worker threads (event loops).
# TYPE xps_workers gauge
xps_workers 1
# HELP xps_connections_accepted_total Connections accepted, by listener address.
# TYPE xps_connections_accepted_total counter
xps_connections_accepted_total{{listener=\"0.0.0.0:8001\"}} 3
# HELP xps_connections_open Connections accepted and not yet closed or refused.
# TYPE xps_connections_open gauge
xps_connections_open 1
# HELP xps_connections_closed_total Served connections that ended, by reason.
# TYPE xps_connections_closed_total counter
xps_connections_closed_total{{reason=\"finished\"}} 1
xps_connections_closed_total{{reason=\"reset\"}} 0
xps_connections_closed_total{{reason=\"error\"}} 0
xps_connections_closed_total{{reason=\"idle_timeout\"}} 0
xps_connections_closed_total{{reason=\"line_timeout\"}} 0
xps_connections_closed_total{{reason=\"shutdown\"}} 0
# HELP xps_connections_refused_total Accepted connections turned away before being served, by reason.
# TYPE xps_connections_refused_total counter
xps_connections_refused_total{{reason=\"denied\"}} 1
xps_connections_refused_total{{reason=\"per_source_limit\"}} 0
xps_connections_refused_total{{reason=\"proxy_header\"}} 0
# HELP xps_lines_total Replies sent: lines and overlong segments.
# TYPE xps_lines_total counter
xps_lines_total 7
# HELP xps_received_bytes_total Bytes read from clients, not counting PROXY protocol headers.
# TYPE xps_received_bytes_total counter
xps_received_bytes_total 70
# HELP xps_sent_bytes_total Bytes written to clients.
# TYPE xps_sent_bytes_total counter
xps_sent_bytes_total 69
# HELP xps_accept_errors_total Failed accept() calls, by error.
# TYPE xps_accept_errors_total counter
xps_accept_errors_total{{error=\"EMFILE\"}} 1
xps_accept_errors_total{{error=\"ENFILE\"}} 0
xps_accept_errors_total{{error=\"ENOBUFS\"}} 0
xps_accept_errors_total{{error=\"ENOMEM\"}} 0
xps_accept_errors_total{{error=\"other\"}} 0
# HELP xps_flow_control_pauses_total Times reading from a client paused because its replies reached the high-water mark.
# TYPE xps_flow_control_pauses_total counter
xps_flow_control_pauses_total 1
# HELP xps_reloads_total Configuration reloads, by result.
# TYPE xps_reloads_total counter
xps_reloads_total{{result=\"ok\"}} 1
xps_reloads_total{{result=\"failed\"}} 2
# HELP xps_access_log_dropped_total Access-log lines dropped because the writer fell behind.
# TYPE xps_access_log_dropped_total counter
xps_access_log_dropped_total 3
"
        );
        assert_eq!(xps_text(&m), expected);
    }

    fn line_of<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no line {prefix} in\n{text}"))
    }

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
    fn label_values_are_escaped() {
        let m = Metrics::new(0);
        let _a = m.listener("[::1]:8001");
        let _b = m.listener("we\"ird\\host\nname:1");
        let text = xps_text(&m);
        assert!(text.contains("xps_connections_accepted_total{listener=\"[::1]:8001\"} 0\n"));
        assert!(text.contains(
            "xps_connections_accepted_total{listener=\"we\\\"ird\\\\host\\nname:1\"} 0\n"
        ));
        assert!(text.contains("xps_workers 0\n"));
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

    // --- /proc parsing ---

    #[test]
    fn stat_fields_counted_from_the_last_paren() {
        // comm with spaces and a ')' inside; from field 4 on, each field
        // holds its own number.
        let fields: Vec<String> = (4..=52).map(|n| n.to_string()).collect();
        let s = format!("42 (a b) c) S {}\n", fields.join(" "));
        assert_eq!(
            parse_stat(&s),
            Some(Stat {
                utime: 14,
                stime: 15,
                starttime: 22
            })
        );
        assert_eq!(parse_stat("42 (x) S 1 2"), None);
        assert_eq!(parse_stat("no paren"), None);
    }

    #[test]
    fn statm_btime_limits() {
        assert_eq!(parse_statm_resident("1000 250 30 1 0 80 0\n"), Some(250));
        assert_eq!(parse_statm_resident(""), None);
        assert_eq!(
            parse_btime("cpu  1 2 3\nintr 5\nbtime 1767225600\nprocesses 9\n"),
            Some(1_767_225_600)
        );
        assert_eq!(parse_btime("cpu 1\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_open_files(limits), Some(1024));
        assert_eq!(
            parse_max_open_files(
                "Max open files            unlimited            unlimited            files\n"
            ),
            None
        );
    }

    #[test]
    fn process_series_present_and_plausible() {
        let p = ProcessStats::read();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let cpu = p.cpu_seconds.expect("cpu");
        assert!((0.0..1e6).contains(&cpu), "{cpu}");
        let rss = p.resident_bytes.expect("rss");
        assert!(rss > 100_000 && rss < (1 << 40), "{rss}");
        let open = p.open_fds.expect("open fds");
        let max = p.max_fds.expect("max fds");
        assert!(open >= 3 && open <= max, "{open} {max}");
        let start = p.start_time_seconds.expect("start");
        // Started after 2020 and not in the future (ticks round down).
        assert!(start > 1.5e9 && start <= now + 1.0, "{start} vs {now}");
        let text = Metrics::new(1).render();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
            line_of(&text, name);
        }
    }

    // --- request parsing ---

    fn get(path: &str) -> Request {
        Request {
            method: Method::Get,
            path: path.to_string(),
        }
    }

    #[test]
    fn parses_a_good_request() {
        let req = b"GET /metrics HTTP/1.1\r\nHost: localhost:9100\r\nUser-Agent: Prometheus/2.42.0\r\nAccept: text/plain;version=0.0.4;q=1,*/*;q=0.1\r\n\r\n";
        assert_eq!(parse_request(req), Ok(Some(get("/metrics"))));
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.0\n\n"),
            Ok(Some(get("/metrics")))
        );
        assert_eq!(
            parse_request(b"\r\nGET /nope HTTP/1.1\r\n\r\nbody"),
            Ok(Some(get("/nope")))
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Ok(Some(Request {
                method: Method::Other,
                path: "/metrics".to_string()
            }))
        );
    }

    #[test]
    fn split_request_needs_more_until_the_empty_line() {
        let req = b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n";
        for cut in 0..req.len() {
            assert_eq!(parse_request(&req[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(parse_request(req), Ok(Some(get("/metrics"))));
    }

    #[test]
    fn malformed_requests() {
        use BadRequest::*;
        for (req, why) in [
            (&b"garbage\r\n\r\n"[..], RequestLine),
            (b"garbage\n", RequestLine),
            (b"GET /metrics\r\n\r\n", RequestLine),
            (b"GET  /metrics HTTP/1.1\r\n\r\n", RequestLine),
            (b"GET /metrics HTTP/1.1 x\r\n\r\n", RequestLine),
            (b"GET metrics HTTP/1.1\r\n\r\n", RequestLine),
            (b"GET http://h/metrics HTTP/1.1\r\n\r\n", RequestLine),
            (b"G(T /metrics HTTP/1.1\r\n\r\n", RequestLine),
            (b"GET /me\x01trics HTTP/1.1\r\n\r\n", RequestLine),
            (b"GET /metrics\rHTTP/1.1\r\n\r\n", RequestLine),
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n",
                RequestLine,
            ),
            (b"GET /metrics HTTP/2.0\r\n\r\n", Version),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", RequestLine),
            (b"GET /metrics http/1.1\r\n\r\n", Version),
            (b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n", Header),
            (b"GET /metrics HTTP/1.1\r\nHost : a\r\n\r\n", Header),
            (b"GET /metrics HTTP/1.1\r\n: a\r\n\r\n", Header),
            (
                b"GET /metrics HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
                Header,
            ),
            (b"GET /metrics HTTP/1.1\r\nX: a\x00b\r\n\r\n", Header),
        ] {
            assert_eq!(
                parse_request(req),
                Err(why),
                "{:?}",
                String::from_utf8_lossy(req)
            );
        }
        // A malformed request line is refused before the head is complete.
        assert_eq!(parse_request(b"hello\r\n"), Err(RequestLine));
    }

    #[test]
    fn head_over_8_kib_is_refused() {
        let mut req = b"GET /metrics HTTP/1.1\r\n".to_vec();
        while req.len() <= MAX_REQUEST_HEAD {
            req.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(parse_request(&req), Err(BadRequest::TooLarge));
        // No newline at all, just too long.
        assert_eq!(
            parse_request(&vec![b'a'; MAX_REQUEST_HEAD + 1]),
            Err(BadRequest::TooLarge)
        );
        assert_eq!(parse_request(&vec![b'a'; MAX_REQUEST_HEAD]), Ok(None));
        // Exactly at the limit is still fine.
        let mut ok = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        ok.resize(MAX_REQUEST_HEAD - 4, b'a');
        ok.extend_from_slice(b"\r\n\r\n");
        assert_eq!(ok.len(), MAX_REQUEST_HEAD);
        assert_eq!(parse_request(&ok), Ok(Some(get("/metrics"))));
    }

    #[test]
    fn routes() {
        assert_eq!(route(&get("/metrics")), Route::Metrics);
        assert_eq!(route(&get("/")), Route::NotFound);
        assert_eq!(route(&get("/metrics/")), Route::NotFound);
        let post = Request {
            method: Method::Other,
            path: "/metrics".into(),
        };
        assert_eq!(route(&post), Route::MethodNotAllowed);
        let m = Metrics::new(1);
        let r = answer(Ok(&post), &m);
        assert!(r.starts_with(b"HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(String::from_utf8_lossy(&r).contains("\r\nAllow: GET\r\n"));
        let r = answer(Err(BadRequest::Header), &m);
        assert_eq!(
            r,
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 12\r\nConnection: close\r\n\r\nbad request\n"
        );
    }

    // --- over loopback ---

    /// Sends `req`, returns (status line, headers, body) of the answer.
    fn exchange(addr: std::net::SocketAddr, req: &[u8]) -> (String, String, Vec<u8>) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        let split = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("no end of head");
        let head = String::from_utf8(all[..split].to_vec()).unwrap();
        let (status, headers) = head.split_once("\r\n").unwrap_or((&head, ""));
        (
            status.to_string(),
            headers.to_string(),
            all[split + 4..].to_vec(),
        )
    }

    fn start(limits: ServeLimits) -> (std::net::SocketAddr, Arc<Metrics>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Metrics::new(1);
        serve_with(listener, Arc::clone(&m), limits).unwrap();
        (addr, m)
    }

    #[test]
    fn loopback_get_metrics_nope_and_garbage() {
        let (addr, m) = start(ServeLimits {
            timeout: Duration::from_secs(5),
            max_conns: MAX_SCRAPERS,
        });
        let w = m.take_worker(0).unwrap();
        w.lines(42);

        let (status, headers, body) = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(headers.contains(&format!("Content-Type: {CONTENT_TYPE}")));
        assert!(headers.contains(&format!("Content-Length: {}", body.len())));
        assert!(headers.contains("Connection: close"));
        let body = String::from_utf8(body).unwrap();
        assert!(body.contains("\nxps_lines_total 42\n"), "{body}");
        assert!(body.contains("\nprocess_open_fds "), "{body}");

        let (status, _, _) = exchange(addr, b"GET /nope HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        let (status, _, _) = exchange(addr, b"garbage\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
        let (status, _, _) = exchange(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.resize(20_000, b'a');
        let (status, _, _) = exchange(addr, &big);
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
    }

    #[test]
    fn loopback_slow_scrapers_time_out_and_excess_is_turned_away() {
        let (addr, _m) = start(ServeLimits {
            timeout: Duration::from_millis(500),
            max_conns: 2,
        });
        let t0 = Instant::now();
        // Two silent connections hold both slots …
        let mut idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        thread::sleep(Duration::from_millis(100));
        // … so a third is closed at once, with a 503 unless an RST (its
        // request arrived after the server's last read) overtook it.
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        while let Ok(n @ 1..) = s.read(&mut chunk) {
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 503 Service Unavailable\r\n"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
        assert!(t0.elapsed() < Duration::from_millis(450));
        // The silent ones get 408 when their time is up, …
        for s in &mut idle {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            assert!(got.starts_with(b"HTTP/1.1 408 Request Timeout\r\n"));
        }
        drop(idle);
        // … and their slots are free again.
        thread::sleep(Duration::from_millis(50));
        let (status, _, _) = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
    }

    #[test]
    fn promtool_accepts_the_exposition() {
        // A fresh registry (a family with no sample yet: no listener) …
        let fresh = Metrics::new(1).render();
        // … and one with counts, escaped labels, two workers.
        let m = Metrics::new(2);
        let w = m.take_worker(1).unwrap();
        let l = m.listener("[::1]:8001");
        let _l2 = m.listener("0.0.0.0:8001");
        w.accepted(&l);
        w.closed(&CloseReason::Failed(io::ErrorKind::Other.into()));
        w.sent(5);
        m.reload(true);
        for text in [fresh, m.render()] {
            let child = std::process::Command::new("promtool")
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    eprintln!(
                        "\n*** SKIPPED promtool_accepts_the_exposition: `promtool` is not \
                         installed (Debian: apt-get install prometheus) ***\n"
                    );
                    return;
                }
                Err(e) => panic!("promtool: {e}"),
            };
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(text.as_bytes()).unwrap();
            drop(stdin);
            let out = child.wait_with_output().unwrap();
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "promtool: {said}\n{text}");
            assert!(
                said.trim().is_empty(),
                "promtool complained: {said}\n{text}"
            );
        }
    }
}
