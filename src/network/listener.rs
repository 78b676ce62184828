//! eXpServer's `xps_listener`: one listening socket bound to one host:port.
//!
//! | C tutorial                          | here                                   |
//! |-------------------------------------|----------------------------------------|
//! | `xps_listener_create()`             | [`bind`] then [`Listener::new`]        |
//! | `xps_listener_destroy()`            | dropping the [`Listener`] (closes it)  |
//! | `xps_listener_connection_handler()` | `Core::listener_connection_handler`    |
//! | `xps_getaddrinfo()`                 | [`resolve`] (first address)            |
//!
//! Binding is split from the event loop on purpose: `main` binds every socket
//! of every worker *before* any worker starts, so a port in use stops start-up
//! with exit status 1 and nothing half-served. The accept loop lives in the
//! core, which owns the connection table and the connection cap; this module
//! only says what an accept error means ([`classify_accept_error`]).

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Instant;

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::ListenAddr;

/// listen(2) backlog. Connections past `--max-connections` wait here, so it is
/// far above the tutorial's 64; the kernel caps it at `net.core.somaxconn`.
pub const BACKLOG: i32 = 4096;

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

/// Creates a non-blocking listening socket on `at`: SO_REUSEADDR (restart
/// without waiting out TIME_WAIT), SO_REUSEPORT when several workers each
/// bind the same port, IPV6_V6ONLY for IPv6 (so `[::]:8001` and
/// `0.0.0.0:8001` can both be opened), TCP_NODELAY, then bind and listen.
///
/// TCP_NODELAY is for the connections: replies are written whole, once per
/// pass, and Nagle's algorithm would only hold back a reply while an earlier
/// one is unacknowledged (up to the client's delayed-ACK timer, 40 ms, for a
/// pipelining client). Linux copies it from the listening socket to every
/// socket `accept()` returns, so setting it here once saves a `setsockopt`
/// per connection (`tests::accepted_sockets_inherit_nodelay` checks this).
pub fn bind(
    addr: &ListenAddr,
    at: SocketAddr,
    reuse_port: bool,
) -> Result<std::net::TcpListener, ListenError> {
    let step = |what: &'static str| {
        move |e: io::Error| ListenError {
            addr: addr.clone(),
            reason: format!("{what}: {}", crate::os_reason(&e)),
        }
    };
    let socket = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))
        .map_err(step("socket()"))?;
    socket
        .set_reuse_address(true)
        .map_err(step("setsockopt(SO_REUSEADDR)"))?;
    if reuse_port {
        socket
            .set_reuse_port(true)
            .map_err(step("setsockopt(SO_REUSEPORT)"))?;
    }
    if at.is_ipv6() {
        socket
            .set_only_v6(true)
            .map_err(step("setsockopt(IPV6_V6ONLY)"))?;
    }
    socket
        .set_tcp_nodelay(true)
        .map_err(step("setsockopt(TCP_NODELAY)"))?;
    socket.bind(&at.into()).map_err(step("bind()"))?;
    socket.listen(BACKLOG).map_err(step("listen()"))?;
    socket
        .set_nonblocking(true)
        .map_err(step("set non-blocking"))?;
    Ok(socket.into())
}

/// A listening socket attached to a worker's loop.
#[derive(Debug)]
pub struct Listener {
    /// The non-blocking listening socket.
    pub socket: mio::net::TcpListener,
    /// The address as configured, for logs.
    pub addr: ListenAddr,
    /// While set, accepting is paused until then (out of file descriptors or
    /// memory: nginx's accept back-off).
    pub paused_until: Option<Instant>,
}

impl Listener {
    /// Wraps a socket made by [`bind`].
    pub fn new(socket: std::net::TcpListener, addr: ListenAddr) -> Listener {
        Listener {
            socket: mio::net::TcpListener::from_std(socket),
            addr,
            paused_until: None,
        }
    }
}

/// What to do after `accept()` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptVerdict {
    /// The backlog is empty: wait for the next readiness event.
    Drained,
    /// A signal interrupted the call: try again at once.
    Retry,
    /// That one connection failed (it was aborted or reset before we took it,
    /// or a firewall refused it): skip it and accept the next.
    SkipOne,
    /// The process or system ran out of file descriptors or memory: pause
    /// accepting on this listener for a moment instead of spinning on an
    /// accept that will fail again.
    BackOff,
}

/// Sorts an accept error into what the accept loop should do.
pub fn classify_accept_error(e: &io::Error) -> AcceptVerdict {
    match e.kind() {
        io::ErrorKind::WouldBlock => return AcceptVerdict::Drained,
        io::ErrorKind::Interrupted => return AcceptVerdict::Retry,
        _ => {}
    }
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptVerdict::BackOff,
        // ECONNABORTED, EPROTO, EPERM, and the network errors Linux passes
        // through accept(2) (ENETDOWN, EHOSTUNREACH …) concern one pending
        // connection, not the listener.
        _ => AcceptVerdict::SkipOne,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_sockets_inherit_nodelay() {
        for host in ["127.0.0.1", "::1"] {
            let addr = ListenAddr {
                host: host.to_string(),
                port: 0,
            };
            let at = resolve(&addr).unwrap();
            let listener = match bind(&addr, at, false) {
                Ok(l) => l,
                Err(_) if at.is_ipv6() => continue, // no IPv6 on this machine
                Err(e) => panic!("{e}"),
            };
            let local = listener.local_addr().unwrap();
            let _client = std::net::TcpStream::connect(local).unwrap();
            listener.set_nonblocking(false).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            assert!(accepted.nodelay().unwrap(), "{host}: Nagle is on");
        }
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
