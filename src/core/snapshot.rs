//! A snapshot of one worker's connections, taken when another thread asks
//! for one ([`Control::Snapshot`](crate::core::Control::Snapshot), behind
//! `GET /api/connections`), as HAProxy's `show sess` does. The worker walks
//! its slab once and hands the rows to the asker's callback; nothing is kept
//! or counted per line for it. What a connection's hooks know (its client
//! after a PROXY header, its listener, its totals) comes from
//! [`Hooks::about`]; where it is in its life comes from the connection.

use std::net::SocketAddr;
use std::time::Duration;

use crate::core::Core;
use crate::core::hooks::{About, Hooks};
use crate::core::session::{Entry, Session};
use crate::network::connection::{Flow, Phase};

/// Where a connection is, as the status page shows it. When several hold,
/// the first in this order wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Awaiting its PROXY header (a preface): nothing answered yet.
    ProxyHeader,
    /// Shutdown: every reply handed to the kernel and our side shut;
    /// waiting for the client to close.
    Lingering,
    /// Reads no more (a shutdown, or the client half-closed) and sends its
    /// last replies.
    Draining,
    /// Held by the global memory bound (`--max-buffered`): not read until
    /// its allowance grows.
    Held,
    /// Paused by flow control: its replies wait for it to read.
    Paused,
    /// Reading and answering.
    Reading,
}

impl State {
    /// The name in `/api/connections` and on the page.
    pub fn label(self) -> &'static str {
        match self {
            State::ProxyHeader => "proxy_header",
            State::Lingering => "lingering",
            State::Draining => "draining",
            State::Held => "held",
            State::Paused => "paused",
            State::Reading => "reading",
        }
    }
}

/// One connection of the snapshot.
#[derive(Debug, Clone)]
pub struct ConnRow {
    /// Its id (unique within its worker).
    pub id: u64,
    /// Where it is.
    pub state: State,
    /// Since it was accepted, if the hooks know when that was.
    pub age: Option<Duration>,
    /// Bytes of replies the socket has not taken yet.
    pub unsent: usize,
    /// The TCP peer (`getpeername()`), asked only when the hooks do not
    /// name the client.
    pub peer: Option<SocketAddr>,
    /// What the hooks know of it.
    pub about: About,
}

/// A listener this worker serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerRow {
    /// Where its socket is bound.
    pub bound: SocketAddr,
    /// Its connections start with a PROXY header.
    pub proxy: bool,
}

/// One worker's connections and listeners at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Its live listeners (none once a shutdown began).
    pub listeners: Vec<ListenerRow>,
    /// Every open connection, in slab order.
    pub connections: Vec<ConnRow>,
}

/// Where a worker's snapshot goes: called once, on the worker's thread. It
/// must not block (hand the snapshot to a channel).
pub type Reply = Box<dyn FnOnce(Snapshot) + Send>;

/// A connection's state; see [`State`] for the order.
fn state_of<H: Hooks>(entry: &Entry<H>) -> State {
    if matches!(entry.session, Session::Preface(_)) {
        return State::ProxyHeader;
    }
    match entry.conn.phase() {
        Phase::Lingering => State::Lingering,
        Phase::Draining { .. } | Phase::InputDone { .. } => State::Draining,
        Phase::Open if entry.held => State::Held,
        Phase::Open if entry.conn.flow() == Flow::Paused => State::Paused,
        Phase::Open => State::Reading,
    }
}

impl<H: Hooks> Core<H> {
    /// Walks the slab once: every connection and listener of this worker.
    /// Step 8: answers the snapshots asked for in this turn. At the end of
    /// the turn, once the hooks have published its counts (step 7): a
    /// snapshot answered earlier could show a connection's bytes before the
    /// totals that `/api` reads include them.
    pub(super) fn answer_snapshots(&mut self) {
        if self.snapshots_asked.is_empty() {
            return;
        }
        for reply in std::mem::take(&mut self.snapshots_asked) {
            reply(self.snapshot());
        }
    }

    pub(super) fn snapshot(&self) -> Snapshot {
        let now = self.clock.now;
        let connections = self
            .connections
            .iter()
            .map(|(_, entry)| {
                let about = match &entry.session {
                    Session::Serving(state) => self.hooks.about(state),
                    Session::Preface(preface) => self.hooks.about_preface(preface),
                };
                ConnRow {
                    id: entry.conn.id,
                    state: state_of(entry),
                    age: about.since.map(|t| now.saturating_duration_since(t)),
                    unsent: entry.conn.pending_len(),
                    peer: match about.client {
                        Some(_) => None,
                        None => entry.conn.peer_addr().ok(),
                    },
                    about,
                }
            })
            .collect();
        let listeners = self
            .listeners
            .iter()
            .map(|(_, ls)| ListenerRow {
                bound: ls.listener.bound,
                proxy: ls.listener.addr.proxy,
            })
            .collect();
        Snapshot {
            listeners,
            connections,
        }
    }
}
