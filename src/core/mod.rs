//! eXpServer's `xps_core`: one worker's listeners, connections and timers,
//! driven by its [`EventLoop`](crate::event_loop::EventLoop).
//!
//! A [`Core`] is what `xps_loop_run()` dispatches to in the C tutorial,
//! minus the globals: the loop calls it through [`Handler`], and
//! [`Core::on_event`](Handler::on_event) is one `match` over the event's
//! [`Target`]. With `--workers N` there are N cores on N threads sharing only
//! a stop flag and the connection slots ([`Shared`]); each has its own
//! SO_REUSEPORT listening sockets (the nginx/Sōzu design).
//!
//! The core is generic over its [`Hooks`]: the features (metrics, access log,
//! admission, the memory bound, PROXY headers) answer there, and `Core<()>`
//! is the tutorial's server with none of them. Its parts: [`timers`] (every
//! deadline), [`fairness`] (one pass per connection per turn; connections driven again next turn, or when
//! their allowance grows), [`drain`] (graceful shutdown), [`session`] (a
//! connection's preface), [`control`] (messages from the reload thread),
//! [`snapshot`] (the connections described, on request).

pub mod control;
pub mod drain;
pub mod fairness;
pub mod handover;
pub mod hooks;
pub mod session;
pub mod snapshot;
pub mod timers;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::Token;
use mio::event::Event;
use slab::Slab;

use crate::config::Limits;
use crate::event_loop::{Handler, LoopHandle};
use crate::network::connection::{Connection, Next, Pass, Scratch};
use crate::network::io::CloseReason;
use crate::network::listener::{Accept, AcceptVerdict, Backlog, Listener};
use crate::slots::{Slot, Slots};
use crate::utils::logger::Level;
use crate::utils::ratelimit::RateLimited;
use crate::xps_log;

pub use control::{Control, Reconfigure};
use fairness::Queue;
pub use hooks::{About, Hooks, PrefaceEnd, Verdict};
use session::{Entry, Session};
use timers::{Clock, ConnTimers, Expiry, TimeoutSecs, Timers};

/// Listener key `k` is registered with token `LISTENER_BASE + k`; below it
/// are connections' slab keys.
pub const LISTENER_BASE: usize = usize::MAX / 2;
/// While at the connection cap, how often to look whether another worker
/// freed a slot (this worker's own closes are noticed at once).
pub const CAP_RECHECK: Duration = Duration::from_millis(50);
/// At most one accept-failure warning per this interval per worker.
const WARN_INTERVAL: Duration = Duration::from_secs(5);

/// What a token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A connection, by slab key.
    Connection(usize),
    /// A listener, by its key in the core's listener slab.
    Listener(usize),
    /// The deadline timer.
    Timer,
    /// The cross-thread waker (stop, and control messages).
    Waker,
}

impl Target {
    /// The token registered for this target.
    pub fn token(self) -> Token {
        Token(match self {
            Target::Connection(key) => key,
            Target::Listener(key) => LISTENER_BASE + key,
            Target::Timer => usize::MAX - 1,
            Target::Waker => usize::MAX,
        })
    }

    /// Decodes a token: the one place that knows the layout.
    pub fn of(token: Token) -> Target {
        match token.0 {
            usize::MAX => Target::Waker,
            n if n == usize::MAX - 1 => Target::Timer,
            n if n >= LISTENER_BASE => Target::Listener(n - LISTENER_BASE),
            n => Target::Connection(n),
        }
    }
}

/// State shared by all workers.
#[derive(Debug)]
pub struct Shared {
    /// Set by the signal thread (or a failing worker): stop accepting,
    /// drain, exit.
    pub stop: AtomicBool,
    /// The `--max-connections` slots, over all workers.
    pub slots: Arc<Slots>,
}

impl Shared {
    /// Shared state for a server capped at `max_connections`.
    pub fn new(max_connections: usize) -> Arc<Shared> {
        Arc::new(Shared {
            stop: AtomicBool::new(false),
            slots: Slots::new(max_connections),
        })
    }
}

/// A listener, what the hooks keep for it, and whether its backlog may hold
/// connections not accepted yet.
struct ListenerSlot<L> {
    /// The socket and its back-off.
    listener: Listener,
    /// The hooks' state for it.
    state: L,
    /// An edge said "connections waiting" and the backlog was not drained.
    ready: bool,
}

/// One worker: its listeners, its connections, its timers.
pub struct Core<H: Hooks> {
    /// Attaches sockets to this worker's epoll instance.
    handle: LoopHandle,
    /// Listening sockets, by key; emptied at shutdown.
    listeners: Slab<ListenerSlot<H::Listener>>,
    /// Open connections, by token.
    connections: Slab<Entry<H>>,
    /// What the accept loop produced, reused between calls.
    accepted: Vec<Accept>,
    /// Buffers shared by all connections of this loop.
    scratch: Scratch,
    /// `--max-line` and the timeouts, for new connections.
    limits: Limits,
    /// Stop flag and connection slots, shared with the other workers.
    shared: Arc<Shared>,
    /// Next connection id.
    next_id: u64,
    /// The time of the current wake-up.
    clock: Clock,
    /// Wake-ups so far (wrapping): a connection's pass is stamped with it.
    turn: u32,
    /// The deadline heap and its timerfd.
    timers: Timers,
    /// Connections to drive again: next turn, or when allowed to read.
    queue: Queue,
    /// During a shutdown, when the grace period ends.
    shutdown: Option<Instant>,
    /// `run` returns when set.
    stopped: bool,
    /// Accept failures, warned about at most once per [`WARN_INTERVAL`].
    accept_warning: RateLimited,
    /// Messages from the control thread (reload, upgrade, snapshots), if
    /// any may come.
    control: Option<std::sync::mpsc::Receiver<Control<H>>>,
    /// Snapshots asked for in this turn, answered at its end (step 8).
    snapshots_asked: Vec<snapshot::Reply>,
    /// Connections moving to or from another process (an upgrade).
    moving: handover::Moving,
    /// The features.
    hooks: H,
}

impl<H: Hooks> Core<H> {
    /// A core serving `listeners` on the loop behind `handle`, with `hooks`.
    pub fn new(
        handle: LoopHandle,
        listeners: Vec<Listener>,
        limits: Limits,
        shared: Arc<Shared>,
        hooks: H,
        control: Option<std::sync::mpsc::Receiver<Control<H>>>,
    ) -> std::io::Result<Core<H>> {
        let timers = Timers::create(&handle, Target::Timer.token())?;
        let mut core = Core {
            handle,
            listeners: Slab::with_capacity(listeners.len()),
            connections: Slab::new(),
            accepted: Vec::new(),
            scratch: Scratch::default(),
            limits,
            shared,
            next_id: 0,
            clock: Clock::start(),
            turn: 0,
            timers,
            queue: Queue::default(),
            shutdown: None,
            stopped: false,
            accept_warning: RateLimited::new(WARN_INTERVAL),
            control,
            snapshots_asked: Vec::new(),
            moving: handover::Moving::default(),
            hooks,
        };
        for listener in listeners {
            core.listener_attach(listener)?;
        }
        Ok(core)
    }

    /// The attach half of `xps_listener_create()`: watches a listening
    /// socket and looks at its backlog at once.
    fn listener_attach(&mut self, mut listener: Listener) -> std::io::Result<()> {
        let state = self.hooks.listener(&listener.addr, listener.bound);
        let entry = self.listeners.vacant_entry();
        let token = Target::Listener(entry.key()).token();
        self.handle
            .attach(&mut listener.socket, token, mio::Interest::READABLE)?;
        entry.insert(ListenerSlot {
            listener,
            state,
            ready: true, // the backlog may already hold connections
        });
        Ok(())
    }

    /// A listener is ready: accept what waits, then serve each new socket.
    fn listener_connection_handler(&mut self, li: usize) {
        let Some(ls) = self.listeners.get_mut(li) else {
            return;
        };
        let mut accepted = std::mem::take(&mut self.accepted);
        let backlog =
            ls.listener
                .connection_handler(self.clock.now, &self.shared.slots, &mut accepted);
        ls.ready = backlog == Backlog::Left;
        for accept in accepted.drain(..) {
            match accept {
                Accept::Connection(stream, peer, slot) => {
                    self.connection_create(li, stream, peer, slot)
                }
                Accept::Failed(e, verdict) => self.accept_failed(li, &e, verdict),
            }
        }
        self.accepted = accepted;
    }

    /// An accept that failed: a DEBUG line for one skipped connection, a
    /// rate-limited warning for a back-off.
    fn accept_failed(&mut self, li: usize, e: &std::io::Error, verdict: AcceptVerdict) {
        self.hooks.accept_failed(e);
        let addr = &self.listeners[li].listener.addr;
        if verdict == AcceptVerdict::SkipOne {
            xps_log!(
                Level::Debug,
                "xps_listener_connection_handler()",
                "accept() on {addr} failed for one connection: {e}"
            );
            return;
        }
        if let Some(since) = self.accept_warning.hit(self.clock.now) {
            xps_log!(
                Level::Warning,
                "xps_listener_connection_handler()",
                "accept() on {addr} failed: {} ({since} time(s) since the last warning); pausing accepts for {} ms",
                crate::os_reason(e),
                crate::network::listener::ACCEPT_BACKOFF.as_millis()
            );
        }
    }

    /// `xps_connection_create()`'s caller: asks the hooks, then creates and
    /// attaches the connection and starts its deadlines.
    fn connection_create(
        &mut self,
        li: usize,
        stream: mio::net::TcpStream,
        peer: std::net::SocketAddr,
        slot: Slot,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        let listener = &self.listeners[li];
        let on = listener.listener.bound;
        let (session, secs) = match self.hooks.on_accept(&listener.state, peer, self.clock.now) {
            Verdict::Refuse => {
                trace_accept(id, peer, on, "refused");
                return; // `stream` and `slot` drop here: closed unread
            }
            Verdict::Serve(state) => (
                Session::Serving(state),
                TimeoutSecs::of(self.limits.timeouts),
            ),
            Verdict::Preface { state, within } => {
                (Session::Preface(state), TimeoutSecs::preface(within))
            }
        };
        let entry = self.connections.vacant_entry();
        let key = entry.key();
        let token = Target::Connection(key).token();
        let conn =
            match Connection::create(stream, slot, id, self.limits.max_line, &self.handle, token) {
                Ok(conn) => conn,
                Err(e) => {
                    xps_log!(
                        Level::Warning,
                        "xps_connection_create()",
                        "cannot watch the connection from {peer}: {e}"
                    );
                    let reason = CloseReason::Failed(e);
                    return match session {
                        Session::Serving(state) => {
                            self.hooks.on_close(state, &reason, self.clock.now)
                        }
                        Session::Preface(mut state) => self.hooks.preface_failed(
                            &mut state,
                            PrefaceEnd::Failed(reason),
                            self.clock.now,
                        ),
                    };
                }
            };
        trace_accept(id, peer, on, "created");
        xps_log!(
            Level::Debug,
            "xps_connection_create()",
            "new connection #{id} from {peer} on {on}"
        );
        let mut timers = ConnTimers::new(self.clock.moment, secs);
        if let Some(due) = timers.first_due() {
            self.timers.push(due, key);
        }
        entry.insert(Entry::new(conn, timers, session, self.turn));
    }

    /// `xps_connection_destroy()`'s caller: removes the connection and tells
    /// the hooks how it ended.
    fn connection_destroy(&mut self, key: usize, reason: CloseReason) {
        let Entry { conn, session, .. } = self.remove(key);
        match session {
            Session::Serving(state) => {
                trace_close(conn.id, &reason);
                // Counted before the socket closes: a client that sees the
                // close finds it counted.
                self.hooks.on_close(state, &reason, self.clock.now);
                conn.destroy(&reason);
            }
            Session::Preface(mut state) => {
                self.preface_ended(conn, &mut state, PrefaceEnd::from(reason))
            }
        }
    }

    /// A connection's preface ended without completing: the hooks count
    /// and log it as they must (a refusal, mostly).
    fn preface_ended(&mut self, conn: Connection, state: &mut H::Preface, why: PrefaceEnd) {
        trace_close(conn.id, &why);
        let reason = why.to_string();
        self.hooks.preface_failed(state, why, self.clock.now);
        conn.destroy(&reason);
    }

    /// Takes a connection out of the slab, whatever ends it: a freed
    /// descriptor or slot may let a paused listener accept again, and the
    /// timer heap is kept within twice the live connections.
    #[inline]
    fn remove(&mut self, key: usize) -> Entry<H> {
        let entry = self.connections.remove(key);
        for (_, ls) in &mut self.listeners {
            ls.listener.paused_until = None;
        }
        let live = self
            .connections
            .iter()
            .filter_map(|(k, e)| e.timers.in_heap().map(|t| (t, k)));
        self.timers.compact(self.connections.len(), live);
        entry
    }

    /// A connection had an event: drive it, unless it is queued for this
    /// turn already (one read budget per turn).
    fn connection_ready(&mut self, key: usize, event: &Event) {
        if let Some(entry) = self.connections.get_mut(key) {
            entry.conn.note_event(event);
            if !entry.queued {
                self.drive(key);
            }
        }
    }

    /// One pass of a connection: its preface, or the read and write
    /// handlers within what the hooks allow; then its timers and queues.
    fn drive(&mut self, key: usize) {
        let entry = &mut self.connections[key];
        entry.turn = self.turn;
        let Session::Serving(state) = &mut entry.session else {
            return self.drive_preface(key);
        };
        let allowance = self.hooks.allowance(state, &entry.conn);
        let pass = entry.conn.handle(&mut self.scratch, allowance);
        self.after_pass(key, pass);
    }

    /// What follows a pass: the hooks see it, the timers move, and the
    /// connection waits, is queued, or closes.
    fn after_pass(&mut self, key: usize, pass: Pass) {
        let entry = &mut self.connections[key];
        if let Session::Serving(state) = &mut entry.session {
            self.hooks.on_pass(state, &pass, &entry.conn);
        }
        let reading = !matches!(pass.next, Next::OutOfAllowance);
        if let Some(due) = entry
            .timers
            .after_pass(self.clock.moment, &pass, &entry.conn, reading)
        {
            self.timers.push(due, key);
        }
        match pass.next {
            Next::Wait => {}
            Next::Again => self.queue.again(key, entry),
            Next::OutOfAllowance => self.queue.hold(key, entry),
            Next::Close(reason) => self.connection_destroy(key, reason),
        }
    }

    /// Step 5: closes connections whose idle, line or preface deadline
    /// passed.
    fn expire_deadlines(&mut self) {
        let now = self.clock.moment;
        while let Some((due, key)) = self.timers.pop_due(now) {
            let Some(entry) = self.connections.get_mut(key) else {
                continue; // closed since
            };
            if !entry.timers.is_due(due) {
                continue; // a stale or superseded entry
            }
            match entry.timers.check(now, &mut entry.conn) {
                Expiry::Expired(reason) => self.connection_destroy(key, reason),
                Expiry::Next(t) => self.timers.push(t, key),
                Expiry::None => {}
            }
        }
        self.timers.arm(&self.clock);
    }

    /// Step 4: accepts on listeners whose backlog was left non-empty, once
    /// their back-off (if any) is over.
    fn retry_listeners(&mut self) {
        for key in 0..self.listeners.capacity() {
            let Some(ls) = self.listeners.get_mut(key) else {
                continue;
            };
            if ls.listener.paused_until.is_some_and(|t| t > self.clock.now) {
                continue;
            }
            ls.listener.paused_until = None;
            if ls.ready {
                self.listener_connection_handler(key);
            }
        }
    }

    /// How long the loop may sleep: until the next timer, back-off end or
    /// cap re-check; not at all while work is queued for the next turn.
    fn next_timeout(&self) -> Option<Duration> {
        let now = self.clock.now;
        let mut wake = self.queue.wake(now);
        if wake == Some(now) {
            return Some(Duration::ZERO);
        }
        let mut earliest = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        if let Some(t) = self.drain_wake() {
            earliest(t);
        }
        if let Some(t) = self.moving_wake() {
            earliest(t);
        }
        if let Some(t) = self.timers.unarmed_next(&self.clock) {
            earliest(t);
        }
        let at_cap = self.shared.slots.full();
        for (_, ls) in &self.listeners {
            if !ls.ready {
                continue;
            }
            match ls.listener.paused_until {
                Some(t) => earliest(t),
                // At the cap, another worker may free a slot: look again soon.
                None if at_cap => earliest(now + CAP_RECHECK),
                // The accept budget stopped it: go on next turn.
                None => return Some(Duration::ZERO),
            }
        }
        wake.map(|t| t.saturating_duration_since(now))
    }
}

impl<H: Hooks> Handler for Core<H> {
    fn woke(&mut self) {
        self.clock.tick();
        self.turn = self.turn.wrapping_add(1);
        self.queue.turn();
        self.hooks.woke(self.clock.now, self.connections.len());
    }

    fn on_event(&mut self, event: &Event) {
        let target = Target::of(event.token());
        if crate::utils::logger::enabled(Level::Trace) {
            self.trace_event(target, event);
        }
        match target {
            Target::Listener(key) => {
                if let Some(ls) = self.listeners.get_mut(key) {
                    ls.ready = true;
                    if ls.listener.paused_until.is_none() {
                        self.listener_connection_handler(key);
                    }
                }
            }
            Target::Connection(key) => self.connection_ready(key, event),
            Target::Timer => self.timers.fired(), // deadlines run after the events
            Target::Waker => {} // the stop flag and control messages: after the events
        }
    }

    /// The work that does not come from epoll, in this order.
    fn after_events(&mut self) -> Option<Duration> {
        self.apply_control(); // 0. reload and upgrade messages
        self.step_moving(); // 0b. an upgrade's connections, a slice in or out
        if self.shutdown.is_none() && self.shared.stop.load(Ordering::Relaxed) {
            self.begin_shutdown(); // 1. the stop flag
        }
        self.run_again(); // 2. connections queued for this turn
        self.retry_held(); // 3. connections waiting for a larger allowance
        self.retry_listeners(); // 4. backlogs left non-empty
        self.expire_deadlines(); // 5. timeouts
        self.step_shutdown(); // 6. lingering connections, the grace period
        self.hooks.on_turn(); // 7. the features' end of turn
        self.answer_snapshots(); // 8. after 7, so no count lags a snapshot
        self.next_timeout()
    }

    fn should_stop(&self) -> bool {
        self.stopped
    }
}

impl<H: Hooks> Core<H> {
    /// The trace line of one epoll event: what it is for and its flags.
    #[cold]
    #[inline(never)]
    fn trace_event(&self, target: Target, event: &Event) {
        let what = match target {
            Target::Connection(key) => match self.connections.get(key) {
                Some(e) => format!("#{}", e.conn.id),
                None => format!("a closed connection (slab key {key})"),
            },
            Target::Listener(key) => match self.listeners.get(key) {
                Some(ls) => format!("listener {}", ls.listener.bound),
                None => format!("a closed listener ({key})"),
            },
            Target::Timer => "the deadline timer".to_string(),
            Target::Waker => "the waker (stop or control message)".to_string(),
        };
        xps_log!(
            Level::Trace,
            "xps_loop_run()",
            "{what}: epoll event {}",
            event_flags(event)
        );
    }
}

/// An event's flags as epoll names them: `IN|OUT|RDHUP`.
fn event_flags(event: &Event) -> String {
    [
        (event.is_readable(), "IN"),
        (event.is_writable(), "OUT"),
        (event.is_read_closed(), "RDHUP"),
        (event.is_write_closed(), "HUP"),
        (event.is_priority(), "PRI"),
        (event.is_error(), "ERR"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, name)| *name)
    .collect::<Vec<_>>()
    .join("|")
}

/// The trace line of a new connection: created, or refused by the hooks.
fn trace_accept(id: u64, peer: std::net::SocketAddr, on: std::net::SocketAddr, what: &str) {
    xps_log!(
        Level::Trace,
        "xps_connection_create()",
        "#{id}: {what}, from {peer} on {on}"
    );
}

/// The trace line of a connection's end.
fn trace_close(id: u64, why: &dyn std::fmt::Display) {
    xps_log!(
        Level::Trace,
        "xps_connection_destroy()",
        "#{id}: closed: {why}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_decode_to_what_encoded_them() {
        for target in [
            Target::Connection(0),
            Target::Connection(LISTENER_BASE - 1),
            Target::Listener(0),
            Target::Listener(7),
            Target::Timer,
            Target::Waker,
        ] {
            assert_eq!(Target::of(target.token()), target);
        }
    }
}
