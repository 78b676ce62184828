//! The access log (SPEC §5 `--access-log PATH`): one JSON object per line for
//! every connection that ends, accepted or refused.
//!
//! ```text
//! {"time":"2026-12-01T21:30:00.123Z","listener":"0.0.0.0:8001","client":"203.0.113.7:51234","worker":0,"duration_ms":12.5,"received":120,"sent":120,"lines":2,"end":"finished"}
//! ```
//!
//! A worker never waits for the disk: it hands each loop turn's [`Record`]s
//! to a dedicated writer thread as one batch ([`AccessLog::log_batch`]), and
//! when the writer falls behind the batch is dropped and counted
//! (`xps_access_log_dropped_total`), never queued without bound. Every record
//! is in the file whole or counted as dropped, also on a full disk and at a
//! shutdown that gives a blocked writer up after [`CLOSE_GRACE`].
//! `docs/access-log.md` explains the line's shape, the thread, the
//! accounting, shutdown and rotation; `docs/operations.md` the fields.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, Write};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::utils::logger::Level;
use crate::xps_log;

/// Lines the queue holds before new ones are dropped: about a second of a very
/// busy server's connection ends, a few MiB of memory.
pub const DEFAULT_CAPACITY: usize = 8192;

/// The writer flushes a line at most this long after it was written into its
/// buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// While it holds unflushed lines, the writer looks at its queue this often
/// (instead of being woken by every send).
const BATCH_WINDOW: Duration = Duration::from_millis(50);

/// Size of the writer's buffer: one `write(2)` per this many bytes at most.
const BUFFER_BYTES: usize = 64 * 1024;

/// At shutdown, how long the writer may take to write what it holds before
/// the process exits without it (SPEC §4: exit within a few seconds,
/// whatever the disk does).
pub const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// At shutdown, a writer not done after this long is named in the log.
const CLOSE_NOTICE: Duration = Duration::from_millis(250);

/// Where the logger's lines say they come from.
const SOURCE: &str = "xps_access_log()";

/// One connection that ended, as the access log records it.
#[derive(Debug, Clone)]
pub struct Record {
    /// When the connection ended (closed or refused).
    pub time: SystemTime,
    /// The listener's address as the config names it (`0.0.0.0:8001`); shared
    /// by all connections of that listener.
    pub listener: Arc<str>,
    /// The client: the peer address, or on a PROXY-protocol listener the
    /// source address from the header.
    pub client: SocketAddr,
    /// On a PROXY-protocol listener, the balancer's own address (the TCP
    /// peer); `None` on plain listeners (and then no `proxy` field is written).
    pub proxy: Option<SocketAddr>,
    /// The worker that served the connection (0-based).
    pub worker: usize,
    /// From accept to the end.
    pub duration: Duration,
    /// Bytes read from the client after any PROXY header (the header is
    /// the balancer's, not the client's; a refused connection has 0).
    pub received: u64,
    /// Bytes written to the client.
    pub sent: u64,
    /// Replies sent (lines and overlong segments).
    pub lines: u64,
    /// Why it ended: `finished`, `reset`, `error`, `idle_timeout`,
    /// `line_timeout`, `shutdown`, `denied`, `per_source_limit` or
    /// `proxy_header`.
    pub end: &'static str,
}

/// Appends `r` as one JSON object and a `\n` to `out`. Pure; the field order
/// is fixed (SPEC §5).
pub fn format_record(r: &Record, out: &mut String) {
    format_record_cached(r, out, &mut TimeText::default());
}

/// The text of the last second formatted, `YYYY-MM-DDTHH:MM:SS.` (20
/// bytes): records written in the same second reuse it and only write
/// their milliseconds.
#[derive(Debug, Default)]
struct TimeText {
    /// The second since the epoch that `text` shows, if any yet.
    secs: Option<i64>,
    /// Its text.
    text: [u8; 24],
}

/// [`format_record`] with the date text of the last second kept in `cache`.
fn format_record_cached(r: &Record, out: &mut String, cache: &mut TimeText) {
    // Numbers and addresses are written digit by digit (itoa), not through
    // `core::fmt`: formatting was most of the cost of a record.
    out.push_str("{\"time\":\"");
    rfc3339_cached(r.time, out, cache);
    out.push_str("\",\"listener\":\"");
    json_escape(&r.listener, out);
    // A SocketAddr prints only hex digits, `.`, `:`, `[`, `]` and `%`: no
    // escaping needed.
    out.push_str("\",\"client\":\"");
    push_addr(r.client, out);
    out.push('"');
    if let Some(proxy) = r.proxy {
        out.push_str(",\"proxy\":\"");
        push_addr(proxy, out);
        out.push('"');
    }
    out.push_str(",\"worker\":");
    push_u64(r.worker as u64, out);
    out.push_str(",\"duration_ms\":");
    duration_ms(r.duration, out);
    out.push_str(",\"received\":");
    push_u64(r.received, out);
    out.push_str(",\"sent\":");
    push_u64(r.sent, out);
    out.push_str(",\"lines\":");
    push_u64(r.lines, out);
    out.push_str(",\"end\":\"");
    json_escape(r.end, out);
    out.push_str("\"}\n");
}

/// `n` in decimal.
fn push_u64(n: u64, out: &mut String) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// `n` in decimal, zero-padded to `width` (at most 4) digits.
fn push_padded(n: u64, width: usize, out: &mut String) {
    let mut digits = [b'0'; 4];
    put_padded(n, &mut digits[..width]);
    out.push_str(std::str::from_utf8(&digits[..width]).unwrap_or("0"));
}

/// A socket address as `SocketAddr` displays it; IPv4 without `core::fmt`.
fn push_addr(a: SocketAddr, out: &mut String) {
    match a {
        SocketAddr::V4(v4) => {
            for (i, octet) in v4.ip().octets().iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_u64(u64::from(*octet), out);
            }
            out.push(':');
            push_u64(u64::from(v4.port()), out);
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{a}");
        }
    }
}

/// Milliseconds with microsecond resolution: at least one decimal, trailing
/// zeros of the fraction removed (`12.5`, `0.042`, `3.0`).
fn duration_ms(d: Duration, out: &mut String) {
    let micros = d.as_micros();
    out.push_str(itoa::Buffer::new().format(micros / 1000));
    out.push('.');
    let frac = (micros % 1000) as u64;
    let (digits, width) = match frac {
        0 => (0, 1),
        f if f % 100 == 0 => (f / 100, 1),
        f if f % 10 == 0 => (f / 10, 2),
        f => (f, 3),
    };
    push_padded(digits, width, out);
}

/// Appends `s` as the inside of a JSON string: `"` and `\` escaped, control
/// characters as `\n`, `\r`, `\t`, `\b`, `\f` or `\u00XX`; everything else
/// (including non-ASCII, already valid UTF-8) as is (RFC 8259 §7).
fn json_escape(s: &str, out: &mut String) {
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(s); // the common case: nothing to escape
        return;
    }
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        // `b` is ASCII, so `i` and `i + 1` are char boundaries.
        out.push_str(&s[start..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
}

/// Appends `t` as RFC 3339 in UTC with milliseconds:
/// `2026-12-01T21:30:00.123Z`. Pure. Sub-millisecond parts are truncated
/// (floored, also before 1970); instants outside years 0000–9999, which RFC
/// 3339 cannot write, are clamped to its first or last millisecond.
pub fn rfc3339_millis(t: SystemTime, out: &mut String) {
    rfc3339_cached(t, out, &mut TimeText::default());
}

fn rfc3339_cached(t: SystemTime, out: &mut String, cache: &mut TimeText) {
    // Milliseconds since the epoch, floored.
    let ms: i128 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_millis()).min(i128::MAX as u128) as i128,
        Err(e) => {
            let nanos = e.duration().as_nanos().min(i128::MAX as u128 / 2) as i128;
            -((nanos + 999_999) / 1_000_000)
        }
    };
    // 0000-01-01T00:00:00.000Z and 9999-12-31T23:59:59.999Z.
    const MIN_MS: i128 = -62_167_219_200_000;
    const MAX_MS: i128 = 253_402_300_799_999;
    let ms = ms.clamp(MIN_MS, MAX_MS) as i64;
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    if cache.secs != Some(secs) {
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let mut at = 0;
        for (value, width, after) in [
            (y as u64, 4, b'-'),
            (u64::from(m), 2, b'-'),
            (u64::from(d), 2, b'T'),
            ((sod / 3600) as u64, 2, b':'),
            ((sod % 3600 / 60) as u64, 2, b':'),
            ((sod % 60) as u64, 2, b'.'),
        ] {
            put_padded(value, &mut cache.text[at..at + width]);
            cache.text[at + width] = after;
            at += width + 1;
        }
        cache.secs = Some(secs);
    }
    put_padded(milli as u64, &mut cache.text[20..23]);
    cache.text[23] = b'Z';
    // Only ASCII digits and separators were written.
    out.push_str(std::str::from_utf8(&cache.text).unwrap_or("0000-00-00T00:00:00.000Z"));
}

/// `n` in decimal, zero-padded to fill `dst`.
fn put_padded(mut n: u64, dst: &mut [u8]) {
    for d in dst.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Days since 1970-01-01 → (year, month 1–12, day 1–31) in the proleptic
/// Gregorian calendar. Howard Hinnant, "chrono-Compatible Low-Level Date
/// Algorithms" (<https://howardhinnant.github.io/date_algorithms.html>).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March first
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// What the writer thread is asked to do, in queue order.
enum Msg {
    /// Records of one worker's loop turn (or one [`AccessLog::log`]),
    /// formatted by the writer (so the worker spends nothing on formatting),
    /// counted in `Pending::outstanding`.
    Batch(Vec<Record>),
    /// Flush, reopen the current path (`None`) or open a new one.
    Reopen(Option<PathBuf>),
    /// Nothing: look at the out-of-band reopen flag.
    Wake,
    /// Flush everything and end the thread.
    Close,
    /// Test only: acknowledge, then wait until the gate opens (or closes).
    #[cfg(test)]
    Pause(SyncSender<()>, Receiver<()>),
}

/// State shared by the handles, the writer thread and its closer.
struct Pending {
    /// Set (SeqCst) after `path` is stored; the writer swaps it back before
    /// each message.
    flag: AtomicBool,
    /// The new path of a `reopen_at`; `None` for a plain reopen.
    path: Mutex<Option<PathBuf>>,
    /// Records handed to the writer and not yet settled (written whole or
    /// counted as dropped): queued, in its buffer, or being written. Workers
    /// add a batch at once; the writer subtracts what a `write(2)` settled.
    /// With `capacity`, the bound on what the queue and the buffer hold.
    /// A close that gives up on a blocked writer drops what is left here.
    outstanding: AtomicUsize,
    /// The queue's capacity in records.
    capacity: usize,
    /// Held while records are settled; `true` once a close gave up on the
    /// writer and counted everything outstanding as dropped: the writer
    /// settles nothing after that, so no record is counted twice.
    abandoned: Mutex<bool>,
}

/// The handle workers log through: cheap to clone (one `Arc` and a channel
/// sender), `Send` and `Sync`. Logging never blocks.
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<Msg>,
    pending: Arc<Pending>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog").finish_non_exhaustive()
    }
}

impl AccessLog {
    /// Queues a copy of `r` for the writer, as a batch of one: for callers
    /// that are not event loops. If the queue is full (or the writer has
    /// ended), it is dropped and counted. Never blocks, never touches the
    /// disk.
    pub fn log(&self, r: &Record) {
        self.log_batch(&mut vec![r.clone()]);
    }

    /// Queues every record of `batch` (leaving it empty, its capacity kept)
    /// in one message: a worker sends what ended in one loop turn at once,
    /// and the writer thread formats it, so ending a connection costs the
    /// worker a push onto a vector. If the writer already holds its capacity
    /// of records, the whole batch is dropped and counted. Never blocks.
    pub fn log_batch(&self, batch: &mut Vec<Record>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len();
        let queued = self.pending.outstanding.fetch_add(n, Ordering::Relaxed);
        let records = std::mem::replace(batch, Vec::with_capacity(batch.capacity()));
        if queued + n > self.pending.capacity || self.tx.try_send(Msg::Batch(records)).is_err() {
            self.pending.outstanding.fetch_sub(n, Ordering::Relaxed);
            self.dropped.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Asks the writer to flush and reopen its current path (logrotate:
    /// SIGUSR1 / SIGHUP). Returns at once; unless the queue is full, lines
    /// logged before it land in the old file and lines logged after it in the
    /// new one (`docs/access-log.md`, "Rotation and reload").
    pub fn reopen(&self) {
        self.request(None);
    }

    /// Asks the writer to flush and switch to `path` (`-` = stdout), for a
    /// reload that changes `access_log`. If it cannot be opened, the error is
    /// logged and the writer keeps its old file and path. Returns at once.
    pub fn reopen_at(&self, path: PathBuf) {
        self.request(Some(path));
    }

    fn request(&self, path: Option<PathBuf>) {
        match self.tx.try_send(Msg::Reopen(path)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(msg)) => {
                let Msg::Reopen(path) = msg else { return };
                {
                    let mut p = self.pending.path.lock().unwrap_or_else(|e| e.into_inner());
                    // A new path wins over a plain reopen asked before it.
                    if path.is_some() {
                        *p = path;
                    }
                }
                self.pending.flag.store(true, Ordering::SeqCst);
                // If the writer drained the queue meanwhile and sleeps, wake
                // it; if the queue is still full, it has lines to take and
                // checks the flag before each.
                let _ = self.tx.try_send(Msg::Wake);
            }
        }
    }
}

/// Owns the writer thread. [`close`](AccessLogWriter::close) (or dropping it)
/// writes and flushes everything queued before it, waiting for that at most
/// [`CLOSE_GRACE`]. Close it after the workers have stopped logging: lines
/// logged afterwards are counted as dropped.
pub struct AccessLogWriter {
    tx: SyncSender<Msg>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected when the writer thread ends (its sender is dropped).
    done: Receiver<()>,
    pending: Arc<Pending>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for AccessLogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLogWriter").finish_non_exhaustive()
    }
}

impl AccessLogWriter {
    /// [`close_within`](AccessLogWriter::close_within) [`CLOSE_GRACE`]: what
    /// shutdown calls, from the main thread after the workers ended.
    pub fn close(mut self) -> u64 {
        self.finish(CLOSE_GRACE)
    }

    /// Asks the writer to write everything queued and end, and waits for
    /// that at most `grace`. If the writer is still blocked then (a pipe
    /// nobody reads, a hung NFS mount: a `write(2)` no signal interrupts),
    /// the records it has not written whole are counted as dropped and it is
    /// left behind, to die with the process. Logs that, and the total of
    /// records dropped since start if any. Returns the records given up here.
    pub fn close_within(mut self, grace: Duration) -> u64 {
        self.finish(grace)
    }

    fn finish(&mut self, grace: Duration) -> u64 {
        let Some(thread) = self.thread.take() else {
            return 0;
        };
        let start = Instant::now();
        let deadline = start + grace;
        let (mut close_sent, mut noticed, mut ended) = (false, false, false);
        loop {
            // Close goes behind the queued batches, so all of them are
            // written first; while the queue is full, try again shortly.
            if !close_sent {
                close_sent = !matches!(self.tx.try_send(Msg::Close), Err(TrySendError::Full(_)));
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if !noticed && now - start >= CLOSE_NOTICE {
                noticed = true;
                xps_log!(
                    Level::Warning,
                    SOURCE,
                    "access log: the writer has not finished; waiting up to {} s for it \
                     (a second SIGINT/SIGTERM exits at once)",
                    grace.as_secs_f32()
                );
            }
            let step = if close_sent && noticed {
                deadline - now
            } else {
                (deadline - now).min(Duration::from_millis(10))
            };
            if let Err(RecvTimeoutError::Disconnected) | Ok(()) = self.done.recv_timeout(step) {
                ended = true;
                break;
            }
        }
        if ended {
            let _ = thread.join();
        } else {
            // Left behind, not joined: the thread ends with the process.
            drop(thread);
        }
        // Under the lock the writer settles with: if it is still running, it
        // can count nothing after this, so nothing is counted twice. What is
        // outstanding now was not written (0 unless the writer is blocked,
        // or panicked).
        let mut abandoned = self
            .pending
            .abandoned
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *abandoned = true;
        let lost = self.pending.outstanding.load(Ordering::SeqCst);
        self.pending.outstanding.fetch_sub(lost, Ordering::SeqCst);
        self.dropped.fetch_add(lost as u64, Ordering::Relaxed);
        drop(abandoned);
        if !ended {
            xps_log!(
                Level::Warning,
                SOURCE,
                "access log: the writer is still blocked after {} s (the disk or pipe takes no writes); \
                 exiting without it",
                grace.as_secs_f32()
            );
        }
        let total = self.dropped.load(Ordering::Relaxed);
        if total > 0 {
            xps_log!(
                Level::Warning,
                SOURCE,
                "access log: {total} record(s) not written, dropped"
            );
        }
        lost as u64
    }
}

impl Drop for AccessLogWriter {
    fn drop(&mut self) {
        self.finish(CLOSE_GRACE);
    }
}

/// Opens `path` (`-` = stdout) for appending and starts the writer thread with
/// a queue of [`DEFAULT_CAPACITY`] records. `dropped` counts the records that
/// could not be queued or written (for `xps_access_log_dropped_total`).
/// Errors: the file cannot be opened or created, or the thread not started.
pub fn open(path: &Path, dropped: Arc<AtomicU64>) -> io::Result<(AccessLog, AccessLogWriter)> {
    open_with_capacity(path, DEFAULT_CAPACITY, dropped)
}

/// [`open`] with a queue of `capacity` records (at least 1).
pub fn open_with_capacity(
    path: &Path,
    capacity: usize,
    dropped: Arc<AtomicU64>,
) -> io::Result<(AccessLog, AccessLogWriter)> {
    let sink = Sink::open(path)?;
    let (tx, rx) = mpsc::sync_channel(capacity.max(1));
    let pending = Arc::new(Pending {
        flag: AtomicBool::new(false),
        path: Mutex::new(None),
        outstanding: AtomicUsize::new(0),
        capacity: capacity.max(1),
        abandoned: Mutex::new(false),
    });
    let mut writer = Writer {
        sink,
        rx,
        pending: Arc::clone(&pending),
        dropped: Arc::clone(&dropped),
        buf: String::with_capacity(BUFFER_BYTES + 512),
        carry: Vec::new(),
        buf_records: 0,
        dirty_since: None,
        write_failing: false,
        time: TimeText::default(),
    };
    let (done_tx, done) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("xps-access-log".into())
        .spawn(move || {
            let _done = done_tx; // dropped when the thread ends, also by a panic
            writer.run();
        })?;
    Ok((
        AccessLog {
            tx: tx.clone(),
            pending: Arc::clone(&pending),
            dropped: Arc::clone(&dropped),
        },
        AccessLogWriter {
            tx,
            thread: Some(thread),
            done,
            pending,
            dropped,
        },
    ))
}

/// Where the lines go: a path (or stdout) and the file written to.
struct Sink {
    /// `None` for stdout.
    path: Option<PathBuf>,
    /// The file, or a duplicate of stdout (written directly, not through
    /// `io::stdout()`'s buffer and lock).
    file: File,
    /// A regular file: a torn last line can be cut off. Anything else (a
    /// pipe, a terminal) is written in pieces of at most `PIPE_BUF` bytes,
    /// which a pipe takes whole or not at all.
    regular: bool,
}

impl Sink {
    fn open(path: &Path) -> io::Result<Sink> {
        let (path, file) = if path.as_os_str() == "-" {
            (None, File::from(io::stdout().as_fd().try_clone_to_owned()?))
        } else {
            let f: File = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                .open(path)?;
            (Some(path.to_path_buf()), f)
        };
        let regular = file.metadata()?.file_type().is_file();
        Ok(Sink {
            path,
            file,
            regular,
        })
    }

    fn name(&self) -> String {
        match &self.path {
            Some(p) => format!("{p:?}"),
            None => "stdout".to_string(),
        }
    }

    /// Removes the `torn` bytes our last write left at the end of a regular
    /// file (the start of a line it could not finish), if nothing was
    /// written after them. With `O_APPEND` the offset is where our write
    /// ended; without it (stdout redirected with `>`) too, and the offset is
    /// moved back so the next write leaves no hole.
    fn cut_torn(&mut self, torn: u64) -> io::Result<()> {
        if !self.regular {
            return Err(io::Error::other("not a regular file"));
        }
        let end = self.file.stream_position()?;
        let size = self.file.metadata()?.len();
        if end != size || end < torn {
            return Err(io::Error::other("the file changed after the write"));
        }
        self.file.set_len(end - torn)?;
        self.file.seek(io::SeekFrom::Start(end - torn))?;
        Ok(())
    }
}

/// From `off`, the end of the whole lines of `bytes` that fit in `PIPE_BUF`
/// (or of the one line, if longer): a write of at most `PIPE_BUF` bytes to
/// a pipe is atomic, so a reader that stalls or goes away never gets half a
/// line.
fn pipe_chunk_end(bytes: &[u8], off: usize) -> usize {
    let limit = (off + libc::PIPE_BUF).min(bytes.len());
    if limit == bytes.len() {
        return limit;
    }
    match memchr::memrchr(b'\n', &bytes[off..limit]) {
        Some(i) => off + i + 1,
        None => memchr::memchr(b'\n', &bytes[limit..]).map_or(bytes.len(), |i| limit + i + 1),
    }
}

/// The writer thread's state.
struct Writer {
    sink: Sink,
    rx: Receiver<Msg>,
    pending: Arc<Pending>,
    dropped: Arc<AtomicU64>,
    /// Formatted lines not yet written, always whole: a `BufWriter` would
    /// hide where a short write stopped.
    buf: String,
    /// The rest of a line whose start is in the file and could not be cut
    /// off (an append-only file, another writer): the next write completes
    /// it. Bytes, as the cut may fall inside a UTF-8 character.
    carry: Vec<u8>,
    /// Records in `carry` and `buf` (lines that end in them).
    buf_records: usize,
    /// When the oldest unflushed line was written into the buffer.
    dirty_since: Option<Instant>,
    /// A write or flush failed and was logged; log again only after a success.
    write_failing: bool,
    /// The date text of the last second written.
    time: TimeText,
}

impl Writer {
    fn run(&mut self) {
        loop {
            // Idle with nothing buffered: sleep until a message, no timer.
            // With lines buffered, poll every BATCH_WINDOW instead of waiting
            // on the channel: a sender only wakes a receiver that waits, so
            // under load the workers' sends cost no futex wake-up and the
            // writer wakes at most 1 / BATCH_WINDOW times a second.
            let msg = match self.dirty_since {
                None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(_) => match self.rx.try_recv() {
                    Ok(msg) => Ok(msg),
                    Err(mpsc::TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
                    Err(mpsc::TryRecvError::Empty) => {
                        std::thread::sleep(BATCH_WINDOW);
                        Err(RecvTimeoutError::Timeout)
                    }
                },
            };
            if self.pending.flag.swap(false, Ordering::SeqCst) {
                let path = self
                    .pending
                    .path
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                self.reopen(path);
            }
            match msg {
                Ok(Msg::Batch(records)) => self.append(&records),
                Ok(Msg::Reopen(path)) => self.reopen(path),
                Ok(Msg::Wake) | Err(RecvTimeoutError::Timeout) => {}
                Ok(Msg::Close) | Err(RecvTimeoutError::Disconnected) => {
                    self.flush();
                    self.drop_buffered(); // a torn line's rest, if any
                    return;
                }
                #[cfg(test)]
                Ok(Msg::Pause(ack, gate)) => {
                    let _ = ack.send(());
                    let _ = gate.recv();
                }
            }
            if self
                .dirty_since
                .is_some_and(|t| t.elapsed() >= FLUSH_INTERVAL)
            {
                self.flush();
            }
        }
    }

    /// Formats `records` into the buffer, writing it out whenever it holds
    /// [`BUFFER_BYTES`].
    fn append(&mut self, records: &[Record]) {
        for r in records {
            format_record_cached(r, &mut self.buf, &mut self.time);
            self.buf_records += 1;
            if self.buf.len() >= BUFFER_BYTES {
                self.flush();
            }
        }
        if !self.buf.is_empty() {
            self.dirty_since.get_or_insert_with(Instant::now);
        }
    }

    /// Counts `written` records as written whole and `lost` as dropped,
    /// unless a close gave up on this thread (it counted them already).
    fn settle(&self, written: usize, lost: usize) {
        let abandoned = self
            .pending
            .abandoned
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *abandoned {
            return;
        }
        self.dropped.fetch_add(lost as u64, Ordering::Relaxed);
        self.pending
            .outstanding
            .fetch_sub(written + lost, Ordering::SeqCst);
    }

    /// Writes the buffer out. Records are settled as each `write(2)`
    /// returns, so a close that gives up on a blocked write counts exactly
    /// those not written. After a failed write, every line not written whole
    /// is dropped and counted, and half a line left in a regular file is cut
    /// off; if it cannot be, its rest stays buffered to complete it.
    fn flush(&mut self) {
        self.dirty_since = None;
        let text = std::mem::take(&mut self.buf).into_bytes();
        // The rest of a torn line goes first (rare: then one copy).
        let mut bytes = if self.carry.is_empty() {
            text
        } else {
            let mut all = std::mem::take(&mut self.carry);
            all.extend_from_slice(&text);
            all
        };
        if bytes.is_empty() {
            self.buf = String::from_utf8(bytes).unwrap_or_default();
            return;
        }
        let mut off = 0;
        let mut written = 0;
        let mut error = None;
        while off < bytes.len() {
            let end = if self.sink.regular {
                bytes.len()
            } else {
                pipe_chunk_end(&bytes, off)
            };
            match self.sink.file.write(&bytes[off..end]) {
                Ok(0) => {
                    error = Some(io::Error::from(io::ErrorKind::WriteZero));
                    break;
                }
                Ok(n) => {
                    let whole = memchr::memchr_iter(b'\n', &bytes[off..off + n]).count();
                    off += n;
                    if whole > 0 {
                        written += whole;
                        self.settle(whole, 0);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = error {
            let whole_end = memchr::memrchr(b'\n', &bytes[..off]).map_or(0, |i| i + 1);
            let torn = off - whole_end;
            if torn > 0
                && let Err(cut) = self.sink.cut_torn(torn as u64)
            {
                // Keep the line's rest: the next write completes it.
                let line_end =
                    memchr::memchr(b'\n', &bytes[off..]).map_or(bytes.len(), |i| off + i + 1);
                self.carry = bytes[off..line_end].to_vec();
                // Expected on a pipe; on a file, said once per failing spell.
                if self.sink.regular && !self.write_failing {
                    xps_log!(
                        Level::Error,
                        SOURCE,
                        "cannot cut half a line off access log {}: {}",
                        self.sink.name(),
                        crate::os_reason(&cut)
                    );
                }
            }
            let kept = usize::from(!self.carry.is_empty());
            self.settle(0, self.buf_records - written - kept);
            self.buf_records = kept;
            self.failed("write to", &e);
        } else {
            self.buf_records = 0;
            self.write_failing = false;
        }
        // The allocation is reused.
        bytes.clear();
        self.buf = String::from_utf8(bytes).unwrap_or_default();
        if !self.carry.is_empty() {
            self.dirty_since = Some(Instant::now());
        }
    }

    /// Drops and counts what is still buffered (the rest of a torn line):
    /// it belongs to the file being left.
    fn drop_buffered(&mut self) {
        if self.buf_records > 0 {
            self.settle(0, self.buf_records);
        }
        self.buf.clear();
        self.carry.clear();
        self.buf_records = 0;
        self.dirty_since = None;
    }

    fn failed(&mut self, what: &str, e: &io::Error) {
        if !self.write_failing {
            self.write_failing = true;
            xps_log!(
                Level::Error,
                SOURCE,
                "cannot {what} access log {}: {} (lines are dropped and counted until it works again)",
                self.sink.name(),
                crate::os_reason(e)
            );
        }
    }

    /// Flushes into the old file, then opens `path` (or the current path
    /// again) and switches to it; on failure logs once and keeps the old one.
    fn reopen(&mut self, path: Option<PathBuf>) {
        self.flush();
        let target = match path.or_else(|| self.sink.path.clone()) {
            Some(p) => p,
            None => return, // stdout stays stdout
        };
        match Sink::open(&target) {
            Ok(sink) => {
                // What could not be written to the old file is dropped and
                // counted by now (but the rest of a torn line, dropped here).
                self.drop_buffered();
                self.sink = sink;
                self.write_failing = false;
            }
            Err(e) => xps_log!(
                Level::Error,
                SOURCE,
                "cannot open access log {target:?}: {}; still writing to {}",
                crate::os_reason(&e),
                self.sink.name()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn batches_are_written_in_order_and_bounded_in_records() {
        let dir = std::env::temp_dir().join(format!("xps-alog-batch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.log");
        let dropped = Arc::new(AtomicU64::new(0));
        let (log, writer) = open_with_capacity(&path, 3, dropped.clone()).unwrap();
        let rec = |lines| Record {
            time: UNIX_EPOCH,
            listener: "l".into(),
            client: "127.0.0.1:1".parse().unwrap(),
            proxy: None,
            worker: 0,
            duration: Duration::ZERO,
            received: 0,
            sent: 0,
            lines,
            end: "finished",
        };
        let mut batch = vec![rec(1), rec(2)];
        log.log_batch(&mut batch);
        assert!(batch.is_empty());
        // 2 queued (or written already) + 2 more may exceed the capacity of
        // 3 records: then the whole batch is dropped and counted.
        let mut more = vec![rec(3), rec(4)];
        log.log_batch(&mut more);
        writer.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let written: Vec<u64> = text
            .lines()
            .map(|l| {
                l.split("\"lines\":")
                    .nth(1)
                    .unwrap()
                    .split(',')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        let lost = dropped.load(Ordering::Relaxed);
        assert!(
            written == [1, 2] && lost == 2 || written == [1, 2, 3, 4] && lost == 0,
            "{written:?} {lost}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn rfc(t: SystemTime) -> String {
        let mut s = String::new();
        rfc3339_millis(t, &mut s);
        s
    }

    fn record() -> Record {
        Record {
            time: at(1_796_160_600_123),
            listener: Arc::from("0.0.0.0:8001"),
            client: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)), 51234),
            proxy: None,
            worker: 0,
            duration: Duration::from_micros(12_500),
            received: 120,
            sent: 120,
            lines: 2,
            end: "finished",
        }
    }

    fn fmt(r: &Record) -> String {
        let mut s = String::new();
        format_record(r, &mut s);
        s
    }

    #[test]
    fn spec_example_exact() {
        assert_eq!(
            fmt(&record()),
            "{\"time\":\"2026-12-01T21:30:00.123Z\",\"listener\":\"0.0.0.0:8001\",\
             \"client\":\"203.0.113.7:51234\",\"worker\":0,\"duration_ms\":12.5,\
             \"received\":120,\"sent\":120,\"lines\":2,\"end\":\"finished\"}\n"
        );
    }

    #[test]
    fn proxy_and_ipv6() {
        let mut r = record();
        r.client = SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)),
            443,
        );
        r.proxy = Some("10.0.0.2:40000".parse().unwrap());
        r.worker = 3;
        r.end = "proxy_header";
        r.duration = Duration::from_micros(42);
        r.received = 0;
        r.sent = 0;
        r.lines = 0;
        assert_eq!(
            fmt(&r),
            "{\"time\":\"2026-12-01T21:30:00.123Z\",\"listener\":\"0.0.0.0:8001\",\
             \"client\":\"[2001:db8::7]:443\",\"proxy\":\"10.0.0.2:40000\",\"worker\":3,\
             \"duration_ms\":0.042,\"received\":0,\"sent\":0,\"lines\":0,\"end\":\"proxy_header\"}\n"
        );
    }

    #[test]
    fn listener_is_escaped() {
        let mut r = record();
        r.listener = Arc::from("a\"b\n");
        let s = fmt(&r);
        assert!(s.contains(r#""listener":"a\"b\n","#), "{s}");
        let mut r = record();
        r.listener = Arc::from("\\\t\r\u{8}\u{c}\u{1}\u{1f}é\u{7f}");
        let s = fmt(&r);
        assert!(s.contains(r#""listener":"\\\t\r\b\f\u0001\u001fé"#), "{s}");
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["listener"], "\\\t\r\u{8}\u{c}\u{1}\u{1f}é\u{7f}");
    }

    #[test]
    fn output_is_valid_json_with_the_same_values() {
        let mut r = record();
        r.listener = Arc::from("[::1]:8001 \"x\"");
        r.proxy = Some("[::1]:9".parse().unwrap());
        let s = fmt(&r);
        assert!(s.ends_with("}\n") && s.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["listener"], "[::1]:8001 \"x\"");
        assert_eq!(v["proxy"], "[::1]:9");
        assert_eq!(v["duration_ms"].as_f64(), Some(12.5));
        assert_eq!(v["lines"], 2);
    }

    #[test]
    fn duration_forms() {
        let d = |us: u64| {
            let mut s = String::new();
            duration_ms(Duration::from_micros(us), &mut s);
            s
        };
        assert_eq!(d(0), "0.0");
        assert_eq!(d(3_000), "3.0");
        assert_eq!(d(12_500), "12.5");
        assert_eq!(d(12_560), "12.56");
        assert_eq!(d(12_567), "12.567");
        assert_eq!(d(1), "0.001");
        assert_eq!(d(10), "0.01");
        assert_eq!(d(100), "0.1");
        assert_eq!(d(86_400_000_000), "86400000.0");
        let mut s = String::new();
        duration_ms(Duration::from_nanos(999), &mut s); // truncated
        assert_eq!(s, "0.0");
        let mut s = String::new();
        duration_ms(Duration::MAX, &mut s); // no panic, no overflow
        assert!(s.starts_with("18446744073709551615"), "{s}");
    }

    #[test]
    fn the_cached_date_text_equals_a_fresh_one() {
        let mut cache = TimeText::default();
        for ms in [
            1_796_160_600_123u64,
            1_796_160_600_999,
            1_796_160_601_000,
            1_796_160_600_001, // back in time
            1_796_247_000_000, // a day later
            0,
        ] {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            let (mut cached, mut fresh) = (String::new(), String::new());
            rfc3339_cached(t, &mut cached, &mut cache);
            rfc3339_millis(t, &mut fresh);
            assert_eq!(cached, fresh, "{ms}");
        }
    }

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc(at(1_796_160_600_123)), "2026-12-01T21:30:00.123Z");
        assert_eq!(rfc(at(951_868_799_999)), "2000-02-29T23:59:59.999Z");
        assert_eq!(rfc(at(951_868_800_000)), "2000-03-01T00:00:00.000Z");
        assert_eq!(rfc(at(1_709_208_000_000)), "2024-02-29T12:00:00.000Z");
        assert_eq!(rfc(at(4_107_542_400_000)), "2100-03-01T00:00:00.000Z");
        assert_eq!(rfc(at(4_107_542_399_000)), "2100-02-28T23:59:59.000Z");
        assert_eq!(rfc(at(253_402_300_799_999)), "9999-12-31T23:59:59.999Z");
        // Sub-millisecond parts are truncated.
        assert_eq!(
            rfc(UNIX_EPOCH + Duration::from_nanos(1_999_999)),
            "1970-01-01T00:00:00.001Z"
        );
    }

    #[test]
    fn rfc3339_before_epoch_and_clamped() {
        assert_eq!(
            rfc(UNIX_EPOCH - Duration::from_nanos(1)),
            "1969-12-31T23:59:59.999Z"
        );
        assert_eq!(
            rfc(UNIX_EPOCH - Duration::from_millis(1000)),
            "1969-12-31T23:59:59.000Z"
        );
        assert_eq!(
            rfc(UNIX_EPOCH - Duration::from_secs(2_208_988_800)),
            "1900-01-01T00:00:00.000Z"
        );
        assert_eq!(
            rfc(UNIX_EPOCH + Duration::from_secs(400 * 366 * 86_400 * 100)),
            "9999-12-31T23:59:59.999Z"
        );
        assert_eq!(
            rfc(UNIX_EPOCH - Duration::from_secs(400 * 366 * 86_400 * 100)),
            "0000-01-01T00:00:00.000Z"
        );
    }

    /// Every day from 1600-03-01 to 2500 against a naive day-by-day calendar.
    #[test]
    fn civil_from_days_matches_a_naive_calendar() {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let len = |y: i64, m: u32| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        // 1600-03-01 is day -135080 (checked against Python's datetime).
        let mut days = -135_080_i64;
        let (mut y, mut m, mut d) = (1600_i64, 3_u32, 1_u32);
        assert_eq!(civil_from_days(days), (y, m, d));
        while y < 2500 {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            days += 1;
            d += 1;
            if d > len(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
    }

    fn tmpdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "xps-alog-{}-{name}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn lines_of(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn numbered(n: u64) -> Record {
        let mut r = record();
        r.lines = n;
        r
    }

    fn line_numbers(path: &Path) -> Vec<u64> {
        lines_of(path)
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["lines"].as_u64().unwrap()
            })
            .collect()
    }

    #[test]
    fn open_error_is_returned() {
        let dropped = Arc::new(AtomicU64::new(0));
        let err = open(Path::new("/nonexistent-xps-dir/a.log"), dropped).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn created_with_mode_0640() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tmpdir("mode");
        let path = dir.join("a.log");
        let (_log, w) = open(&path, Arc::new(AtomicU64::new(0))).unwrap();
        w.close();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o640, 0, "mode {mode:o}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn lines_appear_within_a_second_without_close() {
        let dir = tmpdir("flush");
        let path = dir.join("a.log");
        let (log, w) = open(&path, Arc::new(AtomicU64::new(0))).unwrap();
        let start = Instant::now();
        log.log(&numbered(1));
        while lines_of(&path).is_empty() && start.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let waited = start.elapsed();
        assert_eq!(line_numbers(&path), vec![1]);
        assert!(waited < Duration::from_millis(2500), "{waited:?}");
        w.close();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn close_flushes_everything_and_appends() {
        let dir = tmpdir("close");
        let path = dir.join("a.log");
        std::fs::write(&path, "old\n").unwrap();
        let dropped = Arc::new(AtomicU64::new(0));
        let (log, w) = open(&path, Arc::clone(&dropped)).unwrap();
        let clones: Vec<_> = (0..4).map(|_| log.clone()).collect();
        let threads: Vec<_> = clones
            .into_iter()
            .enumerate()
            .map(|(t, l)| {
                std::thread::spawn(move || {
                    for i in 0..500 {
                        l.log(&numbered(t as u64 * 1000 + i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        w.close();
        assert_eq!(dropped.load(Ordering::Relaxed), 0);
        let all = lines_of(&path);
        assert_eq!(all[0], "old");
        assert_eq!(all.len(), 2001);
        let mut nums: Vec<u64> = all[1..]
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["lines"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        nums.sort_unstable();
        let want: Vec<u64> = (0..4)
            .flat_map(|t| (0..500).map(move |i| t * 1000 + i))
            .collect();
        assert_eq!(nums, want);
        // Logging after close drops and counts, never blocks or panics.
        log.log(&numbered(9));
        log.reopen();
        assert_eq!(dropped.load(Ordering::Relaxed), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn rename_then_reopen_starts_a_fresh_file() {
        let dir = tmpdir("rotate");
        let path = dir.join("a.log");
        let rotated = dir.join("a.log.1");
        let (log, w) = open(&path, Arc::new(AtomicU64::new(0))).unwrap();
        for i in 0..3 {
            log.log(&numbered(i));
        }
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        for i in 3..5 {
            log.log(&numbered(i));
        }
        w.close();
        assert_eq!(line_numbers(&rotated), vec![0, 1, 2]);
        assert_eq!(line_numbers(&path), vec![3, 4]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn reopen_at_moves_to_a_new_path() {
        let dir = tmpdir("move");
        let a = dir.join("a.log");
        let b = dir.join("b.log");
        let (log, w) = open(&a, Arc::new(AtomicU64::new(0))).unwrap();
        log.log(&numbered(0));
        log.reopen_at(b.clone());
        log.log(&numbered(1));
        // A plain reopen now reopens the new path.
        log.reopen();
        log.log(&numbered(2));
        w.close();
        assert_eq!(line_numbers(&a), vec![0]);
        assert_eq!(line_numbers(&b), vec![1, 2]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn reopen_at_unwritable_path_keeps_the_old_file() {
        let dir = tmpdir("keep");
        let a = dir.join("a.log");
        let (log, w) = open(&a, Arc::new(AtomicU64::new(0))).unwrap();
        log.log(&numbered(0));
        log.reopen_at(PathBuf::from("/nonexistent-xps-dir/b.log"));
        log.log(&numbered(1));
        // The old path is still the current one.
        std::fs::rename(&a, dir.join("a.log.1")).unwrap();
        log.reopen();
        log.log(&numbered(2));
        w.close();
        assert_eq!(line_numbers(&dir.join("a.log.1")), vec![0, 1]);
        assert_eq!(line_numbers(&a), vec![2]);
        assert!(!Path::new("/nonexistent-xps-dir").exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Stops the writer thread until the returned sender is dropped.
    fn pause(w: &AccessLogWriter) -> SyncSender<()> {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        let (gate_tx, gate_rx) = mpsc::sync_channel(1);
        w.tx.send(Msg::Pause(ack_tx, gate_rx)).unwrap();
        ack_rx.recv().unwrap();
        gate_tx
    }

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let dir = tmpdir("full");
        let path = dir.join("a.log");
        let dropped = Arc::new(AtomicU64::new(0));
        let (log, w) = open_with_capacity(&path, 4, Arc::clone(&dropped)).unwrap();
        let gate = pause(&w);
        let start = Instant::now();
        for i in 0..1000 {
            log.log(&numbered(i));
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(dropped.load(Ordering::Relaxed), 996);
        drop(gate);
        w.close();
        assert_eq!(line_numbers(&path), vec![0, 1, 2, 3]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn reopen_on_a_full_queue_still_happens() {
        let dir = tmpdir("fullreopen");
        let a = dir.join("a.log");
        let b = dir.join("b.log");
        let dropped = Arc::new(AtomicU64::new(0));
        let (log, w) = open_with_capacity(&a, 2, Arc::clone(&dropped)).unwrap();
        let gate = pause(&w);
        log.log(&numbered(0));
        log.log(&numbered(1));
        let start = Instant::now();
        log.reopen_at(b.clone()); // queue full: out of band, never blocks
        assert!(start.elapsed() < Duration::from_secs(1));
        drop(gate);
        // The writer takes the request before the queued lines.
        log.log(&numbered(2)); // may be dropped if the queue is still full
        w.close();
        let in_b = line_numbers(&b);
        assert!(line_numbers(&a).is_empty());
        let d = dropped.load(Ordering::Relaxed);
        assert!(in_b.len() as u64 + d == 3, "{in_b:?} dropped {d}");
        assert_eq!(&in_b[..2], &[0, 1]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn close_gives_up_on_a_blocked_writer_and_counts_what_it_holds() {
        let dir = tmpdir("blocked");
        let path = dir.join("a.log");
        let dropped = Arc::new(AtomicU64::new(0));
        let (log, w) = open_with_capacity(&path, 8, Arc::clone(&dropped)).unwrap();
        log.log(&numbered(0));
        // Blocked behind the first record's batch, as in a write(2) that
        // never returns.
        let gate = pause(&w);
        for i in 1..20 {
            log.log(&numbered(i)); // 7 queued, 12 dropped: the queue is full
        }
        assert_eq!(dropped.load(Ordering::Relaxed), 12);
        let start = Instant::now();
        let lost = w.close_within(Duration::from_millis(300));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        // The first record (buffered, not written) and the 7 queued.
        assert_eq!(lost, 8);
        assert_eq!(dropped.load(Ordering::Relaxed), 20);
        // The writer, unblocked later, counts nothing twice.
        drop(gate);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(dropped.load(Ordering::Relaxed), 20);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn pipe_chunks_are_whole_lines_of_at_most_pipe_buf() {
        let line = |n: usize| {
            let mut l = "x".repeat(n - 1);
            l.push('\n');
            l
        };
        let text = line(100).repeat(100);
        let bytes = text.as_bytes();
        let mut off = 0;
        let mut chunks = 0;
        while off < bytes.len() {
            let end = pipe_chunk_end(bytes, off);
            assert!(end - off <= libc::PIPE_BUF && bytes[end - 1] == b'\n');
            assert_eq!(
                end - off,
                (libc::PIPE_BUF / 100 * 100).min(bytes.len() - off)
            );
            off = end;
            chunks += 1;
        }
        assert_eq!(chunks, 10_000usize.div_ceil(libc::PIPE_BUF / 100 * 100));
        // A line longer than PIPE_BUF goes alone; a short tail whole.
        let long = [line(5000), line(10)].concat();
        assert_eq!(pipe_chunk_end(long.as_bytes(), 0), 5000);
        assert_eq!(pipe_chunk_end(long.as_bytes(), 5000), 5010);
        // From the middle of a line (after a write cut short by a signal).
        assert_eq!(pipe_chunk_end(long.as_bytes(), 4990), 5010);
        let three = line(5000).repeat(3);
        assert_eq!(pipe_chunk_end(three.as_bytes(), 4000), 5000);
    }

    /// A writer on `file` driven by hand (no thread), and its counters.
    fn writer_on(file: File, regular: bool) -> (Writer, Arc<Pending>, Arc<AtomicU64>) {
        let (_tx, rx) = mpsc::sync_channel(1);
        let pending = Arc::new(Pending {
            flag: AtomicBool::new(false),
            path: Mutex::new(None),
            outstanding: AtomicUsize::new(0),
            capacity: 8,
            abandoned: Mutex::new(false),
        });
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            sink: Sink {
                path: None,
                file,
                regular,
            },
            rx,
            pending: Arc::clone(&pending),
            dropped: Arc::clone(&dropped),
            buf: String::new(),
            carry: Vec::new(),
            buf_records: 0,
            dirty_since: None,
            write_failing: false,
            time: TimeText::default(),
        };
        (writer, pending, dropped)
    }

    #[test]
    fn a_torn_line_is_cut_off_a_regular_file_unless_another_wrote_after_it() {
        let dir = tmpdir("cut");
        let path = dir.join("a.log");
        let open = || {
            OpenOptions::new()
                .append(true)
                .create(true)
                .open(&path)
                .unwrap()
        };
        let mut sink = Sink {
            path: None,
            file: open(),
            regular: true,
        };
        sink.file.write_all(b"whole\nhal").unwrap();
        sink.cut_torn(3).unwrap();
        sink.file.write_all(b"next\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"whole\nnext\n");
        sink.file.write_all(b"hal").unwrap();
        open().write_all(b"other\n").unwrap();
        assert!(sink.cut_torn(3).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"whole\nnext\nhalother\n");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A line longer than PIPE_BUF cut short on a non-blocking pipe: its
    /// rest is kept and completes it at the next flush; nothing is counted
    /// as dropped, nothing twice.
    #[test]
    fn the_rest_of_a_torn_line_that_cannot_be_cut_completes_it() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors, owned just below.
        assert_eq!(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) },
            0
        );
        // SAFETY: fresh descriptors from pipe2, each owned once.
        let (mut rd, wr) = unsafe {
            use std::os::fd::FromRawFd;
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        };
        // SAFETY: fcntl on a descriptor this test owns.
        assert!(unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 4096) } > 0);
        let (mut w, pending, dropped) = writer_on(wr, false);
        let mut r = record();
        r.listener = Arc::from("l".repeat(6000).as_str());
        let line = fmt(&r);
        pending.outstanding.store(1, Ordering::SeqCst);
        w.append(std::slice::from_ref(&r));
        w.flush(); // 4096 bytes go, then EAGAIN
        let mut got = vec![0; 8192];
        let n = rd.read(&mut got).unwrap();
        assert!(n < line.len(), "{n}");
        assert_eq!(
            (
                pending.outstanding.load(Ordering::SeqCst),
                dropped.load(Ordering::SeqCst)
            ),
            (1, 0)
        );
        w.flush(); // the rest
        let m = rd.read(&mut got[n..]).unwrap();
        assert_eq!(&got[..n + m], line.as_bytes());
        assert_eq!(
            (
                pending.outstanding.load(Ordering::SeqCst),
                dropped.load(Ordering::SeqCst)
            ),
            (0, 0)
        );
        assert!(w.buf.is_empty() && w.carry.is_empty() && w.buf_records == 0);
    }

    proptest::proptest! {
        /// Any listener string round-trips through the JSON, and the line
        /// stays one line.
        #[test]
        fn any_listener_round_trips(listener in "\\PC*|[\\x00-\\x7f]*", ms in 0u64..400_000_000_000_000) {
            let mut r = record();
            r.listener = Arc::from(listener.as_str());
            r.time = at(ms);
            let s = fmt(&r);
            proptest::prop_assert_eq!(s.matches('\n').count(), 1);
            let v: serde_json::Value = serde_json::from_str(&s).unwrap();
            proptest::prop_assert_eq!(v["listener"].as_str(), Some(listener.as_str()));
            proptest::prop_assert_eq!(v["time"].as_str().map(str::len), Some(24));
        }
    }

    #[test]
    fn handle_is_clone_send_sync() {
        fn ok<T: Clone + Send + Sync>() {}
        ok::<AccessLog>();
        fn send<T: Send>() {}
        send::<AccessLogWriter>();
    }
}
