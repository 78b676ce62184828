//! eXpServer's `xps_core`: one worker's listeners, connections and timers,
//! driven by its [`EventLoop`].
//!
//! A [`Core`] is what `xps_loop_run()` dispatches to in the C tutorial, minus
//! the globals: it owns everything one event loop serves, and the loop calls
//! it through the [`Handler`] trait. With `--workers N` there are N cores on
//! N threads that share nothing but a stop flag and the connection count
//! ([`Shared`]); each has its own SO_REUSEPORT listening sockets, so the
//! kernel spreads new connections across them (the Sōzu/nginx design).
//!
//! # Tokens
//!
//! A connection's token is its key in the [`Slab`]; listener `i` has token
//! `LISTENER_BASE + i`; the cross-thread waker has [`WAKER`]. Dispatch is one
//! comparison and one indexed lookup, where the tutorial scanned two lists.
//!
//! # Work that does not come from epoll
//!
//! Edge-triggered readiness is reported once, so anything the core decides to
//! postpone must be remembered by the core itself:
//!
//! * `deferred`: connections that stopped reading because of the read budget
//!   (fairness) or resumed after a flow-control pause; driven again next turn,
//!   and the loop does not sleep while any wait.
//! * `Listener::ready`: a listener whose backlog was not drained (accept
//!   budget, the connection cap, or an fd/memory back-off). Retried next
//!   turn, when a connection closes, or when the back-off ends.
//! * `timers`: a min-heap of idle deadlines, re-armed lazily (see
//!   [`Core::expire_idle`]); a timerfd ([`LoopTimer`]) armed for the
//!   earliest one wakes the loop, so `epoll_wait` itself needs no timeout
//!   while the server is busy (see `LoopTimer` for why that matters).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::{Interest, Token};
use slab::Slab;

use crate::event_loop::{Handler, LoopHandle, LoopTimer};
use crate::network::connection::{CloseReason, Connection, Scratch, Status};
use crate::network::listener::{AcceptVerdict, Listener, classify_accept_error};
use crate::utils::logger::Level;
use crate::xps_log;

/// Token of the waker that tells a worker to shut down.
pub const WAKER: Token = Token(usize::MAX);
/// Token of the idle-timeout timer.
pub const TIMER: Token = Token(usize::MAX - 1);
/// Listener `i` is registered with token `LISTENER_BASE + i`.
pub const LISTENER_BASE: usize = usize::MAX / 2;
/// How long accepting pauses after EMFILE/ENFILE/ENOBUFS/ENOMEM (unless a
/// connection closes first).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Connections accepted per listener per turn before others get a turn.
pub const ACCEPT_BUDGET: usize = 256;
/// While at the connection cap, how often to look whether another worker
/// freed a slot (this worker's own closes are noticed at once).
pub const CAP_RECHECK: Duration = Duration::from_millis(50);
/// How long shutdown waits for replies to drain before closing anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// During shutdown, how often lingering connections are looked at (their
/// progress — the client acknowledging replies — raises no epoll event).
pub const LINGER_TICK: Duration = Duration::from_millis(10);
/// At most one accept-failure warning per this interval per worker.
const WARN_INTERVAL: Duration = Duration::from_secs(5);

/// State shared by all workers.
#[derive(Debug, Default)]
pub struct Shared {
    /// Set by the signal thread: stop accepting, drain, exit.
    pub stop: AtomicBool,
    /// Open connections over all workers (for `--max-connections`).
    pub open: AtomicUsize,
}

/// Limits one core runs with.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `--max-line`.
    pub max_line: usize,
    /// `--max-connections`, over all workers.
    pub max_connections: usize,
    /// `--idle-timeout`; `None` = never.
    pub idle_timeout: Option<Duration>,
}

/// A listener and whether its backlog may hold connections we have not
/// accepted yet.
#[derive(Debug)]
struct ListenerSlot {
    listener: Listener,
    /// An edge said "connections waiting" and the backlog was not drained.
    ready: bool,
}

/// One worker: its listeners, its connections, its timers.
pub struct Core {
    /// Attaches and detaches sockets on this worker's epoll instance.
    handle: LoopHandle,
    /// This worker's listening sockets; emptied at shutdown.
    listeners: Vec<ListenerSlot>,
    /// Open connections, by token.
    connections: Slab<Connection>,
    /// Buffers shared by all connections of this loop.
    scratch: Scratch,
    /// Limits from the settings.
    limits: Limits,
    /// Stop flag and connection count, shared with the other workers.
    shared: Arc<Shared>,
    /// Next connection id.
    next_id: u64,
    /// The loop's clock, read once per turn.
    now: Instant,
    /// Idle deadlines: (deadline, slab key, connection id), earliest first.
    /// The loop is woken for the earliest by `timer`.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// Fires at the earliest idle deadline (`None` without an idle timeout).
    timer: Option<LoopTimer>,
    /// Connections to drive again next turn: (slab key, connection id).
    deferred: Vec<(usize, u64)>,
    /// The other half of `deferred`'s double buffer: the batch being run is
    /// swapped out of `deferred`, so passes can queue new work without
    /// allocating.
    deferred_spare: Vec<(usize, u64)>,
    /// When shutdown began, the time by which it must end.
    shutdown_deadline: Option<Instant>,
    /// `run` returns when set.
    stopped: bool,
    /// Last accept-failure warning, and failures since.
    accept_warned: Option<Instant>,
    /// Accept failures not yet reported.
    accept_failures: u64,
}

impl Core {
    /// A core serving `listeners` on the loop behind `handle`.
    pub fn new(
        handle: LoopHandle,
        listeners: Vec<Listener>,
        limits: Limits,
        shared: Arc<Shared>,
    ) -> io::Result<Core> {
        let mut slots = Vec::with_capacity(listeners.len());
        for (i, mut listener) in listeners.into_iter().enumerate() {
            handle.attach(
                &mut listener.socket,
                Token(LISTENER_BASE + i),
                Interest::READABLE,
            )?;
            // The backlog may already hold connections: look at once.
            slots.push(ListenerSlot {
                listener,
                ready: true,
            });
        }
        let timer = match limits.idle_timeout {
            Some(_) => Some(LoopTimer::create(&handle, TIMER)?),
            None => None,
        };
        Ok(Core {
            timer,
            handle,
            listeners: slots,
            connections: Slab::new(),
            scratch: Scratch::default(),
            limits,
            shared,
            next_id: 0,
            now: Instant::now(),
            timers: BinaryHeap::new(),
            deferred: Vec::new(),
            deferred_spare: Vec::new(),
            shutdown_deadline: None,
            stopped: false,
            accept_warned: None,
            accept_failures: 0,
        })
    }

    /// `xps_listener_connection_handler()`: accepts until the backlog is
    /// empty, the turn's budget is spent, the connection cap is reached, or
    /// the OS runs out of descriptors or memory.
    fn listener_connection_handler(&mut self, li: usize) {
        for _ in 0..ACCEPT_BUDGET {
            if !self.reserve_slot() {
                return; // at the cap: `ready` stays set, retried later
            }
            let slot = &mut self.listeners[li];
            match slot.listener.socket.accept() {
                Ok((stream, peer)) => self.connection_create(stream, peer, li),
                Err(e) => {
                    self.shared.open.fetch_sub(1, Ordering::Relaxed);
                    match classify_accept_error(&e) {
                        AcceptVerdict::Drained => {
                            slot.ready = false;
                            return;
                        }
                        AcceptVerdict::Retry => {}
                        AcceptVerdict::SkipOne => {
                            xps_log!(
                                Level::Debug,
                                "xps_listener_connection_handler()",
                                "accept() on {} failed for one connection: {}",
                                slot.listener.addr,
                                e
                            );
                        }
                        AcceptVerdict::BackOff => {
                            slot.listener.paused_until = Some(self.now + ACCEPT_BACKOFF);
                            let addr = slot.listener.addr.clone();
                            self.warn_accept_failure(&addr, &e);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Takes one slot of `--max-connections`, if one is free.
    fn reserve_slot(&self) -> bool {
        let open = self.shared.open.fetch_add(1, Ordering::Relaxed);
        if open < self.limits.max_connections {
            return true;
        }
        self.shared.open.fetch_sub(1, Ordering::Relaxed);
        false
    }

    /// Logs an accept failure at most once per [`WARN_INTERVAL`], counting
    /// the ones in between.
    fn warn_accept_failure(&mut self, addr: &crate::config::ListenAddr, e: &io::Error) {
        self.accept_failures += 1;
        if self
            .accept_warned
            .is_some_and(|t| self.now.duration_since(t) < WARN_INTERVAL)
        {
            return;
        }
        xps_log!(
            Level::Warning,
            "xps_listener_connection_handler()",
            "accept() on {} failed: {} ({} time(s) since the last warning); pausing accepts for {} ms",
            addr,
            crate::os_reason(e),
            self.accept_failures,
            ACCEPT_BACKOFF.as_millis()
        );
        self.accept_warned = Some(self.now);
        self.accept_failures = 0;
    }

    /// `xps_connection_create()`: registers an accepted socket and starts its
    /// idle timer. The caller has reserved the slot.
    fn connection_create(
        &mut self,
        mut stream: mio::net::TcpStream,
        peer: std::net::SocketAddr,
        li: usize,
    ) {
        // TCP_NODELAY comes from the listening socket (see listener::bind).
        let entry = self.connections.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.handle.attach(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.shared.open.fetch_sub(1, Ordering::Relaxed);
            xps_log!(
                Level::Warning,
                "xps_connection_create()",
                "cannot watch the connection from {}: {}",
                peer,
                e
            );
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        entry.insert(Connection::new(stream, id, self.limits.max_line, self.now));
        if let Some(t) = self.limits.idle_timeout {
            self.timers.push(Reverse((self.now + t, key, id)));
        }
        xps_log!(
            Level::Debug,
            "xps_connection_create()",
            "new connection #{} from {} on {}",
            id,
            peer,
            self.listeners[li].listener.addr
        );
    }

    /// `xps_connection_destroy()`: removing the connection from the slab
    /// drops its socket, which closes the fd and so detaches it from epoll.
    fn connection_destroy(&mut self, key: usize, reason: &CloseReason) {
        let conn = self.connections.remove(key);
        self.shared.open.fetch_sub(1, Ordering::Relaxed);
        xps_log!(
            Level::Debug,
            "xps_connection_destroy()",
            "closed connection #{}: {}",
            conn.id,
            match reason {
                CloseReason::Finished => "peer closed, all replies sent".to_string(),
                CloseReason::Reset(e) => format!("peer went away ({e})"),
                CloseReason::Failed(e) => format!("socket error ({e})"),
                CloseReason::Shutdown => "server shutting down".to_string(),
                CloseReason::IdleTimeout {
                    stalled_writer: false,
                    secs,
                } => format!("idle for {secs} s"),
                CloseReason::IdleTimeout {
                    stalled_writer: true,
                    secs,
                } => format!("client read nothing for {secs} s"),
            }
        );
        // A freed descriptor or slot may let a paused listener accept again.
        for slot in &mut self.listeners {
            slot.listener.paused_until = None;
        }
        // Keep the timer heap within twice the live connections: stale
        // entries of closed connections would otherwise pile up under churn.
        if self.timers.len() > 2 * self.connections.len() + 1024 {
            self.rebuild_timers();
        }
    }

    /// Drives one connection and acts on the outcome.
    fn drive(&mut self, key: usize) {
        let Some(conn) = self.connections.get_mut(key) else {
            return;
        };
        // The shared output buffer must start empty: bytes left in it by one
        // connection would be sent to the next one.
        debug_assert!(self.scratch.out.is_empty());
        self.scratch.out.clear();
        match conn.drive(&mut self.scratch, self.now) {
            Status::Idle => {}
            Status::More => self.deferred.push((key, conn.id)),
            Status::Close(reason) => self.connection_destroy(key, &reason),
        }
    }

    /// Closes connections whose idle deadline passed. Activity does not
    /// touch the heap (it only updates `last_active`); an entry that comes
    /// due for a connection that was active since is pushed again with its
    /// real deadline. So each connection costs at most one heap operation
    /// per timeout period, and nothing scans every connection.
    fn expire_idle(&mut self) {
        let Some(timeout) = self.limits.idle_timeout else {
            return;
        };
        while let Some(&Reverse((deadline, key, id))) = self.timers.peek() {
            if deadline > self.now {
                break;
            }
            self.timers.pop();
            let Some(conn) = self.connections.get(key).filter(|c| c.id == id) else {
                continue; // closed since
            };
            let due = conn.last_active + timeout;
            if due <= self.now {
                let reason = CloseReason::IdleTimeout {
                    stalled_writer: conn.has_pending(),
                    secs: timeout.as_secs(),
                };
                self.connection_destroy(key, &reason);
            } else {
                self.timers.push(Reverse((due, key, id)));
            }
        }
    }

    fn rebuild_timers(&mut self) {
        let Some(timeout) = self.limits.idle_timeout else {
            self.timers.clear();
            return;
        };
        let live: Vec<_> = self
            .connections
            .iter()
            .map(|(key, c)| Reverse((c.last_active + timeout, key, c.id)))
            .collect();
        self.timers = BinaryHeap::from(live);
    }

    /// Stops accepting, and lets every connection read what has arrived,
    /// answer it and close.
    fn begin_shutdown(&mut self) {
        xps_log!(
            Level::Debug,
            "xps_core_shutdown()",
            "closing {} listener(s); draining {} connection(s)",
            self.listeners.len(),
            self.connections.len()
        );
        self.listeners.clear(); // closes the listening sockets
        self.shutdown_deadline = Some(self.now + SHUTDOWN_GRACE);
        let keys: Vec<usize> = self.connections.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.connections[key].begin_shutdown();
            self.drive(key);
        }
    }

    /// Runs deferred connection passes and listener retries.
    fn run_deferred(&mut self) {
        let mut batch = std::mem::take(&mut self.deferred_spare);
        std::mem::swap(&mut batch, &mut self.deferred);
        for &(key, id) in &batch {
            if self.connections.get(key).is_some_and(|c| c.id == id) {
                self.drive(key);
            }
        }
        batch.clear();
        self.deferred_spare = batch;
        for li in 0..self.listeners.len() {
            let slot = &mut self.listeners[li];
            if let Some(until) = slot.listener.paused_until {
                if until > self.now {
                    continue;
                }
                slot.listener.paused_until = None;
            }
            if slot.ready {
                self.listener_connection_handler(li);
            }
        }
    }

    /// How long the loop may sleep: until the next timer, back-off end or
    /// cap re-check; not at all while work is deferred.
    fn next_timeout(&self) -> Option<Duration> {
        if !self.deferred.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut wake: Option<Instant> = self
            .shutdown_deadline
            .map(|d| d.min(self.now + LINGER_TICK));
        let mut earliest = |t: Instant| {
            wake = Some(wake.map_or(t, |w| w.min(t)));
        };
        // Idle deadlines wake the loop through `timer`; only without one
        // (it could not be armed) do they shorten the wait.
        if let (None, Some(Reverse((t, _, _)))) = (&self.timer, self.timers.peek()) {
            earliest(*t);
        }
        let at_cap = self.shared.open.load(Ordering::Relaxed) >= self.limits.max_connections;
        for slot in &self.listeners {
            if !slot.ready {
                continue;
            }
            match slot.listener.paused_until {
                Some(t) => earliest(t),
                // At the cap, another worker may free a slot: look again
                // soon (this worker's own closes are seen at once).
                None if at_cap => earliest(self.now + CAP_RECHECK),
                // The accept budget stopped it: go on next turn.
                None => return Some(Duration::ZERO),
            }
        }
        wake.map(|t| t.saturating_duration_since(self.now))
    }
}

impl Handler for Core {
    fn on_event(&mut self, event: &Event) {
        let token = event.token();
        if token == WAKER {
            return; // the stop flag is read in after_events
        }
        if token == TIMER {
            if let Some(timer) = &mut self.timer {
                timer.fired(); // expire_idle runs in after_events
            }
            return;
        }
        if token.0 >= LISTENER_BASE {
            let li = token.0 - LISTENER_BASE;
            if let Some(slot) = self.listeners.get_mut(li) {
                slot.ready = true;
                if slot.listener.paused_until.is_none() {
                    self.listener_connection_handler(li);
                }
            }
            return;
        }
        if let Some(conn) = self.connections.get_mut(token.0) {
            conn.note_event(event);
            self.drive(token.0);
        }
    }

    fn after_events(&mut self) -> Option<Duration> {
        self.now = Instant::now();
        if self.shutdown_deadline.is_none() && self.shared.stop.load(Ordering::Relaxed) {
            self.begin_shutdown();
        }
        self.run_deferred();
        self.expire_idle();
        if let (Some(timer), Some(Reverse((deadline, _, _)))) =
            (&mut self.timer, self.timers.peek())
            && let Err(e) = timer.arm_at(*deadline, self.now)
        {
            xps_log!(
                Level::Warning,
                "xps_core_timer()",
                "timerfd_settime() failed ({e}); idle deadlines now shorten epoll waits"
            );
            self.timer = None;
        }
        if let Some(deadline) = self.shutdown_deadline {
            let lingering: Vec<usize> = self
                .connections
                .iter()
                .filter(|(_, c)| c.is_lingering())
                .map(|(k, _)| k)
                .collect();
            for key in lingering {
                let status = self.connections[key].linger(&mut self.scratch.read);
                if let Status::Close(reason) = status {
                    self.connection_destroy(key, &reason);
                }
            }
            if self.connections.is_empty() {
                self.stopped = true;
            } else if self.now >= deadline {
                xps_log!(
                    Level::Warning,
                    "xps_core_shutdown()",
                    "grace period over: closing {} connection(s) with replies unsent",
                    self.connections.len()
                );
                let n = self.connections.len();
                self.connections.clear();
                self.shared.open.fetch_sub(n, Ordering::Relaxed);
                self.stopped = true;
            }
        }
        self.next_timeout()
    }

    fn should_stop(&self) -> bool {
        self.stopped
    }
}
