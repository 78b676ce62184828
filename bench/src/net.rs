//! Non-blocking client connections.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use mio::net::TcpStream;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Opens connections round-robin over the target addresses.
///
/// For IPv4 loopback targets, connections can also rotate over source
/// addresses 127.0.0.1 … 127.0.0.`spread` (with IP_BIND_ADDRESS_NO_PORT, so
/// the port is still picked at connect time). That multiplies the ephemeral
/// port space, which connection churn at tens of thousands per second would
/// otherwise exhaust with TIME_WAIT sockets.
pub struct Connector {
    addrs: Vec<SocketAddr>,
    spread: u8,
    next: usize,
}

impl Connector {
    pub fn new(addrs: Vec<SocketAddr>, spread: u8) -> Connector {
        assert!(!addrs.is_empty());
        Connector {
            addrs,
            spread: spread.max(1),
            next: 0,
        }
    }

    /// Starts a non-blocking connect. The stream reports writable once the
    /// handshake is done (or an error through `take_error`).
    pub fn connect(&mut self) -> io::Result<TcpStream> {
        let n = self.next;
        self.next = self.next.wrapping_add(1);
        let addr = self.addrs[n % self.addrs.len()];
        let sock = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )?;
        if let SocketAddr::V4(a) = addr
            && self.spread > 1
            && a.ip().is_loopback()
        {
            let k = ((n / self.addrs.len()) % self.spread as usize) as u8;
            set_bind_address_no_port(&sock)?;
            let src = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1 + k), 0);
            sock.bind(&SockAddr::from(src))?;
        }
        sock.set_tcp_nodelay(true)?;
        match sock.connect(&SockAddr::from(addr)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(TcpStream::from_std(sock.into()))
    }
}

fn set_bind_address_no_port(sock: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `one` (an int) for the given length.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether a connecting stream has finished its handshake: `Ok(true)` when
/// connected, `Ok(false)` while still in progress, `Err` when it failed.
pub fn connected(s: &TcpStream) -> io::Result<bool> {
    if let Some(e) = s.take_error()? {
        return Err(e);
    }
    match s.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits for events for at most `left`, capped at 100 ms so the caller's
/// clock checks stay frequent. An interrupted wait is not an error: it just
/// returns with no events (mio clears `events` before waiting).
pub fn wait(
    poll: &mut mio::Poll,
    events: &mut mio::Events,
    left: std::time::Duration,
) -> io::Result<()> {
    match poll.poll(
        events,
        Some(left.min(std::time::Duration::from_millis(100))),
    ) {
        Err(e) if e.kind() != io::ErrorKind::Interrupted => Err(e),
        _ => Ok(()),
    }
}
