//! eXpServer's `xps_listener`: one listening socket bound to one host:port.
//!
//! | C tutorial                          | here                                   |
//! |-------------------------------------|----------------------------------------|
//! | `xps_listener_create()`             | [`create`] (and [`create_all`] for every worker), then the worker attaches it |
//! | `xps_listener_destroy()`            | [`Listener::destroy`]                  |
//! | `xps_listener_connection_handler()` | [`Listener::connection_handler`]       |
//! | `xps_getaddrinfo()`                 | [`resolve`] (first address)            |
//!
//! Binding is split from the event loop on purpose: every socket of every
//! worker is bound *before* any worker starts, so a port in use stops
//! start-up with exit status 1 and nothing half-served. The accept loop
//! accepts until `WouldBlock` (edge-triggered), takes a `--max-connections`
//! slot before each `accept()` (at the cap, clients wait in the backlog),
//! and sorts accept errors ([`classify_accept_error`]) so that none makes it
//! spin.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::ListenAddr;
use crate::slots::{Slot, Slots};
use crate::utils::logger::Level;
use crate::xps_log;

/// listen(2) backlog. Connections past `--max-connections` wait here, so it is
/// far above the tutorial's 64; the kernel caps it at `net.core.somaxconn`.
pub const BACKLOG: i32 = 4096;
/// Connections accepted per listener per call before the others get a turn.
pub const ACCEPT_BUDGET: usize = 256;
/// How long accepting pauses after EMFILE/ENFILE/ENOBUFS/ENOMEM or an
/// unknown accept error (unless a connection closes first).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why a listener could not be opened: exit status 1, with this one line.
#[derive(Debug)]
pub struct ListenError {
    /// The address as the user wrote it.
    pub addr: ListenAddr,
    /// What failed (`resolve`, `bind` …) and the OS reason.
    pub reason: String,
}

impl std::fmt::Display for ListenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot listen on {}: {}", self.addr, self.reason)
    }
}

/// `xps_getaddrinfo()`: the first address `host` resolves to.
pub fn resolve(addr: &ListenAddr) -> Result<SocketAddr, ListenError> {
    let fail = |reason: String| ListenError {
        addr: addr.clone(),
        reason,
    };
    (addr.host.as_str(), addr.port)
        .to_socket_addrs()
        .map_err(|e| fail(format!("cannot resolve host: {}", crate::os_reason(&e))))?
        .next()
        .ok_or_else(|| fail("host resolves to no address".to_string()))
}

/// `xps_listener_create()`'s socket half: a non-blocking listening socket
/// on `at`: SO_REUSEADDR (restart
/// without waiting out TIME_WAIT), SO_REUSEPORT when several workers each
/// bind the same port, IPV6_V6ONLY for IPv6 (so `[::]:8001` and
/// `0.0.0.0:8001` can both be opened), TCP_NODELAY and SO_OOBINLINE, then
/// bind and listen.
///
/// TCP_NODELAY is for the connections: replies are written whole, once per
/// pass, and Nagle's algorithm would only hold back a reply while an earlier
/// one is unacknowledged (up to the client's delayed-ACK timer, 40 ms, for a
/// pipelining client). SO_OOBINLINE keeps TCP urgent data in the byte stream,
/// in order, so it is answered like any other byte instead of being cut out
/// of the line. Linux copies both from the listening socket to every socket
/// `accept()` returns, so setting them here once saves two `setsockopt`s per
/// connection (`tests::accepted_sockets_inherit_nodelay_and_oobinline`
/// checks this).
pub fn create(
    addr: &ListenAddr,
    at: SocketAddr,
    reuse_port: bool,
) -> Result<std::net::TcpListener, ListenError> {
    let socket = socket_for(addr, at, reuse_port)?;
    socket
        .bind(&at.into())
        .map_err(|e| failed(addr, "bind()", e))?;
    socket
        .listen(BACKLOG)
        .map_err(|e| failed(addr, "listen()", e))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| failed(addr, "set non-blocking", e))?;
    Ok(socket.into())
}

/// Checks that no socket of any process listens on `at`, and returns the
/// address a socket could bind there (port 0 resolved to a free port).
///
/// Why: with several workers every socket of ours must set SO_REUSEPORT,
/// and the kernel lets any other SO_REUSEPORT socket of the same user join
/// the group — a second `xps -w 2` on the same port would start without
/// error and silently take part of the traffic. A socket *without*
/// SO_REUSEPORT cannot bind where any other socket listens, so binding one
/// (and closing it again, without listening) proves the port is free before
/// the workers' sockets are bound. A process that binds the port in the
/// microseconds between the probe and the first worker socket is not caught.
pub fn probe_free(addr: &ListenAddr, at: SocketAddr) -> Result<SocketAddr, ListenError> {
    let socket = socket_for(addr, at, false)?;
    socket
        .bind(&at.into())
        .map_err(|e| failed(addr, "bind()", e))?;
    let local = socket
        .local_addr()
        .map_err(|e| failed(addr, "getsockname()", e))?;
    local.as_socket().ok_or_else(|| ListenError {
        addr: addr.clone(),
        reason: "getsockname(): not an IP address".to_string(),
    })
}

/// The [`ListenError`] for an OS error of one set-up step.
fn failed(addr: &ListenAddr, what: &str, e: io::Error) -> ListenError {
    ListenError {
        addr: addr.clone(),
        reason: format!("{what}: {}", crate::os_reason(&e)),
    }
}

/// A TCP socket for `at` with every option of [`create`], not yet bound.
fn socket_for(addr: &ListenAddr, at: SocketAddr, reuse_port: bool) -> Result<Socket, ListenError> {
    let socket = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| failed(addr, "socket()", e))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| failed(addr, "setsockopt(SO_REUSEADDR)", e))?;
    if reuse_port {
        socket
            .set_reuse_port(true)
            .map_err(|e| failed(addr, "setsockopt(SO_REUSEPORT)", e))?;
    }
    if at.is_ipv6() {
        socket
            .set_only_v6(true)
            .map_err(|e| failed(addr, "setsockopt(IPV6_V6ONLY)", e))?;
    }
    socket
        .set_tcp_nodelay(true)
        .map_err(|e| failed(addr, "setsockopt(TCP_NODELAY)", e))?;
    socket
        .set_out_of_band_inline(true)
        .map_err(|e| failed(addr, "setsockopt(SO_OOBINLINE)", e))?;
    Ok(socket)
}

/// The listening sockets of every worker, and the addresses they are bound
/// to (one per configured listener, port 0 resolved).
pub struct OpenListeners {
    /// `per_worker[w]` holds worker `w`'s sockets, in configuration order.
    pub per_worker: Vec<Vec<Listener>>,
    /// The bound address of each configured listener.
    pub bound: Vec<SocketAddr>,
}

/// `xps_getaddrinfo()` for every listener: the first address each host
/// resolves to. Two listeners that resolve to the same socket address
/// (`localhost:8001` and `127.0.0.1:8001`) would be one socket: an error
/// naming both, the same at start-up, `--check` and reload. Port 0 ("any
/// free port") is a listener of its own each time.
pub fn resolve_all(addrs: &[ListenAddr]) -> Result<Vec<SocketAddr>, ListenError> {
    let mut resolved: Vec<SocketAddr> = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let at = resolve(addr)?;
        if at.port() != 0
            && let Some(j) = resolved.iter().position(|&r| r == at)
        {
            return Err(ListenError {
                addr: addr.clone(),
                reason: format!("the same address ({at}) as {}", addrs[j]),
            });
        }
        resolved.push(at);
    }
    Ok(resolved)
}

/// The tutorial's `Server listening on port N` line for each address in
/// `bound`, logged once every socket of every worker is open (`source` names
/// who opened them: `main()` at start-up, the reload).
pub fn log_listening(bound: &[SocketAddr], source: &str) {
    for at in bound {
        xps_log!(
            Level::Info,
            source,
            "Server listening on port {} ({})",
            at.port(),
            at
        );
    }
}

/// Resolves `addrs` ([`resolve_all`]) and opens each once per worker
/// ([`create_resolved`]).
pub fn create_all(addrs: &[ListenAddr], workers: usize) -> Result<OpenListeners, ListenError> {
    let resolved = resolve_all(addrs)?;
    let pairs: Vec<(ListenAddr, SocketAddr)> = addrs.iter().cloned().zip(resolved).collect();
    create_resolved(&pairs, workers)
}

/// Opens each resolved listener once per worker. With several workers each
/// address is first probed ([`probe_free`]), because their SO_REUSEPORT
/// sockets would otherwise share a port with any other process that asks;
/// port 0 is resolved once, so every worker shares the port.
pub fn create_resolved(
    addrs: &[(ListenAddr, SocketAddr)],
    workers: usize,
) -> Result<OpenListeners, ListenError> {
    let reuse_port = workers > 1;
    let mut per_worker: Vec<Vec<Listener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::with_capacity(addrs.len());
    for (addr, at) in addrs {
        let mut at = *at;
        if reuse_port {
            at = probe_free(addr, at)?;
        }
        for list in per_worker.iter_mut() {
            let socket = create(addr, at, reuse_port)?;
            let local = socket
                .local_addr()
                .map_err(|e| failed(addr, "getsockname()", e))?;
            at.set_port(local.port());
            list.push(Listener::new(socket, addr.clone(), at));
        }
        bound.push(at);
    }
    Ok(OpenListeners { per_worker, bound })
}

/// A listening socket, served by one worker.
#[derive(Debug)]
pub struct Listener {
    /// The non-blocking listening socket.
    pub socket: mio::net::TcpListener,
    /// The address as configured (host as written, PROXY flag); on a kept
    /// listener a reload replaces it.
    pub addr: ListenAddr,
    /// The address it is bound to (port 0 resolved): what the listener *is*,
    /// across reloads (see `control::reload`).
    pub bound: SocketAddr,
    /// While set, accepting is paused until then (out of file descriptors or
    /// memory: nginx's accept back-off).
    pub paused_until: Option<Instant>,
}

/// What one call of the accept loop produced, in order.
#[derive(Debug)]
pub enum Accept {
    /// A new connection and the slot it holds.
    Connection(mio::net::TcpStream, SocketAddr, Slot),
    /// `accept()` failed: skipped (one connection) or backing off.
    Failed(io::Error, AcceptVerdict),
}

/// Whether connections may still wait in the backlog after the accept loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backlog {
    /// Empty: wait for the next readiness event.
    Drained,
    /// Maybe not empty (the turn's budget, the connection cap, or a
    /// back-off stopped the loop): try again later.
    Left,
}

impl Listener {
    /// Wraps a socket made by [`create`], bound to `bound`.
    pub fn new(socket: std::net::TcpListener, addr: ListenAddr, bound: SocketAddr) -> Listener {
        Listener {
            socket: mio::net::TcpListener::from_std(socket),
            addr,
            bound,
            paused_until: None,
        }
    }

    /// `xps_listener_connection_handler()`: accepts until the backlog is
    /// empty, [`ACCEPT_BUDGET`] connections are taken, the connection cap is
    /// reached, or the OS refuses; each new socket (with the slot taken for
    /// it before `accept()`) or failure is appended to `out`.
    pub fn connection_handler(
        &mut self,
        now: Instant,
        slots: &std::sync::Arc<Slots>,
        out: &mut Vec<Accept>,
    ) -> Backlog {
        for _ in 0..ACCEPT_BUDGET {
            let Some(slot) = slots.try_acquire() else {
                return Backlog::Left; // at the cap: clients wait in the backlog
            };
            match self.socket.accept() {
                Ok((stream, peer)) => {
                    xps_log!(
                        Level::Trace,
                        "xps_listener_connection_handler()",
                        "{}: accept: a connection from {peer}",
                        self.bound
                    );
                    out.push(Accept::Connection(stream, peer, slot))
                }
                Err(e) => match classify_accept_error(&e) {
                    AcceptVerdict::Drained => {
                        xps_log!(
                            Level::Trace,
                            "xps_listener_connection_handler()",
                            "{}: accept: WouldBlock, backlog empty",
                            self.bound
                        );
                        return Backlog::Drained;
                    }
                    AcceptVerdict::Retry => {}
                    AcceptVerdict::SkipOne => out.push(Accept::Failed(e, AcceptVerdict::SkipOne)),
                    AcceptVerdict::BackOff => {
                        self.paused_until = Some(now + ACCEPT_BACKOFF);
                        out.push(Accept::Failed(e, AcceptVerdict::BackOff));
                        return Backlog::Left;
                    }
                },
            }
        }
        Backlog::Left
    }

    /// `xps_listener_destroy()`: closes the socket (which detaches it from
    /// epoll); connections accepted from it go on.
    pub fn destroy(self) {
        xps_log!(
            Level::Debug,
            "xps_listener_destroy()",
            "destroyed listener on {}",
            self.bound
        );
    }
}

/// What to do after `accept()` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptVerdict {
    /// The backlog is empty: wait for the next readiness event.
    Drained,
    /// A signal interrupted the call: try again at once.
    Retry,
    /// That one connection failed (it was aborted or reset before we took
    /// it): skip it and accept the next.
    SkipOne,
    /// The process or system ran out of file descriptors or memory, or the
    /// error is not known to concern one connection: pause accepting on this
    /// listener for a moment instead of spinning on an accept that will fail
    /// again.
    BackOff,
}

/// Sorts an accept error into what the accept loop should do.
///
/// Only errors known to concern one pending connection are skipped; any
/// other error — out of descriptors or memory, and anything unknown, such as
/// EINVAL or an EPERM from a security module, which would fail again at once
/// — backs off with a (rate-limited) warning, so no error can make the loop
/// spin.
pub fn classify_accept_error(e: &io::Error) -> AcceptVerdict {
    match e.kind() {
        io::ErrorKind::WouldBlock => return AcceptVerdict::Drained,
        io::ErrorKind::Interrupted => return AcceptVerdict::Retry,
        _ => {}
    }
    match e.raw_os_error() {
        // The connection was aborted before we took it, or one of the
        // network errors Linux passes through accept(2) for that connection
        // (see accept(2), "Error handling").
        Some(
            libc::ECONNABORTED
            | libc::EPROTO
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH
            | libc::ETIMEDOUT
            | libc::ECONNRESET,
        ) => AcceptVerdict::SkipOne,
        _ => AcceptVerdict::BackOff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_sockets_inherit_nodelay_and_oobinline() {
        for host in ["127.0.0.1", "::1"] {
            let addr = ListenAddr {
                host: host.to_string(),
                port: 0,
                proxy: false,
            };
            let at = resolve(&addr).unwrap();
            let listener = match create(&addr, at, false) {
                Ok(l) => l,
                Err(e) if at.is_ipv6() => {
                    eprintln!("SKIPPED the IPv6 half: cannot bind [::1]:0 ({e})");
                    continue;
                }
                Err(e) => panic!("{e}"),
            };
            let local = listener.local_addr().unwrap();
            let _client = std::net::TcpStream::connect(local).unwrap();
            listener.set_nonblocking(false).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            assert!(accepted.nodelay().unwrap(), "{host}: Nagle is on");
            let accepted = Socket::from(accepted);
            assert!(
                accepted.out_of_band_inline().unwrap(),
                "{host}: urgent data is not inline"
            );
        }
    }

    #[test]
    fn the_probe_finds_a_port_held_with_so_reuseport() {
        let addr = ListenAddr {
            host: "127.0.0.1".to_string(),
            port: 0,
            proxy: false,
        };
        let at = resolve(&addr).unwrap();
        let free = probe_free(&addr, at).unwrap();
        assert_ne!(free.port(), 0, "port 0 is resolved");
        let held = create(&addr, free, true).unwrap();
        let e = probe_free(&addr, held.local_addr().unwrap()).unwrap_err();
        assert!(e.reason.contains("Address already in use"), "{e}");
        // ...while a second SO_REUSEPORT socket alone would have joined it.
        assert!(create(&addr, held.local_addr().unwrap(), true).is_ok());
    }

    #[test]
    fn accept_errors_are_sorted() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(
            classify_accept_error(&os(libc::EMFILE)),
            AcceptVerdict::BackOff
        );
        assert_eq!(
            classify_accept_error(&os(libc::ENFILE)),
            AcceptVerdict::BackOff
        );
        assert_eq!(
            classify_accept_error(&os(libc::ENOBUFS)),
            AcceptVerdict::BackOff
        );
        assert_eq!(
            classify_accept_error(&os(libc::ENOMEM)),
            AcceptVerdict::BackOff
        );
        assert_eq!(
            classify_accept_error(&os(libc::ECONNABORTED)),
            AcceptVerdict::SkipOne
        );
        assert_eq!(
            classify_accept_error(&os(libc::EPROTO)),
            AcceptVerdict::SkipOne
        );
        // Unknown or persistent errors back off instead of spinning.
        for errno in [
            libc::EINVAL,
            libc::EPERM,
            libc::EBADF,
            libc::ENOTSOCK,
            libc::EFAULT,
        ] {
            assert_eq!(
                classify_accept_error(&os(errno)),
                AcceptVerdict::BackOff,
                "errno {errno}"
            );
        }
        assert_eq!(
            classify_accept_error(&os(libc::EAGAIN)),
            AcceptVerdict::Drained
        );
        assert_eq!(
            classify_accept_error(&os(libc::EINTR)),
            AcceptVerdict::Retry
        );
    }
}
