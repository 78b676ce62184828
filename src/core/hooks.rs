//! Where features plug into a worker: the points of a connection's life at
//! which the worker asks, as nginx's phase handlers and Sōzu's session
//! states do. The worker calls these and knows nothing of what answers.
//!
//! * at accept: serve, refuse, or first read a preface (a PROXY header),
//!   which upgrades to a served connection or is refused;
//! * before each read pass: how many bytes the connection may read;
//! * after each pass, and when a connection ends: what moved, and why;
//! * once per loop turn: wake-up and end of turn.
//!
//! `()` is the set that does nothing: `Core<()>` is the tutorial's server
//! (`examples/stage6.rs`), and the compiler leaves every call out. The
//! production set is `crate::features::Features`. Each hook keeps its own
//! state per listener and per connection (the associated types), so a
//! feature that is off costs a connection nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::ListenAddr;
use crate::network::connection::{Connection, Pass};
use crate::network::io::CloseReason;

/// What to do with an accepted connection.
#[derive(Debug)]
pub enum Verdict<C, P> {
    /// Serve it, with this state.
    Serve(C),
    /// Close it unread (the hooks have counted and logged why).
    Refuse,
    /// Read a preface first, complete `within` of accept.
    Preface {
        /// What the hooks keep while it is read.
        state: P,
        /// Its deadline.
        within: Duration,
    },
}

/// What the bytes fed to a preface gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefaceStep {
    /// Not complete yet: read more.
    More,
    /// Complete: the first `n` bytes of this feed were the preface's; the
    /// rest are the client's first bytes.
    Done(usize),
    /// These bytes can never complete a preface: refuse.
    Bad,
}

/// How a preface ended without completing.
#[derive(Debug)]
pub enum PrefaceEnd {
    /// Its bytes were bad ([`PrefaceStep::Bad`]).
    Bad,
    /// The client closed before it was complete.
    Closed,
    /// Not complete within its deadline.
    Timeout,
    /// The socket failed.
    Failed(CloseReason),
    /// The server is shutting down.
    Shutdown,
}

impl From<CloseReason> for PrefaceEnd {
    /// A close during the preface: the deadline (kept as its idle one), a
    /// shutdown, or the socket.
    fn from(reason: CloseReason) -> PrefaceEnd {
        match reason {
            CloseReason::IdleTimeout { .. } => PrefaceEnd::Timeout,
            CloseReason::Shutdown => PrefaceEnd::Shutdown,
            other => PrefaceEnd::Failed(other),
        }
    }
}

impl std::fmt::Display for PrefaceEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrefaceEnd::Bad => f.write_str("its preface can never be valid"),
            PrefaceEnd::Closed => f.write_str("peer closed before its preface was complete"),
            PrefaceEnd::Timeout => f.write_str("preface not complete in time"),
            PrefaceEnd::Failed(reason) => reason.fmt(f),
            PrefaceEnd::Shutdown => f.write_str("server shutting down"),
        }
    }
}

/// What the hooks carry of a connection that moves to another process
/// (SPEC §7), as plain data: who the client is, since when, what moved.
/// The hooks of the process it leaves fill it in
/// ([`Hooks::hand_over`]); those of the process it joins take it back
/// ([`Hooks::adopt`]). `()` carries nothing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Carried {
    /// The listener's name (its bound address), if the hooks kept it.
    pub listener: String,
    /// The client, if the hooks know it (a PROXY header's source).
    pub client: Option<SocketAddr>,
    /// The balancer that sent the PROXY header (the TCP peer).
    pub proxy: Option<SocketAddr>,
    /// Time since accept (0 if the hooks did not keep it).
    pub age: Duration,
    /// Bytes received, bytes sent and replies so far (for its access-log
    /// record).
    pub totals: [u64; 3],
    /// During a preface: its bytes read so far.
    pub preface: Vec<u8>,
}

impl Carried {
    /// What a served connection carries: what its hooks know of it
    /// ([`About`], the same view a snapshot shows), its age taken at `now`.
    pub fn of(about: About, now: Instant) -> Carried {
        Carried {
            listener: about.listener.as_deref().unwrap_or_default().to_string(),
            client: about.client,
            proxy: about.proxy,
            age: about
                .since
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
            totals: [about.received, about.sent, about.lines],
            preface: Vec::new(),
        }
    }
}

/// What the hooks know of one connection, for a snapshot of the worker's
/// connections (`/api/connections`): asked only when a snapshot is taken,
/// never per line. `Default` is "nothing known".
#[derive(Debug, Default, Clone)]
pub struct About {
    /// The listener it came through, as the hooks name it.
    pub listener: Option<Arc<str>>,
    /// The client: the TCP peer, or the address a PROXY header named.
    pub client: Option<SocketAddr>,
    /// On a PROXY listener, the balancer (the TCP peer).
    pub proxy: Option<SocketAddr>,
    /// When it was accepted.
    pub since: Option<Instant>,
    /// Bytes read from it (after any PROXY header).
    pub received: u64,
    /// Bytes written to it.
    pub sent: u64,
    /// Replies made to it.
    pub lines: u64,
}

/// The points where features plug in. Every method but the accept and
/// preface ones has a default that does nothing.
pub trait Hooks {
    /// What the hooks keep per listener.
    type Listener;
    /// What the hooks keep per served connection.
    type Conn;
    /// What the hooks keep while a connection's preface is read.
    type Preface;
    /// What a reload hands the hooks (access rules and the like).
    type Update: Send;

    /// A listener starts being served by this worker (start-up, reload).
    fn listener(&mut self, addr: &ListenAddr, bound: SocketAddr) -> Self::Listener;

    /// A kept listener's configuration changed on reload (not its address).
    fn listener_changed(&mut self, _listener: &mut Self::Listener, _addr: &ListenAddr) {}

    /// A reload's settings for connections accepted from now on.
    fn reconfigure(&mut self, _update: Self::Update) {}

    /// Once per wake-up, before its events; `open` connections are open.
    fn woke(&mut self, _now: Instant, _open: usize) {}

    /// `accept()` failed (it was skipped or the listener backs off).
    fn accept_failed(&mut self, _e: &std::io::Error) {}

    /// A socket was accepted from `peer` on `listener`.
    fn on_accept(
        &mut self,
        listener: &Self::Listener,
        peer: SocketAddr,
        now: Instant,
    ) -> Verdict<Self::Conn, Self::Preface>;

    /// The next bytes of a preface.
    fn preface_feed(&mut self, preface: &mut Self::Preface, bytes: &[u8]) -> PrefaceStep;

    /// The preface is complete: the state to serve the connection with, or
    /// `None` to refuse it (the hooks count and log why).
    fn preface_done(&mut self, preface: &mut Self::Preface, now: Instant) -> Option<Self::Conn>;

    /// The preface ended without completing (the hooks count and log it).
    fn preface_failed(&mut self, preface: &mut Self::Preface, why: PrefaceEnd, now: Instant);

    /// How many bytes `conn` may read in its next pass (`usize::MAX`: no
    /// bound). 0 stops it until the worker asks again.
    fn allowance(&self, _state: &Self::Conn, _conn: &Connection) -> usize {
        usize::MAX
    }

    /// After each pass of a served connection (and after the replies made
    /// when a drain begins).
    fn on_pass(&mut self, _state: &mut Self::Conn, _pass: &Pass, _conn: &Connection) {}

    /// A served connection ended.
    fn on_close(&mut self, _state: Self::Conn, _reason: &CloseReason, _now: Instant) {}

    /// Once per loop turn, after everything else.
    fn on_turn(&mut self) {}

    /// A served connection leaves this process for another (an upgrade):
    /// not an end (no close is counted, no record written); what to carry.
    fn hand_over(&mut self, _state: Self::Conn, _conn: &Connection, _now: Instant) -> Carried {
        Carried::default()
    }

    /// A connection in its preface leaves this process (its bytes so far
    /// go in [`Carried::preface`]).
    fn hand_over_preface(&mut self, _preface: Self::Preface, _now: Instant) -> Carried {
        Carried::default()
    }

    /// A served connection arrives from another process, TCP peer `peer`:
    /// its state here, admitted whatever the limits (the client is
    /// connected already).
    fn adopt(
        &mut self,
        carried: &Carried,
        peer: SocketAddr,
        conn: &Connection,
        now: Instant,
    ) -> Self::Conn;

    /// A connection in its preface arrives from another process: its
    /// preface state with the bytes carried fed in, or `None` to close it.
    fn adopt_preface(
        &mut self,
        _carried: &Carried,
        _peer: SocketAddr,
        _now: Instant,
    ) -> Option<Self::Preface> {
        None
    }

    /// What the hooks know of a served connection, for a snapshot.
    fn about(&self, _state: &Self::Conn) -> About {
        About::default()
    }

    /// What the hooks know of a connection whose preface is being read.
    fn about_preface(&self, _preface: &Self::Preface) -> About {
        About::default()
    }
}

/// A type with no value: the preface state of hooks that never ask for one,
/// so the compiler knows no preface code can run.
#[derive(Debug)]
pub enum Never {}

/// No features: the tutorial's server.
impl Hooks for () {
    type Listener = ();
    type Conn = ();
    type Preface = Never;
    type Update = ();

    fn listener(&mut self, _addr: &ListenAddr, _bound: SocketAddr) {}

    fn on_accept(&mut self, _: &(), _: SocketAddr, _: Instant) -> Verdict<(), Never> {
        Verdict::Serve(())
    }

    fn preface_feed(&mut self, preface: &mut Never, _: &[u8]) -> PrefaceStep {
        match *preface {}
    }

    fn preface_done(&mut self, preface: &mut Never, _: Instant) -> Option<()> {
        match *preface {}
    }

    fn preface_failed(&mut self, preface: &mut Never, _: PrefaceEnd, _: Instant) {
        match *preface {}
    }

    fn adopt(&mut self, _: &Carried, _: SocketAddr, _: &Connection, _: Instant) {}
}
