//! A worker's part in an upgrade (SPEC §7): moving its connections out to
//! a new process, and taking moved connections in.
//!
//! **Out** (the old process, [`Control::HandOver`]): the worker detaches and
//! closes its listening sockets (the new process holds the same sockets and
//! is accepting already), then takes its connections apart a slice per loop
//! turn — at most [`SLICE_CONNS`] connections or [`SLICE_BYTES`] of state,
//! in batches of at most [`BATCH_CONNS`] (one `SCM_RIGHTS` message) or
//! [`BATCH_BYTES`] — idle ones first, and serves the others between slices,
//! so no client waits for the whole hand-over. A connection taken apart
//! leaves the slab (its queued entries and heap entry die by the usual id
//! and `is_due` checks) and epoll (explicitly: the other process's copy of
//! the socket would keep the registration alive), and its hooks say what to
//! carry ([`Hooks::hand_over`]): it is not an end, so nothing counts it as
//! closed. A snapshot taken between passes is complete: every byte read is
//! answered (in the unsent replies) or held (the unterminated line), and
//! every byte not read waits in the kernel, where it moves with the socket.
//! At most [`IN_FLIGHT`] batches wait for the control thread at a time.
//!
//! **In** (the new process, and the old one when a hand-over fails halfway,
//! [`Control::Adopt`]): at most [`ADOPT_SLICE`] connections per turn, each
//! attached under a fresh key and driven at once: its moved replies go
//! first, then what its client sent meanwhile.
//!
//! [`Control::HandOver`]: crate::core::Control::HandOver
//! [`Control::Adopt`]: crate::core::Control::Adopt

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use crate::config::ListenAddr;
use crate::core::hooks::{Carried, Hooks};
use crate::core::session::{Entry, Session};
use crate::core::timers::{ConnTimers, TimersSnapshot};
use crate::core::{Core, Target};
use crate::network::connection::{Connection, Snapshot};
use crate::network::listener::Listener;
use crate::utils::logger::Level;
use crate::xps_log;

/// Connections per batch: Linux's `SCM_MAX_FD`, one `sendmsg`.
pub const BATCH_CONNS: usize = 253;
/// State bytes (unterminated lines, unsent replies) per batch, about.
pub const BATCH_BYTES: usize = 4 << 20;
/// Connections a worker takes apart per loop turn.
pub const SLICE_CONNS: usize = 1024;
/// State bytes a worker takes apart per loop turn, about.
pub const SLICE_BYTES: usize = 8 << 20;
/// Batches waiting for the control thread, at most.
pub const IN_FLIGHT: usize = 4;
/// Connections a worker takes in per loop turn.
pub const ADOPT_SLICE: usize = 1024;
/// While batches are in flight, how often the worker looks whether it may
/// send the next.
const IN_FLIGHT_TICK: Duration = Duration::from_millis(1);

/// One connection on its way between processes: its socket, and its state
/// as plain data.
#[derive(Debug)]
pub struct Moved {
    /// The socket.
    pub fd: OwnedFd,
    /// The connection's state ([`Connection::take_apart`]).
    pub conn: Snapshot,
    /// Its clocks.
    pub timers: TimersSnapshot,
    /// What its hooks carry.
    pub carried: Carried,
    /// Still in its preface (the bytes so far are in `carried.preface`).
    pub preface: bool,
}

impl Moved {
    /// The state bytes it carries (for the batch limits).
    pub fn bytes(&self) -> usize {
        self.conn.partial.len() + self.conn.pending.len() + self.carried.preface.len()
    }
}

/// What a worker sends out during a hand-over.
#[derive(Debug)]
pub enum Outbound {
    /// Connections taken apart, from worker `worker`.
    Batch {
        /// The worker.
        worker: usize,
        /// Its connections.
        conns: Vec<Moved>,
    },
    /// Worker `worker` has no connection left to move.
    Done {
        /// The worker.
        worker: usize,
    },
}

/// Where one worker sends its [`Outbound`] messages.
#[derive(Debug, Clone)]
pub struct Sink {
    /// The worker's number.
    worker: usize,
    /// The control thread's end.
    tx: Sender<Outbound>,
    /// Batches sent and not yet written to the new process, over all
    /// workers.
    in_flight: Arc<AtomicUsize>,
}

impl Sink {
    /// One sink per worker, the receiving end, and the in-flight count the
    /// receiver lowers ([`Sink::written`]) after writing each batch.
    pub fn for_workers(workers: usize) -> (Vec<Sink>, Receiver<Outbound>, Arc<AtomicUsize>) {
        let (tx, rx) = mpsc::channel();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let sinks = (0..workers)
            .map(|worker| Sink {
                worker,
                tx: tx.clone(),
                in_flight: in_flight.clone(),
            })
            .collect();
        (sinks, rx, in_flight)
    }

    /// The receiver wrote one batch.
    pub fn written(in_flight: &AtomicUsize) {
        in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    fn full(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) >= IN_FLIGHT
    }
}

/// A copy of one of a worker's listening sockets (`F_DUPFD_CLOEXEC`).
#[derive(Debug)]
pub struct ListenerCopy {
    /// As configured.
    pub addr: ListenAddr,
    /// Where it is bound.
    pub bound: SocketAddr,
    /// The copy.
    pub fd: OwnedFd,
}

/// A worker's hand-over state.
#[derive(Debug, Default)]
pub(super) struct Moving {
    /// Moving out: where to, and the connections left, as (key, id), the
    /// next one last.
    export: Option<(Sink, Vec<(usize, u64)>)>,
    /// Moved in and not yet taken in.
    adopt: VecDeque<Moved>,
}

impl Moving {
    /// Nothing moves (every turn but an upgrade's asks only this).
    #[inline(always)]
    fn idle(&self) -> bool {
        self.export.is_none() && self.adopt.is_empty()
    }
}

impl<H: Hooks> Core<H> {
    /// Copies of this worker's listening sockets (to pass to a new
    /// process, or to serve again if it fails).
    pub(super) fn listener_copies(&self) -> Vec<ListenerCopy> {
        self.listeners
            .iter()
            .filter_map(|(_, ls)| {
                let fd = ls.listener.socket.as_fd().try_clone_to_owned().ok()?;
                Some(ListenerCopy {
                    addr: ls.listener.addr.clone(),
                    bound: ls.listener.bound,
                    fd,
                })
            })
            .collect()
    }

    /// The new process accepts: stop accepting here and move every
    /// connection out through `sink`, a slice per turn.
    pub(super) fn start_hand_over(&mut self, sink: Sink) {
        for (_, mut ls) in std::mem::take(&mut self.listeners) {
            // Explicitly: other processes' copies keep the socket, and
            // with it this registration, alive.
            let _ = self.handle.detach(&mut ls.listener.socket);
            ls.listener.destroy();
        }
        let mut keys: Vec<(usize, usize, u64)> = self
            .connections
            .iter()
            .map(|(k, e)| (e.conn.held(), k, e.conn.id))
            .collect();
        // Idle clients first: they are the quickest to move. Popped from
        // the end, so the largest go first into the vector.
        keys.sort_unstable_by(|a, b| b.cmp(a));
        xps_log!(
            Level::Debug,
            "xps_upgrade()",
            "handing over {} connection(s)",
            keys.len()
        );
        let keys = keys.into_iter().map(|(_, k, id)| (k, id)).collect();
        self.moving.export = Some((sink, keys));
    }

    /// The hand-over failed: serve `listeners` (this worker's own sockets,
    /// kept by the control thread) again; connections not taken apart yet
    /// stay here.
    pub(super) fn resume(&mut self, listeners: Vec<Listener>) {
        self.moving.export = None;
        for listener in listeners {
            let addr = listener.addr.clone();
            if let Err(e) = self.listener_attach(listener) {
                xps_log!(
                    Level::Error,
                    "xps_upgrade()",
                    "cannot watch listener {addr} again: {e}"
                );
            }
        }
    }

    /// Connections moved here, to take in over the next turns.
    pub(super) fn queue_adopt(&mut self, conns: Vec<Moved>) {
        self.moving.adopt.extend(conns);
    }

    /// Step 0b: takes in a slice of moved connections, and moves a slice
    /// out.
    #[inline(always)]
    pub(super) fn step_moving(&mut self) {
        if !self.moving.idle() {
            self.move_slice();
        }
    }

    #[cold]
    #[inline(never)]
    fn move_slice(&mut self) {
        for _ in 0..ADOPT_SLICE {
            let Some(m) = self.moving.adopt.pop_front() else {
                break;
            };
            self.adopt_one(m);
        }
        let Some((sink, keys)) = self.moving.export.take() else {
            return;
        };
        let keys = self.export_slice(&sink, keys);
        if keys.is_empty() {
            let _ = sink.tx.send(Outbound::Done {
                worker: sink.worker,
            });
        } else {
            self.moving.export = Some((sink, keys));
        }
    }

    /// Takes apart up to a slice of connections from the end of `keys`, in
    /// batches, while the control thread keeps up. Returns what is left.
    fn export_slice(&mut self, sink: &Sink, mut keys: Vec<(usize, u64)>) -> Vec<(usize, u64)> {
        let (mut conns, mut bytes) = (0, 0);
        while !keys.is_empty() && !sink.full() && conns < SLICE_CONNS && bytes < SLICE_BYTES {
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            while batch.len() < BATCH_CONNS && batch_bytes < BATCH_BYTES {
                let Some((key, id)) = keys.pop() else { break };
                if let Some(m) = self.export_one(key, id) {
                    batch_bytes += m.bytes();
                    batch.push(m);
                }
            }
            if batch.is_empty() {
                continue;
            }
            conns += batch.len();
            bytes += batch_bytes;
            sink.in_flight.fetch_add(1, Ordering::AcqRel);
            let out = Outbound::Batch {
                worker: sink.worker,
                conns: batch,
            };
            if sink.tx.send(out).is_err() {
                // The control thread is gone: nothing can carry them. Their
                // sockets close as the batch drops.
                sink.in_flight.fetch_sub(1, Ordering::AcqRel);
                return Vec::new();
            }
        }
        keys
    }

    /// Takes connection `key` apart, unless it ended since or cannot move
    /// (draining or lingering: it finishes here).
    fn export_one(&mut self, key: usize, id: u64) -> Option<Moved> {
        let entry = self.connections.get(key)?;
        if entry.conn.id != id || !entry.conn.movable() {
            return None;
        }
        let Entry {
            conn,
            timers,
            session,
            ..
        } = self.remove(key);
        let now = self.clock.now;
        let (carried, preface) = match session {
            Session::Serving(state) => (self.hooks.hand_over(state, &conn, now), false),
            Session::Preface(state) => (self.hooks.hand_over_preface(state, now), true),
        };
        xps_log!(
            Level::Trace,
            "xps_upgrade()",
            "#{}: handed over ({} byte(s) of replies, {} of its line)",
            conn.id,
            conn.pending_len(),
            conn.partial_len()
        );
        let timers = timers.snapshot();
        let (fd, conn) = conn.take_apart(&self.handle);
        Some(Moved {
            fd,
            conn,
            timers,
            carried,
            preface,
        })
    }

    /// Takes in one moved connection and drives it.
    fn adopt_one(&mut self, m: Moved) {
        let id = self.next_id;
        self.next_id += 1;
        let slot = self.shared.slots.acquire_forced();
        let stream = mio::net::TcpStream::from(m.fd);
        let key = self.connections.vacant_entry().key();
        let token = Target::Connection(key).token();
        let conn = match Connection::restore(stream, m.conn, slot, id, &self.handle, token) {
            Ok(conn) => conn,
            Err(e) => {
                xps_log!(
                    Level::Warning,
                    "xps_upgrade()",
                    "cannot watch a connection taken over: {e}"
                );
                return;
            }
        };
        let now = self.clock.now;
        let peer = conn
            .peer_addr()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let session = if m.preface {
            match self.hooks.adopt_preface(&m.carried, peer, now) {
                Some(p) => Session::Preface(p),
                None => return, // dropped: closed
            }
        } else {
            Session::Serving(self.hooks.adopt(&m.carried, peer, &conn, now))
        };
        let (timers, due) = ConnTimers::restore(&m.timers);
        if let Some(due) = due {
            self.timers.push(due, key);
        }
        xps_log!(
            Level::Trace,
            "xps_upgrade()",
            "#{id}: taken over, from {peer}"
        );
        self.connections
            .insert(Entry::new(conn, timers, session, self.turn));
        if self.shutdown.is_some() {
            // A shutdown began here meanwhile: it drains like the others.
            return self.begin_drain_of(key);
        }
        self.drive(key);
    }

    /// When the loop must wake for the hand-over: now while connections
    /// wait to be taken in or out, soon while the control thread is behind.
    #[inline(always)]
    pub(super) fn moving_wake(&self) -> Option<Instant> {
        if self.moving.idle() {
            return None;
        }
        let now = self.clock.now;
        if !self.moving.adopt.is_empty() {
            return Some(now);
        }
        match &self.moving.export {
            Some((sink, _)) if sink.full() => Some(now + IN_FLIGHT_TICK),
            Some(_) => Some(now),
            None => None,
        }
    }
}
