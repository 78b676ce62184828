//! systemd integration: readiness notification (`sd_notify(3)`) and socket
//! activation (`sd_listen_fds(3)`), written against the documented
//! protocols rather than libsystemd.
//!
//! Why by hand and not the `sd-notify` crate: that crate re-reads
//! `NOTIFY_SOCKET` on every call and cannot aim at a socket of the caller's
//! choosing, so tests would have to set the process environment, unsound
//! while other test threads run. The protocol is one `sendto` of a text
//! datagram, so a [`Notifier`] resolves the address once
//! ([`Notifier::from_env`], [`Notifier::to_path`]). A failing notify never
//! stops the server. Socket activation's parsing is the pure
//! [`parse_listen_env`], the per-fd check [`adopt_listen_fd`]; every worker
//! accepts from every passed socket ([`adopt_listeners`]).
//! `docs/operations.md` ("systemd") has the messages and when each is sent.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Type};

use crate::config::ListenAddr;
use crate::network::listener::{Listener, OpenListeners};
use crate::utils::logger::Level;
use crate::xps_log;

/// The sockets systemd passed (socket activation), once per worker: every
/// worker accepts from the same sockets. They carry no PROXY flag (see
/// docs/load-balancing.md).
pub fn adopt_listeners(sockets: Vec<TcpListener>, workers: usize) -> Result<OpenListeners, String> {
    let mut per_worker: Vec<Vec<Listener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::with_capacity(sockets.len());
    for socket in sockets {
        let at = socket
            .local_addr()
            .map_err(|e| format!("LISTEN_FDS socket: {}", crate::os_reason(&e)))?;
        let addr = ListenAddr {
            host: at.ip().to_string(),
            port: at.port(),
            proxy: false,
        };
        for list in per_worker.iter_mut() {
            let copy = socket
                .try_clone()
                .map_err(|e| format!("dup(LISTEN_FDS socket): {}", crate::os_reason(&e)))?;
            list.push(Listener::new(copy, addr.clone(), at));
        }
        bound.push(at);
    }
    Ok(OpenListeners { per_worker, bound })
}

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The longest a state change (`READY=1`, `RELOADING=1`, `STOPPING=1`) waits
/// for room in the service manager's socket queue before it is given up.
pub const STATE_SEND_WAIT: Duration = Duration::from_secs(1);

const LOG_SOURCE: &str = "sd_notify()";

/// Sends service state to systemd. Cheap to clone (an `Arc` inside) and
/// `Send + Sync`, so every worker may hold one. When `NOTIFY_SOCKET` is unset
/// (not run by systemd) every method is a no-op.
#[derive(Clone, Default)]
pub struct Notifier {
    /// `None`: notifications are off.
    target: Option<Arc<Target>>,
}

/// Where notifications go, resolved once.
struct Target {
    /// An unbound datagram socket (close-on-exec, non-blocking).
    socket: UnixDatagram,
    /// The manager's socket.
    addr: SocketAddr,
    /// The `NOTIFY_SOCKET` value, for log lines.
    name: OsString,
    /// Set after the first failure has been logged at WARNING.
    warned: AtomicBool,
    /// While set, nothing is sent: a new process of an upgrade is not the
    /// unit's main process until the old one has said `MAINPID=`.
    muted: AtomicBool,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Some(t) => write!(f, "Notifier({:?})", t.name),
            None => f.write_str("Notifier(off)"),
        }
    }
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { target: None }
    }

    /// Reads `NOTIFY_SOCKET` once (and leaves it set). Unset or empty: a
    /// no-op notifier.
    pub fn from_env() -> Notifier {
        Self::from_env_value(std::env::var_os("NOTIFY_SOCKET").as_deref())
    }

    /// [`Notifier::from_env`] on an explicit value of `NOTIFY_SOCKET`.
    pub fn from_env_value(value: Option<&OsStr>) -> Notifier {
        match value {
            Some(v) if !v.is_empty() => Self::to_path(v),
            _ => Notifier::disabled(),
        }
    }

    /// A notifier for the socket `notify_socket`, read as systemd writes
    /// `NOTIFY_SOCKET`: a file-system path, or `@name` for the abstract name
    /// `name`. An address it cannot use (`vsock:` addresses, a path too long
    /// for `sun_path`, no socket left) is logged at WARNING and gives a no-op
    /// notifier: the server runs on either way.
    pub fn to_path(notify_socket: impl AsRef<OsStr>) -> Notifier {
        let name = notify_socket.as_ref();
        match Self::open(name) {
            Ok(target) => Notifier {
                target: Some(Arc::new(target)),
            },
            Err(reason) => {
                xps_log!(
                    Level::Warning,
                    LOG_SOURCE,
                    "NOTIFY_SOCKET={}: {reason}; systemd will not hear from xps",
                    name.to_string_lossy()
                );
                Notifier::disabled()
            }
        }
    }

    fn open(name: &OsStr) -> Result<Target, String> {
        let addr = parse_notify_socket(name)?;
        let socket = UnixDatagram::unbound().map_err(|e| crate::os_reason(&e))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| crate::os_reason(&e))?;
        Ok(Target {
            socket,
            addr,
            name: name.to_os_string(),
            warned: AtomicBool::new(false),
            muted: AtomicBool::new(false),
        })
    }

    /// Whether notifications go anywhere (so a caller can skip building a
    /// status text no one reads).
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// `READY=1`: start-up (or a reload) is finished.
    pub fn ready(&self) {
        self.send("READY=1", true);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=` now, as `Type=notify-reload` and
    /// systemd ≥ 253 require; follow it with [`Notifier::ready`].
    pub fn reloading(&self) {
        if self.is_enabled() {
            self.send(&reloading_message(monotonic_usec()), true);
        }
    }

    /// `STOPPING=1`: shutdown has started.
    pub fn stopping(&self) {
        self.send("STOPPING=1", true);
    }

    /// `STATUS=text`, made one line (see [`status_line`]). Never waits: if
    /// the manager's queue is full, this status is dropped.
    pub fn status(&self, text: &str) {
        if self.is_enabled() {
            self.send(&format!("STATUS={}", status_line(text)), false);
        }
    }

    /// `READY=1` and `STATUS=text` in one datagram.
    pub fn ready_with_status(&self, text: &str) {
        if self.is_enabled() {
            self.send(&format!("READY=1\nSTATUS={}", status_line(text)), true);
        }
    }

    /// Sends nothing until [`unmute`](Self::unmute) (a new process of an
    /// upgrade, until the old one has handed the unit over).
    pub fn mute(&self) {
        if let Some(t) = &self.target {
            t.muted.store(true, Ordering::Relaxed);
        }
    }

    /// Sends again.
    pub fn unmute(&self) {
        if let Some(t) = &self.target {
            t.muted.store(false, Ordering::Relaxed);
        }
    }

    /// An upgrade is done: `MAINPID=pid`, `READY=1` and `STATUS=text` in one
    /// datagram, so the unit follows the new process.
    pub fn main_pid_ready(&self, pid: u32, text: &str) {
        if self.is_enabled() {
            let msg = format!("MAINPID={pid}\nREADY=1\nSTATUS={}", status_line(text));
            self.send(&msg, true);
        }
    }

    /// `BARRIER=1` (systemd ≥ 246): waits up to `timeout` until the manager
    /// has read every message sent before it, so a process that exits next
    /// is not gone before its `MAINPID=` was attributed to it. The datagram
    /// carries the write end of a pipe; the manager closes it once it got
    /// here, which the read end sees as a hang-up. Returns whether it did.
    pub fn barrier(&self, timeout: Duration) -> bool {
        let Some(t) = &self.target else { return true };
        if t.muted.load(Ordering::Relaxed) {
            return true;
        }
        match barrier(t, timeout) {
            Ok(done) => done,
            Err(e) => {
                xps_log!(
                    Level::Debug,
                    LOG_SOURCE,
                    "BARRIER=1 through NOTIFY_SOCKET={}: {}",
                    t.name.to_string_lossy(),
                    crate::os_reason(&e)
                );
                false
            }
        }
    }

    fn send(&self, msg: &str, wait: bool) {
        let Some(t) = &self.target else { return };
        if t.muted.load(Ordering::Relaxed) {
            return;
        }
        let deadline = Instant::now() + STATE_SEND_WAIT;
        let err = loop {
            match t.socket.send_to_addr(msg.as_bytes(), &t.addr) {
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        && wait
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => break e,
            }
        };
        let first = !t.warned.swap(true, Ordering::Relaxed);
        let what = msg.split('\n').next().unwrap_or(msg);
        xps_log!(
            if first { Level::Warning } else { Level::Debug },
            LOG_SOURCE,
            "cannot tell systemd {what} through NOTIFY_SOCKET={}: {}{}",
            t.name.to_string_lossy(),
            crate::os_reason(&err),
            if first {
                " (further failures are logged at DEBUG)"
            } else {
                ""
            }
        );
    }
}

/// `BARRIER=1` with a pipe's write end attached, then a wait for the
/// manager to close it (sd_notify(3), `sd_notify_barrier`).
fn barrier(t: &Target, timeout: Duration) -> io::Result<bool> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::AsRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both are new fds this function owns.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let socket = UnixDatagram::unbound()?;
    socket.connect_addr(&t.addr)?;
    let iov = [io::IoSlice::new(b"BARRIER=1")];
    let rights = [write.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&rights)];
    sendmsg::<()>(
        socket.as_raw_fd(),
        &iov,
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    drop(write);
    let mut pfd = libc::pollfd {
        fd: read.as_raw_fd(),
        events: 0, // POLLHUP is always reported
        revents: 0,
    };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n > 0 {
            return Ok(pfd.revents & libc::POLLHUP != 0);
        }
        if n == 0 {
            return Ok(false);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The address in a `NOTIFY_SOCKET` value: `/path` (or any other path) or
/// `@abstract`.
fn parse_notify_socket(value: &OsStr) -> Result<SocketAddr, String> {
    let bytes = value.as_bytes();
    match bytes.first() {
        None => Err("empty address".to_string()),
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])
            .map_err(|e| format!("bad abstract socket name: {}", crate::os_reason(&e))),
        Some(_) if bytes.starts_with(b"vsock:") => {
            Err("vsock addresses are not supported".to_string())
        }
        Some(_) => SocketAddr::from_pathname(value)
            .map_err(|e| format!("bad socket path: {}", crate::os_reason(&e))),
    }
}

/// `text` as one status line: CR, LF and NUL (which would end or split the
/// assignment) become spaces.
pub fn status_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if matches!(c, '\n' | '\r' | '\0') {
                ' '
            } else {
                c
            }
        })
        .collect()
}

/// The datagram announcing a reload that started at `usec` µs of
/// `CLOCK_MONOTONIC`.
pub fn reloading_message(usec: u64) -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={usec}")
}

/// `CLOCK_MONOTONIC` now, in µs (the clock `MONOTONIC_USEC=` is read against).
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists
    // on Linux, so the call cannot fail.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000) + (ts.tv_nsec as u64) / 1_000
}

/// How many fds systemd passed, from the values of `LISTEN_PID` and
/// `LISTEN_FDS`, as `sd_listen_fds` reads them:
///
/// * either variable unset, `LISTEN_PID` not `my_pid` (the variables were
///   meant for another process, e.g. a parent), or `LISTEN_FDS=0`: `Ok(None)`,
///   start up as if not socket-activated;
/// * a value that is not a plain decimal number, or more fds than can exist:
///   `Err`, since systemd never writes that and guessing would bind ports
///   systemd meant to own.
pub fn parse_listen_env(
    pid: Option<&str>,
    fds: Option<&str>,
    my_pid: u32,
) -> Result<Option<usize>, String> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    let pid: u32 = decimal(pid).ok_or_else(|| format!("LISTEN_PID={pid:?} is not a pid"))?;
    if pid != my_pid {
        return Ok(None);
    }
    let n: usize = decimal(fds).ok_or_else(|| format!("LISTEN_FDS={fds:?} is not a count"))?;
    if n > (RawFd::MAX - LISTEN_FDS_START) as usize {
        return Err(format!(
            "LISTEN_FDS={n} is more fds than a process can have"
        ));
    }
    Ok((n > 0).then_some(n))
}

/// A plain decimal number: digits only (no sign, no spaces), no overflow.
fn decimal<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Checks that `fd` is a listening TCP socket (`SO_ACCEPTCONN`,
/// `SOCK_STREAM`, `AF_INET` or `AF_INET6`) and makes it non-blocking and
/// close-on-exec. The error names what it is instead; on error `fd` is closed.
pub fn adopt_listen_fd(fd: OwnedFd) -> Result<TcpListener, String> {
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    let why = |what: &str, e: io::Error| format!("fd {raw}: {what}: {}", crate::os_reason(&e));
    let sock = SockRef::from(&fd);
    let ty = sock.r#type().map_err(|e| why("not a socket", e))?;
    let domain = sock.domain().map_err(|e| why("socket domain", e))?;
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return Err(format!(
            "fd {raw}: not a TCP socket (address family {domain:?})"
        ));
    }
    if ty != Type::STREAM {
        return Err(format!("fd {raw}: not a TCP socket (socket type {ty:?})"));
    }
    if let Ok(Some(p)) = sock.protocol()
        && p != Protocol::TCP
    {
        return Err(format!("fd {raw}: not a TCP socket (protocol {p:?})"));
    }
    if !sock.is_listener().map_err(|e| why("SO_ACCEPTCONN", e))? {
        return Err(format!(
            "fd {raw}: a TCP socket, but not listening (a connection?)"
        ));
    }
    sock.set_nonblocking(true)
        .map_err(|e| why("O_NONBLOCK", e))?;
    sock.set_cloexec(true).map_err(|e| why("FD_CLOEXEC", e))?;
    Ok(TcpListener::from(fd))
}

/// Set by the first [`listen_fds`] call that found sockets: fds 3.. are owned
/// by the listeners it returned, and a second call must not own them again.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The listening sockets systemd passed by socket activation, when
/// `LISTEN_PID` is our pid and `LISTEN_FDS` = n: fds `3 .. 3 + n`, in order
/// (the order of `ListenStream=` lines), each checked by [`adopt_listen_fd`].
/// `Ok(None)` when not socket-activated. `Err` names the bad variable or fd;
/// the server should then exit rather than bind what systemd owns.
///
/// Call it once, from `main` before any other thread starts:
/// `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES` are then unset (as
/// `sd_listen_fds(1)` does) so no child inherits them. With other threads
/// running, unsetting is unsound, so they are left set (harmless: no other
/// process has our pid). A second call returns `Ok(None)`: the fds belong to
/// the first call's listeners.
pub fn listen_fds() -> Result<Option<Vec<TcpListener>>, String> {
    let pid = env_str("LISTEN_PID")?;
    let fds = env_str("LISTEN_FDS")?;
    let n = parse_listen_env(pid.as_deref(), fds.as_deref(), std::process::id());
    if pid.is_some() || fds.is_some() {
        unset_listen_env();
    }
    let Some(n) = n? else { return Ok(None) };
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(None);
    }
    let mut listeners = Vec::with_capacity(n);
    for i in 0..n {
        let raw = LISTEN_FDS_START + i as RawFd;
        // Check the fd is open before owning it, so a wrong LISTEN_FDS never
        // makes us close (on drop) an fd opened later by someone else.
        // SAFETY: F_GETFD only reads the fd's flags.
        if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
            let e = io::Error::last_os_error();
            return Err(format!(
                "fd {raw} (LISTEN_FDS={n}): {}",
                crate::os_reason(&e)
            ));
        }
        // SAFETY: LISTEN_PID is our pid, so systemd passed fds 3..3+n to this
        // process for it to own; the fd is open (checked above), nothing else in
        // xps opens fds before start-up reads them, and TAKEN makes sure
        // only one OwnedFd is ever made for it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        listeners.push(adopt_listen_fd(fd).map_err(|e| format!("{e} (LISTEN_FDS={n})"))?);
    }
    Ok(Some(listeners))
}

/// An environment variable as UTF-8, `None` when unset.
fn env_str(key: &str) -> Result<Option<String>, String> {
    match std::env::var(key) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(format!("{key}={v:?} is not a number")),
    }
}

/// Unsets the socket-activation variables, only while this is the process's
/// only thread.
fn unset_listen_env() {
    if !single_threaded() {
        xps_log!(
            Level::Debug,
            "sd_listen_fds()",
            "other threads run: LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES stay set"
        );
        return;
    }
    for key in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        // SAFETY: this is the only thread (checked just above; only this
        // thread could start another), so nothing reads the environment
        // concurrently.
        unsafe { std::env::remove_var(key) };
    }
}

/// Whether the process has exactly one thread, from `/proc/self/status`.
fn single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .map(|n| n.trim() == "1")
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpStream, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::sync::atomic::AtomicUsize;

    /// A fresh, empty directory for one test.
    fn temp_dir() -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("xps-sd-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A bound receiver with a read timeout, so a missing datagram fails the
    /// test instead of hanging it.
    fn receiver_at(path: &std::path::Path) -> UnixDatagram {
        let r = UnixDatagram::bind(path).unwrap();
        r.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        r
    }

    fn recv(r: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = r.recv(&mut buf).expect("a datagram");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn exact_datagrams_on_a_path_socket() {
        let dir = temp_dir();
        let path = dir.join("notify");
        let r = receiver_at(&path);
        let n = Notifier::to_path(&path);
        assert!(n.is_enabled());
        n.ready();
        assert_eq!(recv(&r), "READY=1");
        n.stopping();
        assert_eq!(recv(&r), "STOPPING=1");
        n.status("3 connections open");
        assert_eq!(recv(&r), "STATUS=3 connections open");
        n.status("two\nlines\r\0here");
        assert_eq!(recv(&r), "STATUS=two lines  here");
        n.ready_with_status("listening on 4 ports\n");
        assert_eq!(recv(&r), "READY=1\nSTATUS=listening on 4 ports ");
        // A clone shares the socket and sends to the same place.
        let c = n.clone();
        std::thread::spawn(move || c.ready()).join().unwrap();
        assert_eq!(recv(&r), "READY=1");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn reloading_carries_monotonic_now() {
        let dir = temp_dir();
        let path = dir.join("notify");
        let r = receiver_at(&path);
        let n = Notifier::to_path(&path);
        let before = monotonic_usec();
        n.reloading();
        let after = monotonic_usec();
        let msg = recv(&r);
        let usec: u64 = msg
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("{msg:?}"))
            .parse()
            .unwrap();
        assert!(before <= usec && usec <= after, "{before} {usec} {after}");
        assert_eq!(reloading_message(12), "RELOADING=1\nMONOTONIC_USEC=12");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn abstract_socket_name() {
        let name = format!("xps-sd-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let r = UnixDatagram::bind_addr(&addr).unwrap();
        r.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::from_env_value(Some(OsStr::new(&format!("@{name}"))));
        assert!(n.is_enabled());
        n.ready_with_status("ok");
        assert_eq!(recv(&r), "READY=1\nSTATUS=ok");
    }

    #[test]
    fn no_op_when_unset_or_unusable() {
        for n in [
            Notifier::from_env_value(None),
            Notifier::from_env_value(Some(OsStr::new(""))),
            Notifier::disabled(),
            Notifier::default(),
            Notifier::to_path("vsock:2:1234"),
            Notifier::to_path(format!("/{}", "x".repeat(200))),
        ] {
            assert!(!n.is_enabled(), "{n:?}");
            n.ready();
            n.reloading();
            n.status("x");
            n.ready_with_status("x");
            n.stopping();
        }
    }

    #[test]
    fn a_missing_receiver_does_not_stop_anything() {
        let dir = temp_dir();
        let n = Notifier::to_path(dir.join("nobody-here"));
        assert!(n.is_enabled());
        let t = Instant::now();
        n.ready(); // ENOENT: logged once, returns at once
        n.stopping();
        n.status("x");
        assert!(t.elapsed() < STATE_SEND_WAIT);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_full_queue_drops_status_at_once() {
        let dir = temp_dir();
        let path = dir.join("notify");
        let _r = receiver_at(&path); // never read
        let n = Notifier::to_path(&path);
        // Fill the receiver's queue, then one more status must not wait.
        let mut sent = 0;
        let t = Instant::now();
        while sent < 100_000 && t.elapsed() < Duration::from_secs(5) {
            n.status("filler");
            sent += 1;
        }
        let t = Instant::now();
        n.status("dropped");
        assert!(t.elapsed() < Duration::from_millis(100));
        // A state change waits for room, but only so long.
        let t = Instant::now();
        n.ready();
        let waited = t.elapsed();
        assert!(
            waited >= STATE_SEND_WAIT && waited < STATE_SEND_WAIT * 3,
            "{waited:?}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn listen_env_parsing() {
        let me = 4242;
        // Not activated.
        assert_eq!(parse_listen_env(None, None, me), Ok(None));
        assert_eq!(parse_listen_env(Some("4242"), None, me), Ok(None));
        assert_eq!(parse_listen_env(None, Some("2"), me), Ok(None));
        // For another process.
        assert_eq!(parse_listen_env(Some("4243"), Some("2"), me), Ok(None));
        // Not ours, so LISTEN_FDS is not even read.
        assert_eq!(parse_listen_env(Some("1"), Some("x"), me), Ok(None));
        // Zero fds.
        assert_eq!(parse_listen_env(Some("4242"), Some("0"), me), Ok(None));
        // Activated.
        assert_eq!(parse_listen_env(Some("4242"), Some("1"), me), Ok(Some(1)));
        assert_eq!(parse_listen_env(Some("4242"), Some("4"), me), Ok(Some(4)));
        // Bad numbers.
        for (pid, fds) in [
            ("", "1"),
            ("abc", "1"),
            ("-1", "1"),
            ("+4242", "1"),
            (" 4242", "1"),
            ("4242 ", "1"),
            ("99999999999", "1"),
            ("4242", ""),
            ("4242", "-1"),
            ("4242", "+1"),
            ("4242", "1 "),
            ("4242", "two"),
            ("4242", "99999999999999999999999"),
            ("4242", "2147483645"),
        ] {
            let r = parse_listen_env(Some(pid), Some(fds), me);
            assert!(r.is_err(), "{pid:?} {fds:?} gave {r:?}");
        }
        assert_eq!(
            parse_listen_env(Some("x"), Some("1"), me),
            Err("LISTEN_PID=\"x\" is not a pid".to_string())
        );
        assert_eq!(
            parse_listen_env(Some("4242"), Some("x"), me),
            Err("LISTEN_FDS=\"x\" is not a count".to_string())
        );
        assert_eq!(
            parse_listen_env(Some("4242"), Some("2147483644"), me),
            Ok(Some(2147483644))
        );
    }

    /// `fd` duplicated onto a free fd ≥ 500 without close-on-exec, as systemd
    /// hands it over (F_DUPFD picks a free number atomically, so parallel tests
    /// never clobber each other's fds the way dup2 onto a fixed number could).
    fn dup_high(fd: &impl AsRawFd) -> OwnedFd {
        // SAFETY: F_DUPFD makes a new fd that nothing else owns.
        let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD, 500) };
        assert!(new >= 500, "{}", io::Error::last_os_error());
        // SAFETY: `new` is a fresh fd, owned only here.
        unsafe { OwnedFd::from_raw_fd(new) }
    }

    fn fd_flags(fd: RawFd) -> (i32, i32) {
        // SAFETY: reading flags of an fd the caller keeps open.
        unsafe {
            (
                libc::fcntl(fd, libc::F_GETFD),
                libc::fcntl(fd, libc::F_GETFL),
            )
        }
    }

    #[test]
    fn adopts_a_listening_tcp_socket() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = TcpListener::bind(addr) else {
                continue; // no IPv6 on this machine
            };
            let local = l.local_addr().unwrap();
            let fd = dup_high(&l);
            let raw = fd.as_raw_fd();
            assert_eq!(fd_flags(raw).0 & libc::FD_CLOEXEC, 0);
            assert_eq!(fd_flags(raw).1 & libc::O_NONBLOCK, 0);
            let adopted = adopt_listen_fd(fd).unwrap();
            assert_eq!(adopted.as_raw_fd(), raw);
            assert_ne!(fd_flags(raw).0 & libc::FD_CLOEXEC, 0);
            assert_ne!(fd_flags(raw).1 & libc::O_NONBLOCK, 0);
            assert_eq!(adopted.local_addr().unwrap(), local);
            // Non-blocking: nothing pending is WouldBlock, not a hang.
            let e = adopted.accept().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
            let _c = TcpStream::connect(local).unwrap();
            let t = Instant::now();
            loop {
                match adopted.accept() {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        assert!(t.elapsed() < Duration::from_secs(5));
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }

    #[test]
    fn refuses_what_is_not_a_listening_tcp_socket() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let conn = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let e = adopt_listen_fd(dup_high(&conn)).unwrap_err();
        assert!(e.contains("not listening"), "{e}");

        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = adopt_listen_fd(dup_high(&udp)).unwrap_err();
        assert!(e.contains("not a TCP socket (socket type"), "{e}");

        let dir = temp_dir();
        let ul = UnixListener::bind(dir.join("s")).unwrap();
        let e = adopt_listen_fd(dup_high(&ul)).unwrap_err();
        assert!(e.contains("not a TCP socket (address family"), "{e}");

        let file = std::fs::File::open("/proc/self/status").unwrap();
        let e = adopt_listen_fd(dup_high(&file)).unwrap_err();
        assert!(e.contains("not a socket"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
