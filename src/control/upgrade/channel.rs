//! The channel between the old and the new process of an upgrade: one
//! `AF_UNIX` stream socketpair, whose child end is the only descriptor the
//! new process inherits; every other descriptor (listening sockets,
//! connections) travels over it by `SCM_RIGHTS`.
//!
//! A frame is `u32 len | u16 kind | u16 nfds | payload[len]`; its
//! descriptors are attached to its first bytes (at most [`SCM_MAX_FD`] per
//! `sendmsg`, so more go one chunk per byte). The receiver keeps every
//! descriptor in arrival order: Linux never merges the descriptors of two
//! `sendmsg` calls into one `recvmsg`, and they arrive with the first byte
//! they are attached to, so a frame's descriptors are all there once its
//! last byte is. They arrive close-on-exec (`MSG_CMSG_CLOEXEC`); a
//! truncated control message (`MSG_CTRUNC`: descriptors the kernel had to
//! close) is an error, never a silent loss.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// Linux's `SCM_MAX_FD`: more descriptors in one message fail with EINVAL.
pub const SCM_MAX_FD: usize = 253;
/// The frame header's size.
const HEADER: usize = 8;
/// The largest frame either side accepts (a batch is at most a few MiB).
pub const MAX_FRAME: usize = 256 << 20;

/// One frame: its kind, payload and descriptors.
#[derive(Debug)]
pub struct Frame {
    /// What it is (`wire::Kind` as a number).
    pub kind: u16,
    /// Its bytes.
    pub payload: Vec<u8>,
    /// The descriptors sent with it, in order.
    pub fds: Vec<OwnedFd>,
}

/// One end of the channel.
#[derive(Debug)]
pub struct Channel {
    /// The socket (blocking; timeouts per call).
    sock: UnixStream,
    /// Bytes received and not yet framed.
    buf: Vec<u8>,
    /// Descriptors received and not yet given to a frame.
    fds: VecDeque<OwnedFd>,
}

impl Channel {
    /// A channel over `sock`.
    pub fn new(sock: UnixStream) -> Channel {
        Channel {
            sock,
            buf: Vec::new(),
            fds: VecDeque::new(),
        }
    }

    /// A socketpair: our end as a channel, and the peer's end (close-on-exec;
    /// the caller makes an inheritable copy for the child).
    pub fn pair() -> io::Result<(Channel, OwnedFd)> {
        let (ours, theirs) = UnixStream::pair()?;
        Ok((Channel::new(ours), OwnedFd::from(theirs)))
    }

    /// The socket, for timeouts.
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Sends one frame: the header, then `parts` back to back, with `fds`
    /// attached. Blocks up to the socket's write timeout (an error then).
    pub fn send(&self, kind: u16, parts: &[&[u8]], fds: &[RawFd]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > MAX_FRAME || fds.len() > u16::MAX as usize {
            return Err(io::Error::other("frame too large"));
        }
        let mut header = [0u8; HEADER];
        header[..4].copy_from_slice(&(len as u32).to_le_bytes());
        header[4..6].copy_from_slice(&kind.to_le_bytes());
        header[6..].copy_from_slice(&(fds.len() as u16).to_le_bytes());
        let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
        all.push(&header);
        all.extend(parts.iter().filter(|p| !p.is_empty()));
        let chunks: Vec<&[RawFd]> = fds.chunks(SCM_MAX_FD).collect();
        let mut sent = 0; // bytes of the frame written so far
        let total = HEADER + len;
        while sent < total {
            // Descriptor chunk `i` rides on byte `i` (the header is longer
            // than any count of chunks a frame needs in practice; past it,
            // the payload's bytes carry them).
            let chunk = chunks.get(sent).copied();
            let limit = match chunks.len() {
                n if sent + 1 < n => 1, // one byte per chunk but the last
                _ => usize::MAX,
            };
            let iov = slices_from(&all, sent, limit);
            let rights;
            let cmsgs: &[ControlMessage] = match chunk {
                Some(c) => {
                    rights = [ControlMessage::ScmRights(c)];
                    &rights
                }
                None => &[],
            };
            match sendmsg::<()>(
                self.sock.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => sent += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(io::Error::from(e)),
            }
        }
        Ok(())
    }

    /// Receives the next frame, waiting until `deadline` (`None`: for
    /// ever). `Ok(None)` at end of stream (the peer closed or exited);
    /// `ErrorKind::TimedOut` when the deadline passed.
    pub fn recv(&mut self, deadline: Option<Instant>) -> io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = self.take_frame()? {
                return Ok(Some(frame));
            }
            let timeout = match deadline {
                None => None,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    Some(left.max(Duration::from_millis(1)))
                }
            };
            self.sock.set_read_timeout(timeout)?;
            match self.recv_some() {
                // A peer that exits with bytes of ours unread resets the
                // socket: that is its end too.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset && self.buf.is_empty() => {
                    return Ok(None);
                }
                Ok(0) => {
                    return match self.buf.is_empty() {
                        true => Ok(None),
                        false => Err(io::Error::other("the channel closed inside a frame")),
                    };
                }
                Ok(_) => {}
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// A complete frame from what has arrived, if there is one.
    fn take_frame(&mut self) -> io::Result<Option<Frame>> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.buf[..4].try_into().unwrap()) as usize;
        let kind = u16::from_le_bytes(self.buf[4..6].try_into().unwrap());
        let nfds = u16::from_le_bytes(self.buf[6..8].try_into().unwrap()) as usize;
        if len > MAX_FRAME {
            return Err(io::Error::other(format!("a frame of {len} bytes")));
        }
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        if self.fds.len() < nfds {
            return Err(io::Error::other(format!(
                "a frame of {nfds} descriptor(s) arrived with {}",
                self.fds.len()
            )));
        }
        let payload = self.buf[HEADER..HEADER + len].to_vec();
        self.buf.drain(..HEADER + len);
        let fds = self.fds.drain(..nfds).collect();
        Ok(Some(Frame { kind, payload, fds }))
    }

    /// One `recvmsg`: bytes to `buf`, descriptors to `fds`. 0 at EOF.
    fn recv_some(&mut self) -> io::Result<usize> {
        let mut chunk = vec![0u8; 256 * 1024];
        let mut space = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
        loop {
            let mut iov = [IoSliceMut::new(&mut chunk)];
            let msg = match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e)),
            };
            let mut truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
            for c in msg.cmsgs().map_err(io::Error::from)? {
                match c {
                    ControlMessageOwned::ScmRights(raw) => {
                        for fd in raw {
                            // SAFETY: the kernel just installed `fd` in this
                            // process for us; nothing else owns it.
                            self.fds.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                    _ => truncated = true,
                }
            }
            if truncated {
                return Err(io::Error::other(
                    "descriptors were lost in transit (MSG_CTRUNC)",
                ));
            }
            let n = msg.bytes;
            self.buf.extend_from_slice(&chunk[..n]);
            return Ok(n);
        }
    }
}

/// The `IoSlice`s of `parts` from byte `skip` on, at most `limit` bytes.
fn slices_from<'a>(parts: &[&'a [u8]], mut skip: usize, mut limit: usize) -> Vec<IoSlice<'a>> {
    let mut out = Vec::new();
    for p in parts {
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        let s = &p[skip..];
        skip = 0;
        let s = &s[..s.len().min(limit)];
        limit -= s.len();
        out.push(IoSlice::new(s));
        // IOV_MAX is 1024: a frame's parts are far fewer.
        if limit == 0 || out.len() == 1024 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn frames_keep_their_descriptors_in_order_also_past_scm_max_fd() {
        let (a, theirs) = Channel::pair().unwrap();
        let mut b = Channel::new(UnixStream::from(theirs));
        // 600 descriptors: three chunks, on the first three bytes.
        let files: Vec<std::fs::File> = (0..600)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let sender = std::thread::spawn(move || {
            a.send(7, &[b"one", b"", b"two"], &raw).unwrap();
            a.send(8, &[b"three"], &[]).unwrap();
            drop(files);
            a
        });
        let f = b.recv(None).unwrap().unwrap();
        assert_eq!(
            (f.kind, &f.payload[..], f.fds.len()),
            (7, &b"onetwo"[..], 600)
        );
        for fd in &f.fds {
            // Received close-on-exec.
            let flags = nix_fd_flags(fd.as_fd().as_raw_fd());
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
        let f = b.recv(None).unwrap().unwrap();
        assert_eq!((f.kind, &f.payload[..], f.fds.len()), (8, &b"three"[..], 0));
        drop(sender.join().unwrap());
        assert!(b.recv(None).unwrap().is_none(), "EOF");
    }

    #[test]
    fn a_deadline_times_out_and_a_torn_frame_is_an_error() {
        let (a, theirs) = Channel::pair().unwrap();
        let mut b = Channel::new(UnixStream::from(theirs));
        let e = b
            .recv(Some(Instant::now() + Duration::from_millis(20)))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // A header announcing 10 bytes, then EOF after 2.
        use std::io::Write;
        let mut raw = a.sock.try_clone().unwrap();
        raw.write_all(&[10, 0, 0, 0, 1, 0, 0, 0, 1, 2]).unwrap();
        drop(raw);
        drop(a);
        assert!(b.recv(None).is_err());
    }

    fn nix_fd_flags(fd: RawFd) -> i32 {
        // SAFETY: F_GETFD only reads the flags of a valid fd.
        unsafe { libc::fcntl(fd, libc::F_GETFD) }
    }
}
