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
//! per connection would be 1 GB at 10 000 connections; here an idle connection
//! is this struct, about 100 bytes.
//!
//! # One pass of [`Connection::drive`]
//!
//! 1. **Read** while the socket is readable: `recv()` into the shared buffer,
//!    feed the bytes to the protocol, which appends whole replies to the shared
//!    output buffer. Stop at `WouldBlock`, or at a *short read* (fewer bytes
//!    than asked proves the kernel buffer is empty, so the `WouldBlock` call
//!    would be a wasted syscall — unless the peer's FIN was announced, in which
//!    case read on to see the EOF), or at the read budget (fairness: the core
//!    drives this connection again next turn), or when the pending replies
//!    reach the high-water mark (flow control).
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

use std::io::{self, Read, Write};
use std::time::Instant;

use mio::event::Event;
use mio::net::TcpStream;

use crate::protocol::LineReverser;

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
    /// No byte moved either way for `--idle-timeout` seconds; with
    /// `stalled_writer`, replies were waiting for a client that stopped
    /// reading (nginx's `send_timeout`).
    IdleTimeout {
        /// Replies were pending.
        stalled_writer: bool,
        /// The timeout, for the log line.
        secs: u64,
    },
}

/// What the core should do after a pass.
#[derive(Debug)]
pub enum Status {
    /// Wait for the next readiness event.
    Idle,
    /// Data may remain unread (budget spent, or reading resumed after a
    /// flow-control pause): drive again next turn.
    More,
    /// Remove the connection.
    Close(CloseReason),
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
    /// How much of `pending` is already sent.
    sent: usize,
    /// Last time a byte was received or sent (for the idle timeout).
    pub last_active: Instant,
    /// The last edge said readable and no read has since found it empty.
    readable: bool,
    /// The socket can take more bytes, as far as we know.
    writable: bool,
    /// epoll reported the peer's FIN (EPOLLRDHUP): read to the EOF even
    /// after a short read.
    read_closed_hint: bool,
    /// No more input: the peer half-closed, or the server is shutting down.
    input_done: bool,
    /// Reading is paused by flow control.
    paused: bool,
    /// The server is shutting down: read what had arrived, answer it, close.
    shutting_down: bool,
    /// While shutting down: bytes that had reached the kernel when shutdown
    /// began and are still to be read (`FIONREAD` at that moment).
    unread_at_shutdown: usize,
    /// Shutdown, every reply handed to the kernel and our side shut
    /// (FIN queued): waiting until the client has them (see `linger`).
    lingering: bool,
}

impl Connection {
    /// `xps_connection_create()` without the attach: the core registers the
    /// socket with its loop using the slab key as token.
    pub fn new(stream: TcpStream, id: u64, max_line: usize, now: Instant) -> Connection {
        Connection {
            stream,
            id,
            reverser: LineReverser::new(max_line),
            pending: Vec::new(),
            sent: 0,
            last_active: now,
            readable: false,
            writable: true,
            read_closed_hint: false,
            input_done: false,
            paused: false,
            shutting_down: false,
            unread_at_shutdown: 0,
            lingering: false,
        }
    }

    /// Records what an epoll event reported.
    pub fn note_event(&mut self, event: &Event) {
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.readable = true;
        }
        if event.is_read_closed() || event.is_error() {
            self.read_closed_hint = true;
        }
        if event.is_writable() || event.is_write_closed() || event.is_error() {
            self.writable = true;
        }
    }

    /// Bytes of replies waiting for the socket.
    pub fn pending_len(&self) -> usize {
        self.pending.len() - self.sent
    }

    /// Whether replies are waiting for the socket.
    pub fn has_pending(&self) -> bool {
        self.pending_len() > 0
    }

    /// Shutdown: read only what had reached the kernel by now (even if flow
    /// control must pause and resume to get through it), answer it, then
    /// close. Bytes sent after this moment are not answered, nor is an
    /// unterminated last line (the client has not finished it) — unless the
    /// client's half-close is among the bytes already received.
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        self.unread_at_shutdown = unread_bytes(&self.stream);
        if self.unread_at_shutdown == 0 {
            self.input_done = true;
        } else {
            self.readable = true;
        }
    }

    /// `xps_connection_read_handler()`, generalised: one read–write pass (see
    /// the module docs). `scratch.out` is empty before and after.
    pub fn drive(&mut self, scratch: &mut Scratch, now: Instant) -> Status {
        let mut more = false;
        let mut moved = 0;
        if self.readable && !self.input_done && !self.paused {
            match self.read_pass(scratch) {
                Ok((m, n)) => (more, moved) = (m, n),
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
            Ok(n) => moved += n,
            Err(reason) => return Status::Close(reason),
        }
        if moved > 0 {
            self.last_active = now;
        }
        if self.paused && self.pending_len() <= LOW_WATER {
            self.paused = false;
            more |= self.readable;
        }
        if self.input_done && !self.has_pending() {
            if !self.shutting_down {
                return Status::Close(CloseReason::Finished);
            }
            return self.linger(&mut scratch.read);
        }
        if more { Status::More } else { Status::Idle }
    }

    /// Reads until the socket is drained, the budget is spent or flow control
    /// pauses reading. Returns whether to come back for more, and the bytes
    /// read.
    fn read_pass(&mut self, scratch: &mut Scratch) -> Result<(bool, usize), CloseReason> {
        let mut total = 0usize;
        loop {
            if self.pending_len() + scratch.out.len() >= HIGH_WATER {
                self.paused = true;
                return Ok((false, total));
            }
            if total >= READ_BUDGET {
                return Ok((true, total));
            }
            // In shutdown, read no further than what had arrived by then.
            let want = if self.shutting_down {
                self.unread_at_shutdown.min(scratch.read.len())
            } else {
                scratch.read.len()
            };
            match self.stream.read(&mut scratch.read[..want]) {
                Ok(0) => {
                    self.readable = false;
                    self.input_done = true;
                    self.reverser.finish(&mut scratch.out);
                    return Ok((false, total));
                }
                Ok(n) => {
                    total += n;
                    self.reverser.feed(&scratch.read[..n], &mut scratch.out);
                    if self.shutting_down {
                        self.unread_at_shutdown -= n;
                        if self.unread_at_shutdown == 0 {
                            self.input_done = true;
                            return Ok((false, total));
                        }
                    }
                    if n < want && !self.read_closed_hint {
                        self.readable = false;
                        return Ok((false, total));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok((false, total));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(classify(e)),
            }
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
        if !self.lingering {
            self.lingering = true;
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

    /// Whether the connection is in its lingering close.
    pub fn is_lingering(&self) -> bool {
        self.lingering
    }

    /// Sends this pass's replies (and any older pending ones) with at most one
    /// `send()`; keeps what the socket did not take. Returns the bytes sent.
    /// The caller clears `scratch.out` afterwards, on success and on error.
    fn flush(&mut self, scratch: &mut Scratch) -> Result<usize, CloseReason> {
        if !scratch.out.is_empty() {
            if !self.has_pending() && self.writable {
                // The common case: nothing queued, so send straight from the
                // shared buffer and copy only a tail the socket refused.
                let n = write_once(&mut self.stream, &scratch.out, &mut self.writable)?;
                if n < scratch.out.len() {
                    self.pending.clear();
                    self.sent = 0;
                    self.pending.extend_from_slice(&scratch.out[n..]);
                }
                return Ok(n);
            }
            if self.sent > 0 {
                self.pending.drain(..self.sent);
                self.sent = 0;
            }
            self.pending.extend_from_slice(&scratch.out);
        }
        if !self.has_pending() || !self.writable {
            return Ok(0);
        }
        let n = write_once(
            &mut self.stream,
            &self.pending[self.sent..],
            &mut self.writable,
        )?;
        self.sent += n;
        if self.sent == self.pending.len() {
            self.pending.clear();
            self.sent = 0;
            if self.pending.capacity() > KEEP_CAPACITY {
                self.pending = Vec::new();
            }
        }
        Ok(n)
    }
}

/// Bytes waiting in the socket's receive queue (`ioctl(FIONREAD)`).
fn unread_bytes(stream: &TcpStream) -> usize {
    queue_len(stream, libc::FIONREAD)
}

/// Bytes sent but not yet acknowledged by the peer, or not yet sent
/// (`ioctl(TIOCOUTQ)`, a.k.a. SIOCOUTQ).
fn unsent_bytes(stream: &TcpStream) -> usize {
    queue_len(stream, libc::TIOCOUTQ)
}

/// One of the socket queue-length ioctls; 0 if the call fails.
fn queue_len(stream: &TcpStream, request: libc::Ioctl) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD and TIOCOUTQ write one c_int through the pointer,
    // which points to a live local.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), request, &mut n) };
    if rc == 0 { n.max(0) as usize } else { 0 }
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
