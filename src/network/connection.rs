//! eXpServer's `xps_connection`: one accepted TCP connection and its I/O.
//!
//! | C tutorial                       | here                          |
//! |----------------------------------|-------------------------------|
//! | `xps_connection_create()`        | [`Connection::create`]        |
//! | `xps_connection_destroy()`       | [`Connection::destroy`]       |
//! | `xps_connection_read_handler()`  | [`Connection::read_handler`]  |
//! | `xps_connection_write_handler()` (a later stage) | [`Connection::write_handler`] |
//!
//! Edge-triggered: the read handler reads until `WouldBlock` (or a short
//! read proves the socket drained); the write handler sends once and keeps
//! what the socket refused for its next writable edge. An idle connection
//! owns no buffer (reads land in the loop's shared [`Scratch`]), and a client
//! that sends without reading is paused at [`HIGH_WATER`]. No time, metrics
//! or admission here: the worker (`core`) keeps the timers and asks the
//! features. `docs/lifetime-of-a-connection.md` walks one connection through.

use std::io::{self, Read};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Token};

use crate::event_loop::LoopHandle;
use crate::network::io::{self as sock, CloseReason};
use crate::protocol::LineReverser;
use crate::slots::Slot;
use crate::utils::logger::Level;
use crate::xps_log;

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
/// Reads retried in one pass after a `WouldBlock` that left bytes queued
/// ([`spurious_would_block`]); then the connection is driven again next
/// turn, so nothing can spin.
const SPURIOUS_RETRIES: u32 = 4;

/// Buffers shared by every connection of one event loop.
pub struct Scratch {
    /// Where every `recv()` lands.
    pub read: Box<[u8]>,
    /// Replies built during one pass, before they are sent; empty between
    /// passes (bytes left here would go to the next connection).
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

/// Where a connection is in its life.
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
    /// Nothing more will be read; once every reply is sent, `then` follows.
    InputDone {
        /// Close (the client half-closed) or linger (shutdown).
        then: AfterReplies,
    },
    /// Shutdown: every reply handed to the kernel and our side shut (FIN
    /// queued); waiting until the client has them ([`Connection::linger`]).
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

/// Flow control: whether the client's input is being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Reading.
    Reading,
    /// Paused: [`HIGH_WATER`] of replies wait for the client.
    Paused,
}

/// What the edges have told us about the socket (edge-triggered epoll
/// reports each change once, so the connection remembers it).
#[derive(Debug, Clone, Copy)]
struct Readiness {
    /// The last edge said readable and no read has since found it empty.
    readable: bool,
    /// The socket can take more bytes, as far as we know.
    writable: bool,
    /// epoll reported the peer's FIN (EPOLLRDHUP) or urgent data (EPOLLPRI):
    /// a read can stop short with data or the EOF still queued, so read on
    /// to `WouldBlock` instead of trusting a short read.
    read_past_short: bool,
}

/// What one [`Connection::handle`] did, for the worker's timers and queues
/// and for the features that count.
#[derive(Debug, Default)]
pub struct Pass {
    /// Bytes read from the client.
    pub received: usize,
    /// Bytes written to the client.
    pub sent: usize,
    /// Replies made: complete lines and segments of overlong ones.
    pub replies: usize,
    /// Flow control paused reading during the pass.
    pub paused: bool,
    /// What the worker does next.
    pub next: Next,
}

/// What the worker does with a connection after a pass.
#[derive(Debug, Default)]
pub enum Next {
    /// Wait for the next readiness event.
    #[default]
    Wait,
    /// Data may remain unread (the read budget is spent, or reading resumed
    /// after a flow-control pause): drive it again once the other ready
    /// connections had their pass.
    Again,
    /// The caller's allowance stopped reading with data possibly left: drive
    /// it again when the caller allows more.
    OutOfAllowance,
    /// Destroy it.
    Close(CloseReason),
}

/// What one raw read gave ([`Connection::read_raw`]).
#[derive(Debug)]
pub enum RawRead {
    /// `n` bytes are in the buffer.
    Data(usize),
    /// Nothing more to read until the next readable edge.
    Drained,
    /// Bytes are queued but the kernel would not give them yet (see
    /// [`spurious_would_block`]): read again next turn.
    Again,
    /// The client closed its side.
    Closed,
    /// The socket failed.
    Failed(CloseReason),
}

/// A connection's state apart from its socket, as plain data: what moves
/// with the socket when another process takes the connection over (SPEC
/// §7). Only a connection that is serving moves ([`Connection::movable`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The unterminated line.
    pub partial: Vec<u8>,
    /// Replies the socket has not taken yet.
    pub pending: Vec<u8>,
    /// Its `--max-line`.
    pub max_line: u32,
    /// The client half-closed: nothing more is read; close once the
    /// replies are sent.
    pub input_done: bool,
    /// Flow control paused reading.
    pub paused: bool,
    /// The kernel's send queue when the socket last refused bytes (the
    /// same socket moves, so it stays meaningful).
    pub send_queue: u32,
}

/// One client connection.
#[derive(Debug)]
pub struct Connection {
    /// The non-blocking socket, registered edge-triggered for both directions.
    stream: TcpStream,
    /// Unique over the worker's lifetime; slab keys are reused, ids are not.
    pub id: u64,
    /// Protocol state: the unterminated line.
    reverser: LineReverser,
    /// Replies the socket has not taken yet, from `sent` on.
    pending: Vec<u8>,
    /// How much of `pending` is sent (`pending` stays far below 4 GiB: flow
    /// control stops reading at 1 MiB).
    sent: u32,
    /// The kernel's send queue (`TIOCOUTQ`) when the socket last refused
    /// bytes; a smaller queue later means the client read.
    send_queue: u32,
    /// What the edges said.
    ready: Readiness,
    /// Where it is in its life.
    phase: Phase,
    /// Flow control.
    flow: Flow,
    /// Its `--max-connections` slot, given back when the connection drops.
    _slot: Slot,
}

impl Connection {
    /// `xps_connection_create()`: attaches an accepted socket to the loop
    /// under `token` (the worker's slab key). TCP_NODELAY and SO_OOBINLINE
    /// come from the listening socket.
    pub fn create(
        mut stream: TcpStream,
        slot: Slot,
        id: u64,
        max_line: usize,
        handle: &LoopHandle,
        token: Token,
    ) -> io::Result<Connection> {
        let interest = Interest::READABLE | Interest::WRITABLE | Interest::PRIORITY;
        handle.attach(&mut stream, token, interest)?;
        Ok(Connection {
            stream,
            id,
            reverser: LineReverser::new(max_line),
            pending: Vec::new(),
            sent: 0,
            send_queue: 0,
            ready: Readiness {
                readable: false,
                writable: true,
                read_past_short: false,
            },
            phase: Phase::Open,
            flow: Flow::Reading,
            _slot: slot,
        })
    }

    /// Whether the connection can move to another process as it is: it is
    /// serving (open, or its client half-closed and replies remain). A
    /// connection that drains or lingers exists only inside a shutdown and
    /// finishes where it is.
    pub fn movable(&self) -> bool {
        matches!(
            self.phase,
            Phase::Open
                | Phase::InputDone {
                    then: AfterReplies::Close
                }
        )
    }

    /// Takes a [`movable`](Self::movable) connection apart to move it: its
    /// socket, detached from this loop explicitly (another process holds
    /// the same socket, so closing ours would not remove it from epoll), and
    /// its state. Its slot is given back here.
    pub fn take_apart(mut self, handle: &LoopHandle) -> (std::os::fd::OwnedFd, Snapshot) {
        let _ = handle.detach(&mut self.stream);
        let sent = self.sent as usize;
        let mut pending = std::mem::take(&mut self.pending);
        if sent > 0 {
            pending.drain(..sent);
        }
        let snapshot = Snapshot {
            partial: self.reverser.take_partial(),
            pending,
            max_line: self.reverser.max_line().min(u32::MAX as usize) as u32,
            input_done: self.phase != Phase::Open,
            paused: self.flow == Flow::Paused,
            send_queue: self.send_queue,
        };
        (self.stream.into(), snapshot)
    }

    /// A connection moved from another process: attaches `stream` under
    /// `token` like [`create`](Self::create), with the state it had there.
    /// It is driven at once: the moved replies are written first, then
    /// whatever the client sent meanwhile (it waited in the kernel) is read.
    pub fn restore(
        stream: TcpStream,
        state: Snapshot,
        slot: Slot,
        id: u64,
        handle: &LoopHandle,
        token: Token,
    ) -> io::Result<Connection> {
        let mut conn =
            Connection::create(stream, slot, id, state.max_line as usize, handle, token)?;
        conn.reverser = LineReverser::resume(state.max_line as usize, state.partial);
        conn.pending = state.pending;
        conn.send_queue = state.send_queue;
        // Unknown readiness: try both ways once; a short read is not
        // trusted until a `WouldBlock` confirms it.
        conn.ready = Readiness {
            readable: !state.input_done,
            writable: true,
            read_past_short: true,
        };
        if state.input_done {
            conn.phase = Phase::InputDone {
                then: AfterReplies::Close,
            };
        }
        if state.paused {
            conn.flow = Flow::Paused;
        }
        Ok(conn)
    }

    /// `xps_connection_destroy()`: dropping the socket closes it (which also
    /// detaches it from epoll) and gives its slot back.
    pub fn destroy(self, reason: &dyn std::fmt::Display) {
        xps_log!(
            Level::Debug,
            "xps_connection_destroy()",
            "closed connection #{}: {}",
            self.id,
            reason
        );
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

    /// One pass on a ready connection: the read handler (at most
    /// `allowance` bytes), then the write handler, then what comes next.
    #[inline]
    pub fn handle(&mut self, scratch: &mut Scratch, allowance: usize) -> Pass {
        let mut pass = Pass::default();
        let reads = matches!(self.phase, Phase::Open | Phase::Draining { .. });
        if reads && self.ready.readable && self.flow == Flow::Reading {
            self.read_handler(scratch, allowance, &mut pass);
        }
        if !matches!(pass.next, Next::Close(_)) {
            self.write_handler(scratch, &mut pass);
        }
        // Nothing of this connection's may stay in the shared buffer.
        scratch.out.clear();
        if matches!(pass.next, Next::Close(_)) {
            return pass;
        }
        if self.flow == Flow::Paused && self.pending_len() <= LOW_WATER {
            self.flow = Flow::Reading;
            trace(
                "xps_connection_write_handler()",
                self.id,
                "flow control: replies drained, reading again",
            );
            if self.ready.readable {
                pass.next = Next::Again;
            }
        }
        match self.phase {
            Phase::InputDone { then } if self.pending_len() == 0 => {
                pass.next = match then {
                    AfterReplies::Close => Next::Close(CloseReason::Finished),
                    AfterReplies::Linger => self.linger(&mut scratch.read),
                }
            }
            Phase::Lingering => pass.next = self.linger(&mut scratch.read),
            _ => {}
        }
        pass
    }

    /// `xps_connection_read_handler()`: reads what the client sent and
    /// answers every complete line into `scratch.out`, until the socket is
    /// drained, flow control pauses it, or the read budget or `allowance`
    /// is spent.
    #[inline(always)]
    pub fn read_handler(&mut self, scratch: &mut Scratch, allowance: usize, pass: &mut Pass) {
        let mut retries = 0;
        loop {
            if self.pending_len() + scratch.out.len() >= HIGH_WATER {
                self.flow = Flow::Paused;
                pass.paused = true;
                trace(
                    READ,
                    self.id,
                    "flow control: 1 MiB of replies wait, reading paused",
                );
                return;
            }
            if pass.received >= READ_BUDGET {
                pass.next = Next::Again; // the others' turn; more next turn
                return;
            }
            if pass.received >= allowance {
                pass.next = Next::OutOfAllowance;
                return;
            }
            // In a shutdown, read no further than what had arrived by then.
            let want = match self.phase {
                Phase::Draining { unread } => unread as usize,
                _ => usize::MAX,
            }
            .min(scratch.read.len())
            .min(allowance - pass.received);
            match self.stream.read(&mut scratch.read[..want]) {
                Ok(0) => {
                    trace(READ, self.id, "read: end of input (the client half-closed)");
                    pass.replies += self.reverser.finish(&mut scratch.out);
                    self.end_input(AfterReplies::Close);
                    return;
                }
                Ok(n) => {
                    pass.received += n;
                    let replies = self.reverser.feed(&scratch.read[..n], &mut scratch.out);
                    pass.replies += replies;
                    trace_read(self.id, n, replies);
                    if self.drained_to_mark(n, &mut scratch.out, pass) {
                        return;
                    }
                    if n < want && !self.ready.read_past_short {
                        self.ready.readable = false; // a short read: drained
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if spurious_would_block(self.ready.read_past_short, &self.stream) {
                        retries += 1;
                        if retries <= SPURIOUS_RETRIES {
                            continue;
                        }
                        pass.next = Next::Again; // still readable: next turn
                        return;
                    }
                    trace(READ, self.id, "read: WouldBlock");
                    self.ready.readable = false;
                    self.ready.read_past_short = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    pass.next = Next::Close(sock::classify(e));
                    return;
                }
            }
        }
    }

    /// `xps_connection_write_handler()`: sends this pass's replies (and any
    /// older ones) with at most one `send()`, and keeps what the socket did
    /// not take for its next writable edge.
    #[inline(always)]
    pub fn write_handler(&mut self, scratch: &mut Scratch, pass: &mut Pass) {
        let out = &scratch.out;
        if self.pending_len() == 0 {
            // The common case: send straight from the shared buffer, and
            // keep only a tail the socket refused.
            match self.send(out) {
                Ok(n) if n < out.len() => {
                    self.pending.clear();
                    self.sent = 0;
                    self.pending.extend_from_slice(&out[n..]);
                    pass.sent += n;
                }
                Ok(n) => pass.sent += n,
                Err(reason) => pass.next = Next::Close(reason),
            }
            return;
        }
        // Older replies wait: these go behind them.
        if !out.is_empty() {
            self.pending.drain(..self.sent as usize);
            self.sent = 0;
            self.pending.extend_from_slice(out);
        }
        match self.send_pending() {
            Ok(n) => pass.sent += n,
            Err(reason) => pass.next = Next::Close(reason),
        }
    }

    /// Sends what `pending` holds from `sent` on, once; frees a large buffer
    /// once it is all sent.
    fn send_pending(&mut self) -> Result<usize, CloseReason> {
        let pending = std::mem::take(&mut self.pending);
        let result = self.send(&pending[self.sent as usize..]);
        self.pending = pending;
        let n = result?;
        self.sent += n as u32;
        if self.sent as usize == self.pending.len() {
            self.pending.clear();
            self.sent = 0;
            if self.pending.capacity() > KEEP_CAPACITY {
                self.pending = Vec::new();
            }
        }
        Ok(n)
    }

    /// One `send()` of `data` if the socket is writable; a refusal waits for
    /// the next writable edge.
    #[inline(always)]
    fn send(&mut self, data: &[u8]) -> Result<usize, CloseReason> {
        if data.is_empty() {
            return Ok(0);
        }
        if !self.ready.writable {
            trace_write_waits(self.id, data.len());
            return Ok(0);
        }
        let n = sock::write_once(&mut self.stream, data)?;
        if n < data.len() {
            self.ready.writable = false;
            // Remember how full the kernel's queue is, so a client that
            // reads slowly can be seen to progress (`reader_progressed`).
            self.send_queue = sock::unsent_bytes(&self.stream);
        }
        trace_write(self.id, n, data.len() - n);
        Ok(n)
    }

    /// Bytes the client sent before this connection was created (read with
    /// a preface, such as a PROXY header): answered like any others, into
    /// `out`, which the next [`handle`](Self::handle) sends. Returns the
    /// replies made.
    pub fn feed_first(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> usize {
        self.reverser.feed(bytes, out)
    }

    /// One read into `buf` for a caller that reads bytes the protocol does
    /// not see (a preface). A short read marks the socket drained.
    pub fn read_raw(&mut self, buf: &mut [u8]) -> RawRead {
        if !self.ready.readable {
            return RawRead::Drained;
        }
        let mut retries = 0;
        loop {
            return match self.stream.read(buf) {
                Ok(0) => RawRead::Closed,
                Ok(n) => {
                    xps_log!(
                        Level::Trace,
                        READ,
                        "#{}: read {n} byte(s) of a preface",
                        self.id
                    );
                    if n < buf.len() && !self.ready.read_past_short {
                        self.ready.readable = false;
                    }
                    RawRead::Data(n)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if spurious_would_block(self.ready.read_past_short, &self.stream) {
                        retries += 1;
                        if retries <= SPURIOUS_RETRIES {
                            continue;
                        }
                        return RawRead::Again;
                    }
                    self.ready.readable = false;
                    self.ready.read_past_short = false;
                    RawRead::Drained
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => RawRead::Failed(sock::classify(e)),
            };
        }
    }

    /// Nothing more will be read: the client half-closed, or a drain is
    /// complete.
    fn end_input(&mut self, then: AfterReplies) {
        self.ready.readable = false;
        let then = match self.phase {
            Phase::Draining { .. } => AfterReplies::Linger,
            _ => then,
        };
        self.phase = Phase::InputDone { then };
    }

    /// In a drain, counts `n` bytes off what had arrived; once all are read,
    /// the input ends (with the last line answered if the client's FIN came
    /// before the shutdown too). Returns whether the drain is complete.
    fn drained_to_mark(&mut self, n: usize, out: &mut Vec<u8>, pass: &mut Pass) -> bool {
        let Phase::Draining { unread } = &mut self.phase else {
            return false;
        };
        *unread -= n as u32;
        if *unread > 0 {
            return false;
        }
        self.end_drain(out, pass);
        true
    }

    /// Shutdown: read only what had reached the kernel by now (even if flow
    /// control must pause and resume to get through it), answer it, then
    /// close. Bytes sent after this moment are not answered, nor is an
    /// unterminated last line — unless the client's half-close is among what
    /// had arrived. Returns the replies made now (a completed last line).
    pub fn begin_drain(&mut self) -> usize {
        if self.phase != Phase::Open {
            return 0; // already reading no more
        }
        let unread = sock::unread_bytes(&self.stream);
        self.phase = Phase::Draining {
            unread: unread as u32,
        };
        if unread > 0 {
            self.ready.readable = true;
            return 0;
        }
        let mut out = Vec::new();
        let mut pass = Pass::default();
        self.end_drain(&mut out, &mut pass);
        self.pending.extend_from_slice(&out);
        pass.replies
    }

    /// Every byte counted at shutdown is read: if the client's FIN is next
    /// in the queue, it arrived before the shutdown too, so the unterminated
    /// line is finished and answered.
    fn end_drain(&mut self, out: &mut Vec<u8>, pass: &mut Pass) {
        if sock::peer_closed(&self.stream) {
            pass.replies += self.reverser.finish(out);
        }
        self.end_input(AfterReplies::Linger);
    }

    /// The end of a graceful shutdown, nginx's "lingering close": closing a
    /// socket whose receive queue holds data sends a reset, which destroys
    /// replies not yet delivered. So shut our side (the FIN follows the
    /// replies), read and drop what the client sends, and close once the
    /// client has closed too or has acknowledged every reply.
    pub fn linger(&mut self, buf: &mut [u8]) -> Next {
        if self.phase != Phase::Lingering {
            self.phase = Phase::Lingering;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        loop {
            match self.stream.read(buf) {
                Ok(0) => return Next::Close(CloseReason::Shutdown),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Next::Close(sock::classify(e)),
            }
        }
        if sock::unsent_bytes(&self.stream) == 0 {
            Next::Close(CloseReason::Shutdown)
        } else {
            Next::Wait
        }
    }

    /// Whether the client read some of its replies since the socket last
    /// refused bytes: the kernel's send queue shrank. A slow reader's
    /// progress raises no epoll event until a third of the send buffer is
    /// free, so the idle timeout asks here before it cuts a client.
    pub fn reader_progressed(&mut self) -> bool {
        let queue = sock::unsent_bytes(&self.stream);
        let progressed = queue < self.send_queue;
        self.send_queue = queue;
        progressed
    }

    /// Where the connection is in its life.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Flow control's state.
    pub fn flow(&self) -> Flow {
        self.flow
    }

    /// Bytes of replies waiting for the socket.
    pub fn pending_len(&self) -> usize {
        self.pending.len() - self.sent as usize
    }

    /// Bytes of the unterminated line.
    pub fn partial_len(&self) -> usize {
        self.reverser.pending()
    }

    /// The length past which its line is cut into a segment reply
    /// (`--max-line` when it was accepted).
    pub fn max_line(&self) -> usize {
        self.reverser.max_line()
    }

    /// Bytes held for this client in user space: unsent replies and the
    /// unterminated line.
    pub fn held(&self) -> usize {
        self.pending_len() + self.partial_len()
    }

    /// Whether the last edge said readable and no read has found it empty.
    pub fn readable(&self) -> bool {
        self.ready.readable
    }

    /// The local address of the connection, asked of the kernel
    /// (`getsockname()`).
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.stream.local_addr()
    }

    /// The client's address, asked of the kernel (`getpeername()`).
    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.stream.peer_addr()
    }
}

/// Whether a `WouldBlock` from `recv()` lied: bytes are still queued.
/// Linux's `tcp_recvmsg` returns `EAGAIN` at the urgent mark, nothing read,
/// whenever a signal is pending on the thread (SIGSTOP from a shell, a
/// debugger attaching …); taken for "drained", the bytes from the mark on
/// would wait for an edge that never comes. The signal is taken as the call
/// returns, so a retry reads them. A read can start at the mark only after
/// urgent data was announced: epoll reports EPOLLPRI in every event while
/// urgent data is unread, and `read_past_short` stays set until a
/// `WouldBlock` is confirmed here. So the common path (no urgent data)
/// trusts `WouldBlock` without asking `FIONREAD`.
fn spurious_would_block(read_past_short: bool, stream: &TcpStream) -> bool {
    read_past_short && sock::unread_bytes(stream) > 0
}

/// A trace line about connection `id` from `source` (`--log-level trace`:
/// the loop narrated for a learner).
fn trace(source: &str, id: u64, what: &str) {
    xps_log!(Level::Trace, source, "#{id}: {what}");
}

/// Where the read handler's trace lines say they come from.
const READ: &str = "xps_connection_read_handler()";

/// The trace line of one read.
fn trace_read(id: u64, n: usize, lines: usize) {
    xps_log!(
        Level::Trace,
        READ,
        "#{id}: read {n} byte(s), {lines} line(s) answered"
    );
}

/// The trace line of replies that wait: the socket refused bytes before.
fn trace_write_waits(id: u64, n: usize) {
    xps_log!(
        Level::Trace,
        "xps_connection_write_handler()",
        "#{id}: {n} byte(s) of replies wait for the next writable edge"
    );
}

/// The trace line of one write.
fn trace_write(id: u64, n: usize, left: usize) {
    xps_log!(
        Level::Trace,
        "xps_connection_write_handler()",
        "#{id}: wrote {n} byte(s), {left} left for the next writable edge"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_connection_stays_small() {
        let size = std::mem::size_of::<Connection>();
        assert!(size <= 112, "Connection is {size} bytes");
    }
}
