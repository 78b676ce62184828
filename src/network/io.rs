//! The socket details the connection module leans on, kept out of its way:
//! one `send()`, the kernel's queue lengths, a peek for the peer's FIN, and
//! what an I/O error means for the connection.

use std::io::{self, Write};
use std::os::fd::AsRawFd;

use mio::net::TcpStream;

/// Why a connection ended (SPEC §5's close reasons, with the detail the
/// DEBUG and trace lines show).
#[derive(Debug)]
pub enum CloseReason {
    /// The peer half-closed and got every reply.
    Finished,
    /// The peer reset the connection or stopped reading for good (ECONNRESET,
    /// EPIPE): an ordinary end for a network server.
    Reset(io::Error),
    /// Another socket error.
    Failed(io::Error),
    /// The server is shutting down (every reply sent, or the grace period
    /// is over).
    Shutdown,
    /// No byte moved either way for `--idle-timeout`; with `stalled_writer`,
    /// replies were waiting for a client that read none of them (nginx's
    /// `send_timeout`).
    IdleTimeout {
        /// Replies were pending.
        stalled_writer: bool,
        /// The timeout, in seconds.
        after_secs: u32,
    },
    /// An unterminated line was not completed within `--line-timeout` of
    /// reading (nginx's `client_body_timeout`, for a line service).
    LineTimeout {
        /// The timeout, in seconds.
        after_secs: u32,
    },
}

impl CloseReason {
    /// Every label, in the order of [`index`](Self::index).
    pub const LABELS: [&'static str; 6] = [
        "finished",
        "reset",
        "error",
        "idle_timeout",
        "line_timeout",
        "shutdown",
    ];

    /// The reason's place in [`LABELS`](Self::LABELS) (a counter's index).
    pub fn index(&self) -> usize {
        match self {
            CloseReason::Finished => 0,
            CloseReason::Reset(_) => 1,
            CloseReason::Failed(_) => 2,
            CloseReason::IdleTimeout { .. } => 3,
            CloseReason::LineTimeout { .. } => 4,
            CloseReason::Shutdown => 5,
        }
    }

    /// The reason as the metrics and the access log name it.
    pub fn label(&self) -> &'static str {
        Self::LABELS[self.index()]
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Finished => f.write_str("peer closed, all replies sent"),
            CloseReason::Reset(e) => write!(f, "peer went away ({e})"),
            CloseReason::Failed(e) => write!(f, "socket error ({e})"),
            CloseReason::Shutdown => f.write_str("server shutting down"),
            CloseReason::IdleTimeout {
                stalled_writer: false,
                after_secs,
            } => write!(f, "idle for {after_secs} s"),
            CloseReason::IdleTimeout {
                stalled_writer: true,
                after_secs,
            } => write!(f, "client read nothing for {after_secs} s"),
            CloseReason::LineTimeout { after_secs } => {
                write!(f, "line not completed within {after_secs} s")
            }
        }
    }
}

/// What an I/O error on a connection's socket means.
pub fn classify(e: io::Error) -> CloseReason {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => CloseReason::Reset(e),
        _ => CloseReason::Failed(e),
    }
}

/// One `send()` of `data` (retried on EINTR). Returns the bytes the socket
/// took; fewer than `data.len()` (or 0 for `WouldBlock`) means its buffer
/// is full and the next writable edge will say when to go on.
#[inline]
pub fn write_once(stream: &mut TcpStream, data: &[u8]) -> Result<usize, CloseReason> {
    loop {
        match stream.write(data) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(classify(e)),
        }
    }
}

/// Bytes waiting in the socket's receive queue (`ioctl(FIONREAD)`).
pub fn unread_bytes(stream: &TcpStream) -> usize {
    queue_len(stream, libc::FIONREAD) as usize
}

/// Bytes sent but not yet acknowledged by the peer, or not yet sent
/// (`ioctl(TIOCOUTQ)`, a.k.a. SIOCOUTQ).
pub fn unsent_bytes(stream: &TcpStream) -> u32 {
    queue_len(stream, libc::TIOCOUTQ)
}

/// One of the socket queue-length ioctls; 0 if the call fails.
fn queue_len(stream: &TcpStream, request: libc::Ioctl) -> u32 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD and TIOCOUTQ write one c_int through the pointer,
    // which points to a live local.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), request, &mut n) };
    if rc == 0 { n.max(0) as u32 } else { 0 }
}

/// Whether the next thing in the receive queue is the peer's FIN: a
/// non-blocking one-byte `MSG_PEEK` that returns 0. Data (sent after the
/// shutdown began) or nothing at all both say no; nothing is consumed.
pub fn peer_closed(stream: &TcpStream) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_read_as_sentences() {
        assert_eq!(
            CloseReason::Finished.to_string(),
            "peer closed, all replies sent"
        );
        assert_eq!(
            CloseReason::IdleTimeout {
                stalled_writer: true,
                after_secs: 7
            }
            .to_string(),
            "client read nothing for 7 s"
        );
        assert_eq!(
            CloseReason::LineTimeout { after_secs: 7 }.to_string(),
            "line not completed within 7 s"
        );
        assert_eq!(
            CloseReason::LineTimeout { after_secs: 7 }.label(),
            "line_timeout"
        );
    }
}
