//! eXpServer's `xps_connection`: one accepted TCP connection and its I/O.
//!
//! | C tutorial                       | here                                    |
//! |----------------------------------|-----------------------------------------|
//! | `xps_connection_create()`        | [`Connection::new`] (the core attaches it)|
//! | `xps_connection_destroy()`       | removing it from the core's slab (drop closes the fd and detaches it) |
//! | `xps_connection_read_handler()`  | [`Connection::drive`]                   |
//! | `remote_ip`                      | logged at accept, not stored            |
//!
//! # What a connection keeps, and why so little
//!
//! An idle connection owns no buffer at all: bytes are read into the loop's
//! shared [`Scratch::read`] buffer and replies are built in the loop's shared
//! [`Scratch::out`] buffer. Only what must outlive one readiness event stays
//! here: the unterminated line (inside the [`LineReverser`]) and the replies
//! the socket would not take yet (`pending`). The C tutorial's 100 KB buffer
//! per connection would be 1 GB at 10 000 connections; here an idle
//! connection is this struct (`size_of::<Connection>()`, checked by a unit
//! test to stay within [`IDLE_BYTES_BOUND`]) plus the slab entry and the
//! kernel's socket.
//!
//! # Its life, as one state
//!
//! [`Phase`] says where a connection is: [`Phase::Open`] while it serves,
//! [`Phase::Draining`] while a shutdown lets it read only what had already
//! arrived, [`Phase::InputDone`] once nothing more will be read (the client
//! half-closed, or the drain is complete) and the last replies go out, and
//! [`Phase::Lingering`] after our side is shut during a shutdown. Flow control
//! ([`Flow`]) and the socket's readiness ([`Readiness`]) are separate, because
//! they change independently of the phase.
//!
//! # One pass of [`Connection::drive`]
//!
//! 1. **Read** while the socket is readable: `recv()` into the shared buffer,
//!    feed the bytes to the protocol, which appends whole replies to the shared
//!    output buffer. Stop at `WouldBlock`, or at a *short read* (fewer bytes
//!    than asked proves the kernel buffer is empty, so the `WouldBlock` call
//!    would be a wasted syscall — unless the peer's FIN or urgent data was
//!    announced, in which case read on: a read stops short at the FIN and at
//!    the urgent mark with data still queued, and a read *at* the mark can
//!    even return `WouldBlock` with data queued, so that one is checked with
//!    `FIONREAD`), or at the read budget (the core
//!    drives this connection again next turn, after the others), or when the
//!    pending replies reach the high-water mark (flow control), or at the
//!    global buffer budget's allowance (`--max-buffered`: [`Flow::Rationed`]
//!    until the core finds the budget allows it again).
//! 2. **Write once**: every reply of this pass in one `send()`. If nothing was
//!    pending before, it is sent straight from the shared buffer and only an
//!    unsent tail is copied into `pending` — so a request/response client never
//!    makes the connection allocate. A short write means the socket buffer is
//!    full: wait for the next writable edge.
//! 3. **Flow control**: a client that sends without reading stops being read
//!    once `pending` passes [`HIGH_WATER`]; its data waits in the kernel (TCP
//!    then pushes back on the client). It is read again when `pending` drains
//!    below [`LOW_WATER`].
//! 4. **Close** when the peer has half-closed and every reply is sent, or on a
//!    read/write error (a reset peer is an ordinary close).

use std::fmt;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;

use crate::admission::Holding;
use crate::core::Timeouts;
use crate::network::proxy_header::{HeaderReader, ProxyError, ProxyHeader};
use crate::observe::metrics::Refused;
use crate::protocol::LineReverser;
use crate::slots::Slot;

/// Pending replies at which a connection stops being read (SPEC §3: 1 MiB).
pub const HIGH_WATER: usize = 1 << 20;
/// Pending replies below which a paused connection is read again.
pub const LOW_WATER: usize = HIGH_WATER / 4;
/// Bytes read from one connection per pass before the others get their turn.
pub const READ_BUDGET: usize = 256 * 1024;
/// Size of the shared read buffer: one `recv()` takes at most this much.
pub const READ_CHUNK: usize = 64 * 1024;
/// A drained `pending` buffer larger than this is freed, not kept.
const KEEP_CAPACITY: usize = 64 * 1024;
/// Upper bound on `size_of::<Connection>()`, the per-connection cost of an
/// idle client in user space (a unit test holds the struct to it).
pub const IDLE_BYTES_BOUND: usize = 256;
/// How long a connection on a PROXY listener may take to send its header
/// (SPEC §6).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Reads retried in one pass after a `WouldBlock` that left bytes queued
/// (see [`spurious_would_block`]); then the core drives the
/// connection again next turn, so nothing can spin.
const SPURIOUS_RETRIES: u32 = 4;

/// Buffers shared by every connection of one event loop.
pub struct Scratch {
    /// Where every `recv()` lands.
    pub read: Box<[u8]>,
    /// Replies built during one pass, before they are sent; empty between
    /// passes.
    pub out: Vec<u8>,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            read: vec![0; READ_CHUNK].into_boxed_slice(),
            out: Vec::with_capacity(READ_BUDGET + READ_CHUNK),
        }
    }
}

/// Why a connection ended.
#[derive(Debug)]
pub enum CloseReason {
    /// The peer half-closed and got every reply.
    Finished,
    /// The peer reset the connection or stopped reading for good (ECONNRESET,
    /// EPIPE): an ordinary end for a network server.
    Reset(io::Error),
    /// Another socket error.
    Failed(io::Error),
    /// The server is shutting down and every reply is sent.
    Shutdown,
    /// No byte moved either way for `--idle-timeout`; with `stalled_writer`,
    /// replies were waiting for a client that read none of them (nginx's
    /// `send_timeout`).
    IdleTimeout {
        /// Replies were pending.
        stalled_writer: bool,
        /// The timeout.
        after: Duration,
    },
    /// An unterminated line was not completed within `--line-timeout` of
    /// reading (nginx's `client_body_timeout`, for a line service).
    LineTimeout {
        /// The timeout.
        after: Duration,
    },
    /// Turned away before it was served (SPEC §6): counted and logged as a
    /// refusal, not a close.
    Refused(RefuseReason),
}

/// Why a connection was refused (SPEC §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// An access rule denied the client.
    Denied,
    /// The client's source holds `--max-connections-per-source` already.
    PerSourceLimit,
    /// The PROXY header was not received as it must be.
    Header(HeaderFailure),
}

/// What was wrong with a PROXY-protocol connection's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderFailure {
    /// The bytes can never become a valid header.
    Malformed(ProxyError),
    /// The client closed before the header was complete (or sent none).
    Closed,
    /// Not complete within [`HEADER_TIMEOUT`].
    Timeout,
    /// The peer is not in `--proxy-from`.
    Untrusted,
}

impl RefuseReason {
    /// The refusal as the metrics and the access log count it.
    pub fn kind(self) -> Refused {
        match self {
            RefuseReason::Denied => Refused::Denied,
            RefuseReason::PerSourceLimit => Refused::PerSourceLimit,
            RefuseReason::Header(_) => Refused::ProxyHeader,
        }
    }
}

impl From<crate::admission::Refusal> for RefuseReason {
    fn from(r: crate::admission::Refusal) -> RefuseReason {
        match r {
            crate::admission::Refusal::Denied => RefuseReason::Denied,
            crate::admission::Refusal::PerSourceLimit => RefuseReason::PerSourceLimit,
        }
    }
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefuseReason::Denied => f.write_str("denied by the access rules"),
            RefuseReason::PerSourceLimit => f.write_str("per-source connection limit reached"),
            RefuseReason::Header(HeaderFailure::Malformed(e)) => {
                write!(f, "bad PROXY header ({e})")
            }
            RefuseReason::Header(HeaderFailure::Closed) => {
                f.write_str("closed before a complete PROXY header")
            }
            RefuseReason::Header(HeaderFailure::Timeout) => write!(
                f,
                "no complete PROXY header within {} s",
                HEADER_TIMEOUT.as_secs()
            ),
            RefuseReason::Header(HeaderFailure::Untrusted) => {
                f.write_str("peer not allowed by --proxy-from to send PROXY headers")
            }
        }
    }
}

/// What reading a PROXY-protocol connection's header gave.
#[derive(Debug)]
pub enum HeaderStep {
    /// Not complete yet: wait for the next readable edge (or the deadline).
    Waiting,
    /// Not complete yet, and bytes may remain unread (a spurious
    /// `WouldBlock` persisted): drive again next turn.
    More,
    /// Complete: `scratch.read[rest]` are the client's first bytes, to be
    /// passed to [`Connection::begin_serving`] once admitted.
    Done {
        /// The header.
        header: ProxyHeader,
        /// Where the client's bytes lie in the shared read buffer.
        rest: std::ops::Range<usize>,
    },
    /// Refused or failed: close for this reason.
    Failed(CloseReason),
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Finished => f.write_str("peer closed, all replies sent"),
            CloseReason::Reset(e) => write!(f, "peer went away ({e})"),
            CloseReason::Failed(e) => write!(f, "socket error ({e})"),
            CloseReason::Shutdown => f.write_str("server shutting down"),
            CloseReason::IdleTimeout {
                stalled_writer: false,
                after,
            } => write!(f, "idle for {} s", after.as_secs()),
            CloseReason::IdleTimeout {
                stalled_writer: true,
                after,
            } => write!(f, "client read nothing for {} s", after.as_secs()),
            CloseReason::LineTimeout { after } => {
                write!(f, "line not completed within {} s", after.as_secs())
            }
            CloseReason::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

/// What the core should do after a pass.
#[derive(Debug)]
pub enum Status {
    /// Wait for the next readiness event.
    Idle,
    /// Data may remain unread (budget spent, or reading resumed after a
    /// flow-control pause): drive again next turn.
    More,
    /// The global buffer budget (`--max-buffered`) stopped reading with
    /// data possibly left: the core drives it again when the budget allows.
    Rationed,
    /// Remove the connection.
    Close(CloseReason),
}

/// What a connection's deadlines say when one comes due.
#[derive(Debug)]
pub enum Deadline {
    /// A timeout ran out: close for this reason.
    Expired(CloseReason),
    /// Nothing ran out; look again at this time.
    Next(Instant),
    /// No deadline applies (no timeout is configured that could run).
    None,
}

/// Where a connection is in its life (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving: reading (unless flow control pauses it) and answering.
    Open,
    /// The server is shutting down: read only the `unread` bytes that had
    /// reached the kernel when it began (`FIONREAD` then), answer them.
    Draining {
        /// Bytes of that count not read yet.
        unread: u32,
    },
    /// Nothing more will be read. Once every reply is sent, `then` says what
    /// follows.
    InputDone {
        /// Close at once (the client half-closed while serving), or linger
        /// (shutdown).
        then: AfterReplies,
    },
    /// Shutdown, every reply handed to the kernel and our side shut (FIN
    /// queued): waiting until the client has them (see [`Connection::linger`]).
    Lingering,
}

/// What follows the last reply of a connection that reads no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterReplies {
    /// Close: the client half-closed and has every reply.
    Close,
    /// Lingering close (shutdown).
    Linger,
}

/// Whether the client's input is being read, and if not, what holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Reading.
    Reading,
    /// Paused by flow control: [`HIGH_WATER`] of replies wait for the client.
    Paused,
    /// Held by the global buffer budget (`--max-buffered`) with input left
    /// unread: the core drives it again once the budget allows.
    Rationed,
}

/// What the edges have told us about the socket (edge-triggered epoll
/// reports each change once, so the connection must remember it).
#[derive(Debug, Clone, Copy)]
pub struct Readiness {
    /// The last edge said readable and no read has since found it empty.
    readable: bool,
    /// The socket can take more bytes, as far as we know.
    writable: bool,
    /// epoll reported the peer's FIN (EPOLLRDHUP) or urgent data (EPOLLPRI):
    /// a read can stop short with data or the EOF still queued, so read on
    /// to `WouldBlock` instead of trusting a short read — and confirm that
    /// `WouldBlock` with `FIONREAD` (see
    /// [`spurious_would_block`]).
    read_past_short: bool,
}

/// How long the current unterminated line has been held while xps was
/// reading from the connection (`--line-timeout`; time paused by flow
/// control or held by the global buffer budget does not count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineClock {
    /// No unterminated line is held.
    Clear,
    /// A line is held and the clock runs: it would have run out at `due`.
    Running {
        /// When the line times out if nothing changes.
        due: Instant,
    },
    /// A line is held but reading is paused or rationed: `left` of the
    /// timeout remains.
    Stopped {
        /// What remains of the timeout.
        left: Duration,
    },
}

/// What moved on a connection, for the access log and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Bytes read from the client and given to the reverser: a PROXY
    /// header's bytes are the balancer's and are not counted, so a finished
    /// connection has received = sent.
    pub received: u64,
    /// Bytes written to the client.
    pub sent: u64,
    /// Replies appended (lines and overlong segments).
    pub lines: u64,
}

impl Totals {
    /// What moved between `earlier` and `self`.
    pub fn since(self, earlier: Totals) -> Totals {
        Totals {
            received: self.received - earlier.received,
            sent: self.sent - earlier.sent,
            lines: self.lines - earlier.lines,
        }
    }

    /// Adds `other` to `self`.
    pub fn add(&mut self, other: Totals) {
        self.received += other.received;
        self.sent += other.sent;
        self.lines += other.lines;
    }
}

/// One client connection.
#[derive(Debug)]
pub struct Connection {
    /// The non-blocking socket, registered edge-triggered for both directions.
    stream: TcpStream,
    /// Unique over the worker's lifetime; slab keys are reused, ids are not,
    /// so timers and deferred work can tell a new connection from an old one.
    pub id: u64,
    /// Protocol state: the unterminated line.
    reverser: LineReverser,
    /// Replies the socket has not taken yet, from `sent` on.
    pending: Vec<u8>,
    /// How much of `pending` is already sent (`pending` stays far below
    /// 4 GiB: flow control stops reading at 1 MiB).
    sent: u32,
    /// The kernel's send queue (`TIOCOUTQ`) when the socket last refused
    /// bytes; a smaller queue later means the client read (slow-reader
    /// progress that raises no epoll event).
    send_queue: u32,
    /// Last time a byte was received or sent (for the idle timeout).
    pub last_active: Instant,
    /// The `--line-timeout` clock of the unterminated line.
    line: LineClock,
    /// What the edges said.
    ready: Readiness,
    /// Where the connection is in its life.
    phase: Phase,
    /// Flow control.
    flow: Flow,
    /// Bytes and replies moved so far.
    pub totals: Totals,
    /// Times flow control paused reading (for the metrics; wraps).
    pub pauses: u32,
    /// Queued in the core's deferred list: queued at most once per turn,
    /// however many edges and passes ask for it.
    pub queued: bool,
    /// On a PROXY listener, until the header is complete: the reader and
    /// the deadline. `Some` is the header phase; nothing is answered in it.
    header: Option<Box<AwaitingHeader>>,
    /// The `--max-connections` slot this connection holds; released when the
    /// connection is dropped, however that happens.
    _slot: Slot,
}

/// The header phase of a connection on a PROXY listener.
#[derive(Debug)]
struct AwaitingHeader {
    /// The bytes of an incomplete header.
    reader: HeaderReader,
    /// When it is refused if still incomplete.
    due: Instant,
}

impl Connection {
    /// `xps_connection_create()` without the attach: the core registers the
    /// socket with its loop using the slab key as token.
    pub fn new(stream: TcpStream, slot: Slot, id: u64, max_line: usize, now: Instant) -> Self {
        Connection {
            stream,
            id,
            reverser: LineReverser::new(max_line),
            pending: Vec::new(),
            sent: 0,
            send_queue: 0,
            last_active: now,
            line: LineClock::Clear,
            ready: Readiness {
                readable: false,
                writable: true,
                read_past_short: false,
            },
            phase: Phase::Open,
            flow: Flow::Reading,
            totals: Totals::default(),
            pauses: 0,
            queued: false,
            header: None,
            _slot: slot,
        }
    }

    /// Starts the header phase (a PROXY listener): nothing is answered
    /// until [`read_header`](Self::read_header) gives a header, which must
    /// come by `due`.
    pub fn expect_header(&mut self, due: Instant) {
        self.header = Some(Box::new(AwaitingHeader {
            reader: HeaderReader::new(),
            due,
        }));
    }

    /// Whether the connection is in its header phase.
    pub fn awaiting_header(&self) -> bool {
        self.header.is_some()
    }

    /// The header deadline, during the header phase.
    pub fn header_due(&self) -> Option<Instant> {
        self.header.as_ref().map(|h| h.due)
    }

    /// Bytes held for this client in user space: unsent replies, the
    /// unterminated line and an incomplete PROXY header (for the global
    /// budget, `--max-buffered`).
    pub fn held(&self) -> usize {
        self.pending_len()
            + self.reverser.pending()
            + self.header.as_ref().map_or(0, |h| h.reader.buffered())
    }

    /// What it holds, as the global budget's rule asks it.
    pub fn holding(&self) -> Holding {
        Holding {
            bytes: self.held(),
            line: self.reverser.pending(),
            max_line: self.reverser.max_line(),
        }
    }

    /// The header phase's read: reads into the shared buffer and feeds the
    /// header reader until it has a header, the socket is drained, or the
    /// bytes can never be a header. The bytes after a complete header are
    /// left in `scratch.read` for [`begin_serving`](Self::begin_serving).
    pub fn read_header(&mut self, scratch: &mut Scratch) -> HeaderStep {
        let refuse = |why| HeaderStep::Failed(CloseReason::Refused(RefuseReason::Header(why)));
        let Some(waiting) = self.header.as_mut() else {
            return HeaderStep::Waiting; // not in the header phase: never asked
        };
        if !self.ready.readable {
            return HeaderStep::Waiting;
        }
        let mut retries = 0;
        loop {
            match self.stream.read(&mut scratch.read) {
                Ok(0) => return refuse(HeaderFailure::Closed),
                Ok(n) => match waiting.reader.feed(&scratch.read[..n]) {
                    Ok(Some((header, start))) => {
                        self.header = None;
                        if n < scratch.read.len() && !self.ready.read_past_short {
                            self.ready.readable = false;
                        }
                        return HeaderStep::Done {
                            header,
                            rest: start.min(n)..n,
                        };
                    }
                    Ok(None) if n < scratch.read.len() && !self.ready.read_past_short => {
                        self.ready.readable = false;
                        return HeaderStep::Waiting;
                    }
                    Ok(None) => {}
                    Err(e) => return refuse(HeaderFailure::Malformed(e)),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if spurious_would_block(&self.ready, &self.stream) {
                        retries += 1;
                        if retries <= SPURIOUS_RETRIES {
                            continue;
                        }
                        return HeaderStep::More;
                    }
                    self.ready.readable = false;
                    self.ready.read_past_short = false;
                    return HeaderStep::Waiting;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return HeaderStep::Failed(classify(e)),
            }
        }
    }

    /// After an admitted header: the client's first bytes (`rest`, read
    /// with the header) are answered like any others, into `out`; the core
    /// then drives the connection as usual, which sends them.
    pub fn begin_serving(
        &mut self,
        rest: &[u8],
        out: &mut Vec<u8>,
        now: Instant,
        line_timeout: Option<Duration>,
    ) {
        self.last_active = now;
        if rest.is_empty() {
            return;
        }
        self.totals.received += rest.len() as u64;
        let replies = self.reverser.feed(rest, out);
        self.totals.lines += replies as u64;
        if let Some(timeout) = line_timeout {
            self.restart_line_clock(replies > 0, now, timeout);
        }
    }

    /// Records what an epoll event reported.
    pub fn note_event(&mut self, event: &Event) {
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.ready.readable = true;
        }
        if event.is_read_closed() || event.is_error() || event.is_priority() {
            self.ready.readable = true;
            self.ready.read_past_short = true;
        }
        if event.is_writable() || event.is_write_closed() || event.is_error() {
            self.ready.writable = true;
        }
    }

    /// Where the connection is in its life.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Bytes of replies waiting for the socket.
    pub fn pending_len(&self) -> usize {
        self.pending.len() - self.sent as usize
    }

    /// Whether replies are waiting for the socket.
    pub fn has_pending(&self) -> bool {
        self.pending_len() > 0
    }

    /// When the unterminated line times out, if its clock runs.
    pub fn line_due(&self) -> Option<Instant> {
        match self.line {
            LineClock::Running { due } => Some(due),
            _ => None,
        }
    }

    /// Looks at the idle and line deadlines at `now` (called when the
    /// core's heap says one may be due). The idle timeout counts from the
    /// last byte moved — or, for a client with replies pending, from the
    /// last time its kernel send queue was seen to shrink.
    pub fn check_deadlines(&mut self, now: Instant, timeouts: Timeouts) -> Deadline {
        let header_due = self.header_due();
        if header_due.is_some_and(|due| due <= now) {
            return Deadline::Expired(CloseReason::Refused(RefuseReason::Header(
                HeaderFailure::Timeout,
            )));
        }
        let line_due = match self.phase {
            Phase::Open => self.line_due(),
            _ => None,
        };
        if let (Some(due), Some(after)) = (line_due, timeouts.line)
            && due <= now
        {
            return Deadline::Expired(CloseReason::LineTimeout { after });
        }
        let idle_due = timeouts.idle.map(|after| {
            let due = self.last_active + after;
            if due <= now && self.has_pending() && self.reader_progressed() {
                self.last_active = now;
                return (now + after, after);
            }
            (due, after)
        });
        if let Some((due, after)) = idle_due
            && due <= now
        {
            return Deadline::Expired(CloseReason::IdleTimeout {
                stalled_writer: self.has_pending(),
                after,
            });
        }
        let next = [idle_due.map(|(due, _)| due), line_due, header_due]
            .into_iter()
            .flatten()
            .min();
        match next {
            Some(t) => Deadline::Next(t),
            None => Deadline::None,
        }
    }

    /// Whether the client read some of its replies since the socket last
    /// refused bytes: the kernel's send queue shrank. Progress of a slow
    /// reader raises no epoll event until a third of the send buffer is free,
    /// so the idle timeout asks here before it cuts a client with replies
    /// pending (SPEC §3: a client that reads, however slowly, is never cut).
    pub fn reader_progressed(&mut self) -> bool {
        let queue = unsent_bytes(&self.stream);
        let progressed = queue < self.send_queue;
        self.send_queue = queue;
        progressed
    }

    /// Shutdown: read only what had reached the kernel by now (even if flow
    /// control must pause and resume to get through it), answer it, then
    /// close. Bytes sent after this moment are not answered, nor is an
    /// unterminated last line (the client has not finished it) — unless the
    /// client's half-close is among what had arrived: then the EOF is read
    /// and the last line answered.
    pub fn begin_shutdown(&mut self) {
        if self.phase != Phase::Open {
            return; // already reading no more
        }
        self.line = LineClock::Clear;
        let unread = unread_bytes(&self.stream);
        self.phase = Phase::Draining {
            unread: unread as u32,
        };
        if unread == 0 {
            let mut out = Vec::new();
            self.end_drain(&mut out);
            // A half-close seen now completes an unterminated line.
            self.pending.extend_from_slice(&out);
        } else {
            self.ready.readable = true;
        }
    }

    /// Every byte counted at shutdown is read: the input ends here. If the
    /// client's FIN is next in the queue, it arrived before the shutdown
    /// too, so the unterminated line is finished and answered.
    fn end_drain(&mut self, out: &mut Vec<u8>) {
        if peer_closed(&self.stream) {
            self.totals.lines += self.reverser.finish(out) as u64;
        }
        self.phase = Phase::InputDone {
            then: AfterReplies::Linger,
        };
    }

    /// `xps_connection_read_handler()`, generalised: one read–write pass (see
    /// the module docs). `scratch.out` is empty before and after.
    pub fn drive(
        &mut self,
        scratch: &mut Scratch,
        now: Instant,
        line_timeout: Option<Duration>,
    ) -> Status {
        self.drive_capped(scratch, now, line_timeout, usize::MAX)
    }

    /// [`drive`](Self::drive), reading at most `allowance` bytes (the
    /// global budget's, [`crate::admission::BudgetView::allowance`]): a
    /// pass stopped by it returns [`Status::Rationed`] rather than
    /// [`Status::More`], so the core retries it when the budget allows,
    /// not on every turn. Until then the connection is
    /// [`Flow::Rationed`], and its line clock stands still.
    pub fn drive_capped(
        &mut self,
        scratch: &mut Scratch,
        now: Instant,
        line_timeout: Option<Duration>,
        allowance: usize,
    ) -> Status {
        let mut more = false;
        let mut rationed = false;
        let mut moved = 0;
        if self.flow == Flow::Rationed && allowance > 0 {
            self.resume(now); // the budget allows it again
        }
        let reads = matches!(self.phase, Phase::Open | Phase::Draining { .. });
        if reads && self.ready.readable && self.flow == Flow::Reading && self.header.is_none() {
            match self.read_pass(scratch, now, line_timeout, allowance) {
                Ok((m, r, n)) => (more, rationed, moved) = (m, r, n),
                Err(reason) => {
                    scratch.out.clear();
                    return Status::Close(reason);
                }
            }
        }
        let flushed = self.flush(scratch);
        // Whatever happened, nothing of this connection's may stay in the
        // shared buffer: the next connection driven would send it.
        scratch.out.clear();
        match flushed {
            Ok(n) => {
                moved += n;
                self.totals.sent += n as u64;
            }
            Err(reason) => return Status::Close(reason),
        }
        if moved > 0 {
            self.last_active = now;
        }
        if self.flow == Flow::Paused && self.pending_len() <= LOW_WATER {
            self.resume(now);
            more |= self.ready.readable;
        }
        if rationed && self.ready.readable && self.flow == Flow::Reading {
            // Input is left unread because of the budget, not the client.
            self.stop_line_clock(now);
            self.flow = Flow::Rationed;
        }
        match self.phase {
            Phase::InputDone { then } if !self.has_pending() => match then {
                AfterReplies::Close => Status::Close(CloseReason::Finished),
                AfterReplies::Linger => self.linger(&mut scratch.read),
            },
            Phase::Lingering => self.linger(&mut scratch.read),
            _ if more => Status::More,
            _ if self.flow == Flow::Rationed => Status::Rationed,
            _ => Status::Idle,
        }
    }

    /// Reads until the socket is drained, the budget is spent, flow control
    /// pauses reading or `allowance` bytes are read. Returns whether to come
    /// back for more next turn, whether the allowance stopped it, and the
    /// bytes read.
    fn read_pass(
        &mut self,
        scratch: &mut Scratch,
        now: Instant,
        line_timeout: Option<Duration>,
        allowance: usize,
    ) -> Result<(bool, bool, usize), CloseReason> {
        let mut total = 0usize;
        let mut rationed = false;
        let mut retries = 0;
        let result = loop {
            if self.pending_len() + scratch.out.len() >= HIGH_WATER {
                self.pause(now);
                break Ok(false);
            }
            if total >= READ_BUDGET {
                break Ok(true);
            }
            if total >= allowance {
                rationed = true;
                break Ok(false);
            }
            // In a shutdown, read no further than what had arrived by then;
            // never past the budget's allowance.
            let want = match self.phase {
                Phase::Draining { unread } => (unread as usize).min(scratch.read.len()),
                _ => scratch.read.len(),
            }
            .min(allowance - total);
            match self.stream.read(&mut scratch.read[..want]) {
                Ok(0) => {
                    self.ready.readable = false;
                    self.totals.lines += self.reverser.finish(&mut scratch.out) as u64;
                    self.phase = Phase::InputDone {
                        then: match self.phase {
                            Phase::Draining { .. } => AfterReplies::Linger,
                            _ => AfterReplies::Close,
                        },
                    };
                    self.line = LineClock::Clear;
                    break Ok(false);
                }
                Ok(n) => {
                    total += n;
                    self.totals.received += n as u64;
                    let replies = self.reverser.feed(&scratch.read[..n], &mut scratch.out);
                    self.totals.lines += replies as u64;
                    if let (Some(timeout), Phase::Open) = (line_timeout, self.phase) {
                        self.restart_line_clock(replies > 0, now, timeout);
                    }
                    if let Phase::Draining { unread } = &mut self.phase {
                        *unread -= n as u32;
                        if *unread == 0 {
                            self.end_drain(&mut scratch.out);
                            break Ok(false);
                        }
                    }
                    if n < want && !self.ready.read_past_short {
                        self.ready.readable = false;
                        break Ok(false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if spurious_would_block(&self.ready, &self.stream) {
                        retries += 1;
                        if retries <= SPURIOUS_RETRIES {
                            continue;
                        }
                        break Ok(true); // still readable: next turn
                    }
                    self.ready.readable = false;
                    self.ready.read_past_short = false;
                    break Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(classify(e)),
            }
        };
        result.map(|more| (more, rationed, total))
    }

    /// After a read: the line clock runs from the read that left a new
    /// unterminated line (one that followed a reply, or the first bytes),
    /// and stops when no line is held.
    fn restart_line_clock(&mut self, replied: bool, now: Instant, timeout: Duration) {
        if self.reverser.pending() == 0 {
            self.line = LineClock::Clear;
        } else if replied || self.line == LineClock::Clear {
            self.line = LineClock::Running { due: now + timeout };
        }
    }

    /// Flow control stops reading; the line clock stops with it.
    fn pause(&mut self, now: Instant) {
        self.flow = Flow::Paused;
        self.pauses = self.pauses.wrapping_add(1);
        self.stop_line_clock(now);
    }

    /// Reading stops, for flow control or the budget: time not spent
    /// reading is not the client's to account for (SPEC §3).
    fn stop_line_clock(&mut self, now: Instant) {
        if let LineClock::Running { due } = self.line {
            self.line = LineClock::Stopped {
                left: due.saturating_duration_since(now),
            };
        }
    }

    /// Reading resumes after a flow-control pause or the budget's hold; so
    /// does the line clock, with what was left of it.
    fn resume(&mut self, now: Instant) {
        self.flow = Flow::Reading;
        if let LineClock::Stopped { left } = self.line {
            self.line = LineClock::Running { due: now + left };
        }
    }

    /// The end of a graceful shutdown, nginx's "lingering close". Closing a
    /// socket whose receive queue holds data makes the kernel send a reset,
    /// which destroys replies not yet delivered, and a client still sending
    /// would keep refilling that queue. So: shut our side (the FIN follows
    /// the replies), read and drop what the client sends, and close once the
    /// client has closed too, or once it has acknowledged every reply and
    /// sent nothing new. The core drives lingering connections every few
    /// milliseconds during shutdown, and closes what remains at the end of
    /// the grace period.
    pub fn linger(&mut self, buf: &mut [u8]) -> Status {
        if self.phase != Phase::Lingering {
            self.phase = Phase::Lingering;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        loop {
            match self.stream.read(buf) {
                Ok(0) => return Status::Close(CloseReason::Shutdown),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Status::Close(classify(e)),
            }
        }
        if unsent_bytes(&self.stream) == 0 {
            Status::Close(CloseReason::Shutdown)
        } else {
            Status::Idle
        }
    }

    /// Sends this pass's replies (and any older pending ones) with at most one
    /// `send()`; keeps what the socket did not take. Returns the bytes sent.
    /// The caller clears `scratch.out` afterwards, on success and on error.
    fn flush(&mut self, scratch: &mut Scratch) -> Result<usize, CloseReason> {
        let n = if !scratch.out.is_empty() && !self.has_pending() && self.ready.writable {
            // The common case: nothing queued, so send straight from the
            // shared buffer and copy only a tail the socket refused.
            let n = write_once(&mut self.stream, &scratch.out, &mut self.ready.writable)?;
            if n < scratch.out.len() {
                self.pending.clear();
                self.sent = 0;
                self.pending.extend_from_slice(&scratch.out[n..]);
            }
            n
        } else {
            if !scratch.out.is_empty() {
                if self.sent > 0 {
                    self.pending.drain(..self.sent as usize);
                    self.sent = 0;
                }
                self.pending.extend_from_slice(&scratch.out);
            }
            if !self.has_pending() || !self.ready.writable {
                return Ok(0);
            }
            let n = write_once(
                &mut self.stream,
                &self.pending[self.sent as usize..],
                &mut self.ready.writable,
            )?;
            self.sent += n as u32;
            if self.sent as usize == self.pending.len() {
                self.pending.clear();
                self.sent = 0;
                if self.pending.capacity() > KEEP_CAPACITY {
                    self.pending = Vec::new();
                }
            }
            n
        };
        if !self.ready.writable {
            // The socket refused bytes: remember how full its queue is, so a
            // client that reads slowly can be seen to progress.
            self.send_queue = unsent_bytes(&self.stream);
        }
        Ok(n)
    }
}

/// Whether a `WouldBlock` from `recv()` lied: bytes are still queued.
/// Linux's `tcp_recvmsg` returns `EAGAIN` at the urgent mark, nothing read,
/// whenever a signal is pending on the thread (SIGSTOP/SIGCONT from a
/// shell, a debugger attaching …); taken for "drained", the bytes from the
/// mark on would wait for an edge that never comes. The signal is taken as
/// the call returns, so a retry reads them. A read can start at the mark
/// only after urgent data was announced: epoll reports EPOLLPRI in every
/// event while urgent data is unread, and `read_past_short` stays set until
/// a `WouldBlock` is confirmed here. So the common path (no urgent data)
/// trusts `WouldBlock` without asking `FIONREAD`.
fn spurious_would_block(ready: &Readiness, stream: &TcpStream) -> bool {
    ready.read_past_short && unread_bytes(stream) > 0
}

/// Bytes waiting in the socket's receive queue (`ioctl(FIONREAD)`).
fn unread_bytes(stream: &TcpStream) -> usize {
    queue_len(stream, libc::FIONREAD) as usize
}

/// Bytes sent but not yet acknowledged by the peer, or not yet sent
/// (`ioctl(TIOCOUTQ)`, a.k.a. SIOCOUTQ).
fn unsent_bytes(stream: &TcpStream) -> u32 {
    queue_len(stream, libc::TIOCOUTQ)
}

/// One of the socket queue-length ioctls; 0 if the call fails.
fn queue_len(stream: &TcpStream, request: libc::Ioctl) -> u32 {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD and TIOCOUTQ write one c_int through the pointer,
    // which points to a live local.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), request, &mut n) };
    if rc == 0 { n.max(0) as u32 } else { 0 }
}

/// Whether the next thing in the receive queue is the peer's FIN: a
/// non-blocking one-byte `MSG_PEEK` that returns 0. Data (sent after the
/// shutdown began) or nothing at all both say no; nothing is consumed.
fn peer_closed(stream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a valid fd and a valid one-byte buffer.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

/// One `send()` of `data` (retried on EINTR). A short write or `WouldBlock`
/// clears `writable`: the next writable edge will say when to go on.
fn write_once(
    stream: &mut TcpStream,
    data: &[u8],
    writable: &mut bool,
) -> Result<usize, CloseReason> {
    loop {
        match stream.write(data) {
            Ok(n) => {
                if n < data.len() {
                    *writable = false;
                }
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *writable = false;
                return Ok(0);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(classify(e)),
        }
    }
}

fn classify(e: io::Error) -> CloseReason {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => CloseReason::Reset(e),
        _ => CloseReason::Failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_connection_stays_small() {
        let size = std::mem::size_of::<Connection>();
        assert!(size <= IDLE_BYTES_BOUND, "Connection is {size} bytes");
    }

    #[test]
    fn close_reasons_read_as_sentences() {
        let after = Duration::from_secs(7);
        assert_eq!(
            CloseReason::Finished.to_string(),
            "peer closed, all replies sent"
        );
        assert_eq!(
            CloseReason::IdleTimeout {
                stalled_writer: true,
                after
            }
            .to_string(),
            "client read nothing for 7 s"
        );
        assert_eq!(
            CloseReason::LineTimeout { after }.to_string(),
            "line not completed within 7 s"
        );
    }
}
