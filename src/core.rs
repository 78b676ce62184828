//! eXpServer's `xps_core`: one worker's listeners, connections and timers,
//! driven by its [`EventLoop`](crate::event_loop::EventLoop).
//!
//! A [`Core`] is what `xps_loop_run()` dispatches to in the C tutorial, minus
//! the globals: it owns everything one event loop serves, and the loop calls
//! it through the [`Handler`] trait. With `--workers N` there are N cores on
//! N threads that share nothing but a stop flag and the connection slots
//! ([`Shared`]); each has its own SO_REUSEPORT listening sockets, so the
//! kernel spreads new connections across them (the Sōzu/nginx design).
//!
//! # Tokens
//!
//! Every registration carries a token that decodes into a [`Target`] in one
//! place ([`Target::of`]): a connection's slab key, a listener's slab key
//! (above [`LISTENER_BASE`]), the timer, or the waker. Dispatch is one match
//! and one indexed lookup, where the tutorial scanned two lists.
//!
//! # One turn of the loop
//!
//! [`Handler::woke`] reads the clock once per wake-up; every event of the
//! turn is handled with that time. Then [`Handler::after_events`] runs the
//! work that does not come from epoll, in named steps:
//!
//! 1. [`Core::check_stop`]: begin the graceful shutdown once the stop flag
//!    is set;
//! 2. [`Core::run_deferred`]: connections that stopped reading because of
//!    the read budget, or resumed after a flow-control pause (edge-triggered
//!    readiness is reported once, so the core must remember them). Each is
//!    queued at most once (`Connection::queued`), so a connection that gets
//!    an edge on every turn still reads at most one budget per turn, and the
//!    others are not made to wait behind many copies of it;
//! 3. [`Core::retry_listeners`]: listeners whose backlog was not drained
//!    (accept budget, the connection cap, or an fd/memory back-off);
//! 4. [`Core::expire_deadlines`]: idle and line timeouts, from a min-heap
//!    re-armed lazily; a timerfd ([`LoopTimer`]) armed for the earliest one
//!    wakes the loop, so `epoll_wait` itself needs no timeout while the
//!    server is busy (see `LoopTimer` for why that matters);
//! 5. [`Core::step_shutdown`]: during a shutdown, lingering connections and
//!    the grace period.
//!
//! The loop does not sleep while deferred work waits.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::{Interest, Token};
use slab::Slab;

use crate::admission::{self, AccessRules, BudgetView, BufferBudget, SourceLimits, SourcePermit};
use crate::event_loop::{Handler, LoopHandle, LoopTimer};
use crate::network::connection::{
    CloseReason, Connection, Deadline, HEADER_TIMEOUT, HeaderFailure, HeaderStep, Phase,
    RefuseReason, Scratch, Status, Totals,
};
use crate::network::listener::{AcceptVerdict, Listener, classify_accept_error};
use crate::network::proxy_header::ProxyHeader;
use crate::observe::access_log::{AccessLog, Record};
use crate::observe::metrics::{AcceptError, Closed, ListenerCounter, Metrics, WorkerMetrics};
use crate::slots::{Slot, Slots};
use crate::utils::logger::Level;
use crate::xps_log;

/// Listener key `k` is registered with token `LISTENER_BASE + k`; below it
/// are connections' slab keys.
pub const LISTENER_BASE: usize = usize::MAX / 2;
/// How long accepting pauses after EMFILE/ENFILE/ENOBUFS/ENOMEM or an
/// unknown accept error (unless a connection closes first).
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
/// While connections wait for the global buffer budget, how often to look
/// whether it allows them again (other workers' totals raise no event).
pub const RATION_TICK: Duration = Duration::from_millis(10);

/// A per-source permit worth keeping: one that counts (a per-source limit
/// is set); boxed, so a connection without one pays a pointer.
fn boxed_permit(permit: SourcePermit) -> Option<Box<SourcePermit>> {
    permit.key().is_some().then(|| Box::new(permit))
}

/// What a token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A connection, by slab key.
    Connection(usize),
    /// A listener, by its key in the core's listener slab.
    Listener(usize),
    /// The deadline timer ([`LoopTimer`]).
    Timer,
    /// The cross-thread waker (stop, and later control messages).
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

/// Limits one core runs with.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `--max-line`.
    pub max_line: usize,
    /// `--idle-timeout` and `--line-timeout`.
    pub timeouts: Timeouts,
}

/// The per-connection timeouts; `None` = off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// `--idle-timeout`: no byte moved either way for this long.
    pub idle: Option<Duration>,
    /// `--line-timeout`: an unterminated line held this long while reading.
    pub line: Option<Duration>,
}

/// What a worker reports to: the metrics and the access log, each off
/// unless configured. The line path pays for neither when they are off.
#[derive(Debug, Default)]
pub struct Observers {
    /// This worker's number (for the access log).
    pub worker: usize,
    /// The registry (for per-listener counters) and this worker's block.
    pub metrics: Option<(Arc<Metrics>, WorkerMetrics)>,
    /// Where ended connections are written.
    pub access_log: Option<AccessLog>,
}

/// SPEC §6's admission, shared by every worker: access rules, trusted PROXY
/// peers, the per-source table and the global buffer budget. The default
/// admits everyone and bounds nothing.
#[derive(Debug, Clone)]
pub struct Admission {
    /// `--allow` / `--deny`.
    pub rules: Arc<AccessRules>,
    /// `--proxy-from` as rules (allow each, then deny all); `None` = any
    /// peer may send headers.
    pub proxy_from: Option<Arc<AccessRules>>,
    /// `--max-connections-per-source`, over all workers.
    pub sources: Arc<SourceLimits>,
    /// `--max-buffered`, over all workers.
    pub budget: Arc<BufferBudget>,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            rules: Arc::new(AccessRules::default()),
            proxy_from: None,
            sources: SourceLimits::new(0),
            budget: BufferBudget::new(0, 1),
        }
    }
}

impl From<&CloseReason> for Closed {
    fn from(reason: &CloseReason) -> Closed {
        match reason {
            CloseReason::Finished => Closed::Finished,
            CloseReason::Reset(_) => Closed::Reset,
            CloseReason::Failed(_) => Closed::Error,
            CloseReason::Shutdown => Closed::Shutdown,
            CloseReason::IdleTimeout { .. } => Closed::IdleTimeout,
            // Not idle: bytes came, the line did not end. SPEC §5 names five
            // reasons; operators must tell a slow-line client from a silent
            // one, so this is a sixth.
            CloseReason::LineTimeout { .. } => Closed::LineTimeout,
            // Counted as refusals (`observe_refusal`), never as closes.
            CloseReason::Refused(_) => Closed::Error,
        }
    }
}

/// A listener and whether its backlog may hold connections we have not
/// accepted yet.
#[derive(Debug)]
struct ListenerSlot {
    /// The socket and its back-off state.
    listener: Listener,
    /// Its address as configured, shared by the access-log records of its
    /// connections.
    name: Arc<str>,
    /// This worker's accept counter for it, with metrics on.
    counter: Option<ListenerCounter>,
    /// An edge said "connections waiting" and the backlog was not drained.
    ready: bool,
}

/// A connection in the core's slab, with its place in the deadline heap.
#[derive(Debug)]
struct Entry {
    /// The connection.
    conn: Connection,
    /// The earliest deadline this connection has in the heap, if any: a new
    /// earlier deadline (a line clock starting) is pushed, a later one waits
    /// until this entry comes due.
    timer_due: Option<Instant>,
    /// Bytes it held after its last pass (its part of `Core::held`); below
    /// 4 GiB (1 MiB of replies plus one pass, `--max-line`, a header).
    held: u32,
    /// In `Core::rationed`.
    rationed: bool,
    /// The timeouts in force when it was accepted (a reload changes them
    /// for new connections only), in whole seconds.
    timeouts: TimeoutSecs,
    /// The per-source count this connection holds (released on drop);
    /// `None` without a per-source limit.
    _permit: Option<Box<SourcePermit>>,
    /// Who it is, kept only where something will report it (the access
    /// log, or a PROXY listener's header): an idle plain connection with
    /// no access log pays one pointer for it.
    about: Option<Box<About>>,
}

/// What is kept of a connection only to report it.
#[derive(Debug)]
struct About {
    /// The client's address: the TCP peer, or on a PROXY listener the
    /// header's source once the header is read.
    peer: std::net::SocketAddr,
    /// On a PROXY listener, the balancer's address (the TCP peer).
    proxy: Option<std::net::SocketAddr>,
    /// When it was accepted.
    since: Instant,
    /// The listener it came through.
    listener: Arc<str>,
}

/// [`Timeouts`] in whole seconds (0 = off), as a connection keeps them:
/// 8 bytes instead of 32 (the options are whole seconds anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TimeoutSecs {
    /// `--idle-timeout`.
    idle: u32,
    /// `--line-timeout`.
    line: u32,
}

impl TimeoutSecs {
    fn of(t: Timeouts) -> TimeoutSecs {
        let secs =
            |d: Option<Duration>| d.map_or(0, |d| d.as_secs().clamp(1, u32::MAX as u64) as u32);
        TimeoutSecs {
            idle: secs(t.idle),
            line: secs(t.line),
        }
    }

    fn get(self) -> Timeouts {
        let d = |s: u32| (s > 0).then(|| Duration::from_secs(u64::from(s)));
        Timeouts {
            idle: d(self.idle),
            line: d(self.line),
        }
    }
}

/// What the control thread (SIGHUP reload) sends a worker; delivered
/// through the worker's waker.
#[derive(Debug)]
pub enum CoreMsg {
    /// Apply a reloaded configuration.
    Reconfigure(Reconfigure),
}

/// A worker's share of a reload: its sockets for the new listeners, the
/// listeners to close, the listeners kept with a new configuration, and the
/// limits for new connections.
#[derive(Debug)]
pub struct Reconfigure {
    /// New listening sockets (already bound and listening).
    pub add: Vec<Listener>,
    /// Listeners to close, by bound address; their connections go on.
    pub remove: Vec<std::net::SocketAddr>,
    /// Listeners kept (same bound address) whose configuration changed: the
    /// host's spelling or the PROXY flag. The socket stays; connections
    /// accepted from now on take the new flag, open ones keep theirs.
    pub change: Vec<(std::net::SocketAddr, crate::config::ListenAddr)>,
    /// Limits for connections accepted from now on.
    pub limits: Limits,
    /// Access rules for connections accepted from now on.
    pub rules: Arc<AccessRules>,
    /// Trusted PROXY peers from now on (`None` = any).
    pub proxy_from: Option<Arc<AccessRules>>,
    /// Told once the worker has applied it (its removed listeners are
    /// closed), so the next reload can bind their addresses again.
    pub applied: std::sync::mpsc::Sender<()>,
}

/// One worker: its listeners, its connections, its timers.
pub struct Core {
    /// Attaches and detaches sockets on this worker's epoll instance.
    handle: LoopHandle,
    /// This worker's listening sockets, by key; emptied at shutdown.
    listeners: Slab<ListenerSlot>,
    /// Open connections, by token.
    connections: Slab<Entry>,
    /// Buffers shared by all connections of this loop.
    scratch: Scratch,
    /// Limits from the settings.
    limits: Limits,
    /// Stop flag and connection slots, shared with the other workers.
    shared: Arc<Shared>,
    /// Next connection id.
    next_id: u64,
    /// The time of the current wake-up (read once per turn, in `woke`).
    now: Instant,
    /// Deadlines: (deadline, slab key), earliest first; an entry counts only
    /// while it equals its connection's `Entry::timer_due`.
    /// The loop is woken for the earliest by `timer`.
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Fires at the earliest deadline (`None` without any timeout, or if it
    /// could not be armed: then deadlines shorten the wait instead).
    timer: Option<LoopTimer>,
    /// Connections to drive again next turn: (slab key, connection id). A
    /// connection is in it at most once (`Connection::queued`).
    deferred: Vec<(usize, u64)>,
    /// The other half of `deferred`'s double buffer: the batch being run is
    /// swapped out of `deferred`, so passes can queue new work without
    /// allocating.
    deferred_spare: Vec<(usize, u64)>,
    /// When shutdown began, the time by which it must end.
    shutdown_deadline: Option<Instant>,
    /// `run` returns when set.
    stopped: bool,
    /// Last accept-failure warning.
    accept_warned: Option<Instant>,
    /// Accept failures not yet reported.
    accept_failures: u64,
    /// Metrics and access log.
    observers: Observers,
    /// Messages from the control thread (reload), if it may send any.
    control: Option<std::sync::mpsc::Receiver<CoreMsg>>,
    /// What moved this turn, added to the metrics once per turn.
    tally: Totals,
    /// Flow-control pauses this turn, likewise.
    tally_pauses: u32,
    /// Access-log records of connections that ended this turn, sent to the
    /// writer once per turn.
    ended: Vec<Record>,
    /// Access rules, trusted proxies, per-source table, buffer budget.
    admission: Admission,
    /// Bytes held for this worker's clients, exact after every pass.
    held: usize,
    /// This turn's view of the global budget.
    budget_view: BudgetView,
    /// Connections the budget stopped reading, retried while it allows.
    rationed: Vec<(usize, u64)>,
    /// Last refusal warning.
    refuse_warned: Option<Instant>,
    /// Refusals since it.
    refusals: u64,
}

impl Core {
    /// A core serving `listeners` on the loop behind `handle`.
    pub fn new(
        handle: LoopHandle,
        listeners: Vec<Listener>,
        limits: Limits,
        shared: Arc<Shared>,
        observers: Observers,
        control: Option<std::sync::mpsc::Receiver<CoreMsg>>,
    ) -> io::Result<Core> {
        // The timer exists even without timeouts (a reload may set some);
        // it is armed only while deadlines wait.
        let timer = Some(LoopTimer::create(&handle, Target::Timer.token())?);
        let mut core = Core {
            timer,
            handle,
            listeners: Slab::with_capacity(listeners.len()),
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
            observers,
            control,
            tally: Totals::default(),
            tally_pauses: 0,
            ended: Vec::new(),
            admission: Admission::default(),
            held: 0,
            budget_view: BudgetView::OFF,
            rationed: Vec::new(),
            refuse_warned: None,
            refusals: 0,
        };
        for listener in listeners {
            core.listener_attach(listener)?;
        }
        Ok(core)
    }

    /// `xps_listener_create()`'s attach half: registers a listening socket
    /// with this loop and looks at its backlog at once.
    fn listener_attach(&mut self, mut listener: Listener) -> io::Result<()> {
        // Named by the address it is bound to (port 0 resolved).
        let name: Arc<str> = listener.at.to_string().into();
        let counter = self
            .observers
            .metrics
            .as_ref()
            .map(|(m, _)| m.listener(&name));
        let entry = self.listeners.vacant_entry();
        self.handle.attach(
            &mut listener.socket,
            Target::Listener(entry.key()).token(),
            Interest::READABLE,
        )?;
        // The backlog may already hold connections: look at once.
        entry.insert(ListenerSlot {
            listener,
            name,
            counter,
            ready: true,
        });
        Ok(())
    }

    /// Step 0: applies what the control thread sent (a reload). Listeners
    /// removed close now; their connections go on until they end. Kept
    /// listeners take their new configuration (the PROXY flag) and new
    /// limits apply, both to connections accepted from now on: an open
    /// connection keeps the mode and limits it was accepted with.
    fn apply_control(&mut self) {
        let Some(rx) = &self.control else {
            return;
        };
        let msgs: Vec<CoreMsg> = rx.try_iter().collect();
        for msg in msgs {
            let CoreMsg::Reconfigure(r) = msg;
            if self.shutdown_deadline.is_some() {
                continue; // shutting down: nothing to serve any more
            }
            let gone: Vec<usize> = self
                .listeners
                .iter()
                .filter(|(_, ls)| r.remove.contains(&ls.listener.at))
                .map(|(k, _)| k)
                .collect();
            for key in gone {
                self.listeners.remove(key); // closes the socket
            }
            for (at, addr) in r.change {
                for (_, ls) in self.listeners.iter_mut() {
                    if ls.listener.at == at {
                        ls.listener.addr = addr.clone();
                    }
                }
            }
            for listener in r.add {
                let addr = listener.addr.clone();
                if let Err(e) = self.listener_attach(listener) {
                    xps_log!(
                        Level::Warning,
                        "xps_core_reload()",
                        "cannot watch the new listener {addr}: {e}"
                    );
                }
            }
            self.limits = r.limits;
            self.admission.rules = r.rules;
            self.admission.proxy_from = r.proxy_from;
            let _ = r.applied.send(());
        }
    }

    /// Applies SPEC §6's admission (the default admits everyone). The
    /// header deadline of PROXY listeners uses the timer, which every core
    /// has.
    pub fn with_admission(mut self, admission: Admission) -> Core {
        self.admission = admission;
        self
    }

    /// Access rules, then the per-source permit, for `client`.
    fn admit(&self, client: std::net::SocketAddr) -> Result<SourcePermit, RefuseReason> {
        admission::admit(&self.admission.rules, &self.admission.sources, client.ip())
            .map_err(RefuseReason::from)
    }

    /// Whether `peer` may send PROXY headers (`--proxy-from`).
    fn trusted_proxy(&self, peer: std::net::SocketAddr) -> bool {
        self.admission
            .proxy_from
            .as_ref()
            .is_none_or(|rules| rules.allows(peer.ip()))
    }

    /// `xps_listener_connection_handler()`: accepts until the backlog is
    /// empty, the turn's budget is spent, the connection cap is reached, or
    /// the OS refuses (out of descriptors or memory, or an error that is not
    /// known to concern one connection only).
    fn listener_connection_handler(&mut self, li: usize) {
        for _ in 0..ACCEPT_BUDGET {
            // The slot is taken before accept(): at the cap, clients wait in
            // the backlog. A failed accept drops it again.
            let Some(slot) = self.shared.slots.try_acquire() else {
                return; // at the cap: `ready` stays set, retried later
            };
            let ls = &mut self.listeners[li];
            match ls.listener.socket.accept() {
                Ok((stream, peer)) => self.connection_create(stream, peer, li, slot),
                Err(e) => match classify_accept_error(&e) {
                    AcceptVerdict::Drained => {
                        ls.ready = false;
                        return;
                    }
                    AcceptVerdict::Retry => {}
                    AcceptVerdict::SkipOne => {
                        if let Some((_, m)) = &self.observers.metrics {
                            m.accept_error(AcceptError::from_io(&e));
                        }
                        xps_log!(
                            Level::Debug,
                            "xps_listener_connection_handler()",
                            "accept() on {} failed for one connection: {}",
                            ls.listener.addr,
                            e
                        );
                    }
                    AcceptVerdict::BackOff => {
                        if let Some((_, m)) = &self.observers.metrics {
                            m.accept_error(AcceptError::from_io(&e));
                        }
                        ls.listener.paused_until = Some(self.now + ACCEPT_BACKOFF);
                        let addr = ls.listener.addr.clone();
                        self.warn_accept_failure(&addr, &e);
                        return;
                    }
                },
            }
        }
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
    /// deadlines. `slot` is the `--max-connections` slot it will hold.
    fn connection_create(
        &mut self,
        mut stream: mio::net::TcpStream,
        peer: std::net::SocketAddr,
        li: usize,
        slot: Slot,
    ) {
        // TCP_NODELAY and SO_OOBINLINE come from the listening socket (see
        // listener::bind).
        // SPEC §6: refused before anything is read (on a PROXY listener the
        // rules and the per-source limit wait for the header).
        // The listener's mode now: a reload may flip it for the connections
        // accepted after it; this one keeps it to its end.
        let proxied = self.listeners[li].listener.addr.proxy;
        let mut permit = None;
        let refused = if proxied {
            (!self.trusted_proxy(peer)).then_some(RefuseReason::Header(HeaderFailure::Untrusted))
        } else {
            match self.admit(peer) {
                Ok(p) => {
                    permit = Some(p);
                    None
                }
                Err(why) => Some(why),
            }
        };
        if let Some(why) = refused {
            let ls = &self.listeners[li];
            if let (Some((_, m)), Some(counter)) = (&self.observers.metrics, &ls.counter) {
                m.accepted(counter);
            }
            let listener = ls.name.clone();
            let proxy = proxied.then_some(peer);
            self.observe_refusal(&listener, peer, proxy, self.now, Totals::default(), why);
            return; // `slot` and `stream` drop here: closed unread
        }
        let entry = self.connections.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.handle.attach(
            &mut stream,
            Target::Connection(key).token(),
            Interest::READABLE | Interest::WRITABLE | Interest::PRIORITY,
        ) {
            xps_log!(
                Level::Warning,
                "xps_connection_create()",
                "cannot watch the connection from {}: {}",
                peer,
                e
            );
            return; // `slot` and `stream` drop here
        }
        let id = self.next_id;
        self.next_id += 1;
        let ls = &self.listeners[li];
        if let (Some((_, m)), Some(counter)) = (&self.observers.metrics, &ls.counter) {
            m.accepted(counter);
        }
        let timeouts = self.limits.timeouts;
        let header_due = proxied.then(|| self.now + HEADER_TIMEOUT);
        let idle_due = timeouts.idle.map(|t| self.now + t);
        let timer_due = [idle_due, header_due].into_iter().flatten().min();
        if let Some(due) = timer_due {
            self.timers.push(Reverse((due, key)));
        }
        xps_log!(
            Level::Debug,
            "xps_connection_create()",
            "new connection #{} from {} on {}",
            id,
            peer,
            ls.name
        );
        let about = (proxied || self.observers.access_log.is_some()).then(|| {
            Box::new(About {
                peer,
                proxy: proxied.then_some(peer),
                since: self.now,
                listener: ls.name.clone(),
            })
        });
        let mut conn = Connection::new(stream, slot, id, self.limits.max_line, self.now);
        if let Some(due) = header_due {
            conn.expect_header(due);
        }
        entry.insert(Entry {
            conn,
            timer_due,
            held: 0,
            rationed: false,
            timeouts: TimeoutSecs::of(timeouts),
            _permit: permit.and_then(boxed_permit),
            about,
        });
    }

    /// `xps_connection_destroy()`: removing the connection from the slab
    /// drops its socket (which closes the fd and so detaches it from epoll)
    /// and its slot.
    fn connection_destroy(&mut self, key: usize, reason: &CloseReason) {
        let entry = self.connections.remove(key);
        self.held -= entry.held as usize;
        match (reason, &entry.about) {
            (CloseReason::Refused(why), Some(about)) => {
                let totals = entry.conn.totals;
                self.observe_refusal(
                    &about.listener,
                    about.peer,
                    about.proxy,
                    about.since,
                    totals,
                    *why,
                );
            }
            _ => {
                xps_log!(
                    Level::Debug,
                    "xps_connection_destroy()",
                    "closed connection #{}: {}",
                    entry.conn.id,
                    reason
                );
                self.observe_close(entry, reason); // drops it: socket and slot go
            }
        }
        // A freed descriptor or slot may let a paused listener accept again.
        for (_, ls) in &mut self.listeners {
            ls.listener.paused_until = None;
        }
        // Keep the timer heap within twice the live connections: stale
        // entries of closed connections would otherwise pile up under churn.
        if self.timers.len() > 2 * self.connections.len() + 1024 {
            self.rebuild_timers();
        }
    }

    /// Reports an ended connection to the metrics and the access log.
    fn observe_close(&mut self, entry: Entry, reason: &CloseReason) {
        let kind = Closed::from(reason);
        if let Some((_, m)) = &self.observers.metrics {
            m.closed(kind);
        }
        if let (Some(_), Some(about)) = (&self.observers.access_log, entry.about) {
            let a = *about;
            self.log_end(
                a.listener,
                a.peer,
                a.proxy,
                a.since,
                entry.conn.totals,
                kind.label(),
            );
        }
    }

    /// Queues the access-log record of a connection that ended (sent to the
    /// writer with the rest of this turn's, in `flush_tally`).
    fn log_end(
        &mut self,
        listener: Arc<str>,
        client: std::net::SocketAddr,
        proxy: Option<std::net::SocketAddr>,
        since: Instant,
        totals: Totals,
        end: &'static str,
    ) {
        self.ended.push(Record {
            time: std::time::SystemTime::now(),
            listener,
            client,
            proxy,
            worker: self.observers.worker,
            duration: self.now.saturating_duration_since(since),
            received: totals.received,
            sent: totals.sent,
            lines: totals.lines,
            end,
        });
    }

    /// Reports a refused connection (SPEC §6): the refusal counter, the
    /// access log, a DEBUG line naming the client and the reason, and a
    /// warning when refusals start (then at most one per [`WARN_INTERVAL`]).
    fn observe_refusal(
        &mut self,
        listener: &Arc<str>,
        client: std::net::SocketAddr,
        proxy: Option<std::net::SocketAddr>,
        since: Instant,
        totals: Totals,
        why: RefuseReason,
    ) {
        if let Some((_, m)) = &self.observers.metrics {
            m.refused(why.kind());
        }
        if self.observers.access_log.is_some() {
            self.log_end(
                listener.clone(),
                client,
                proxy,
                since,
                totals,
                why.kind().label(),
            );
        }
        xps_log!(
            Level::Debug,
            "xps_admission()",
            "refused {} on {}: {}",
            client,
            listener,
            why
        );
        self.refusals += 1;
        if self
            .refuse_warned
            .is_none_or(|t| self.now.saturating_duration_since(t) >= WARN_INTERVAL)
        {
            xps_log!(
                Level::Warning,
                "xps_admission()",
                "refusing connections: {} since the last warning, the latest from {} ({}); DEBUG lines name each",
                self.refusals,
                client,
                why
            );
            self.refuse_warned = Some(self.now);
            self.refusals = 0;
        }
    }

    /// The header phase of a connection on a PROXY listener: reads the
    /// header; once complete, the client address it names is what the
    /// access rules and the per-source limit see, then the bytes after it
    /// are answered. Returns false when the connection is gone or must
    /// wait for more header bytes.
    fn drive_header(&mut self, key: usize) -> bool {
        let entry = &mut self.connections[key];
        let step = entry.conn.read_header(&mut self.scratch);
        match step {
            HeaderStep::Waiting | HeaderStep::More => {
                let held = entry.conn.held();
                self.held = self.held - entry.held as usize + held;
                entry.held = held.min(u32::MAX as usize) as u32;
                if matches!(step, HeaderStep::More) && !entry.conn.queued {
                    entry.conn.queued = true;
                    self.deferred.push((key, entry.conn.id));
                }
                false
            }
            HeaderStep::Failed(reason) => {
                self.connection_destroy(key, &reason);
                false
            }
            HeaderStep::Done { header, rest } => {
                // A PROXY listener's connections always keep `about`
                // (connection_create); without it nothing could be admitted.
                let Some(about) = entry.about.as_mut() else {
                    debug_assert!(false, "a PROXY connection without `about`");
                    self.connection_destroy(key, &CloseReason::Shutdown);
                    return false;
                };
                let client = client_of(&header, about.peer);
                xps_log!(
                    Level::Debug,
                    "xps_connection_create()",
                    "connection #{} from {}: PROXY v{} header, client {}",
                    entry.conn.id,
                    about.peer,
                    header.version,
                    client
                );
                about.peer = client;
                match self.admit(client) {
                    Err(why) => {
                        self.connection_destroy(key, &CloseReason::Refused(why));
                        false
                    }
                    Ok(permit) => {
                        let entry = &mut self.connections[key];
                        entry._permit = boxed_permit(permit);
                        let scratch = &mut self.scratch;
                        let line_timeout = entry.timeouts.get().line;
                        entry.conn.begin_serving(
                            &scratch.read[rest],
                            &mut scratch.out,
                            self.now,
                            line_timeout,
                        );
                        true
                    }
                }
            }
        }
    }

    /// Adds what moved this turn to the metrics (one update per turn, not
    /// per line or per read) and hands this turn's access-log records to
    /// the writer in one message.
    fn flush_tally(&mut self) {
        if let Some(log) = &self.observers.access_log {
            log.log_batch(&mut self.ended);
        }
        let t = std::mem::take(&mut self.tally);
        if let Some((_, m)) = &self.observers.metrics {
            if t.received > 0 {
                m.received(t.received);
            }
            if t.sent > 0 {
                m.sent(t.sent);
            }
            if t.lines > 0 {
                m.lines(t.lines);
            }
            for _ in 0..std::mem::take(&mut self.tally_pauses) {
                m.flow_pause();
            }
        }
    }

    /// Drives one connection and acts on the outcome.
    fn drive(&mut self, key: usize) {
        let Some(entry) = self.connections.get_mut(key) else {
            return;
        };
        // The shared output buffer must start empty: bytes left in it by one
        // connection would be sent to the next one.
        debug_assert!(self.scratch.out.is_empty());
        self.scratch.out.clear();
        let before = entry.conn.totals;
        let pauses_before = entry.conn.pauses;
        if entry.conn.awaiting_header() && !self.drive_header(key) {
            return;
        }
        let entry = &mut self.connections[key];
        let conn = &mut entry.conn;
        let allowance = self.budget_view.allowance(self.held, conn.holding());
        let status = conn.drive_capped(
            &mut self.scratch,
            self.now,
            entry.timeouts.get().line,
            allowance,
        );
        self.tally.add(conn.totals.since(before));
        self.tally_pauses = self
            .tally_pauses
            .wrapping_add(conn.pauses.wrapping_sub(pauses_before));
        let held = conn.held();
        self.held = self.held - entry.held as usize + held;
        entry.held = held.min(u32::MAX as usize) as u32;
        match status {
            Status::Idle => {}
            Status::More => {
                if !conn.queued {
                    conn.queued = true;
                    self.deferred.push((key, conn.id));
                }
            }
            Status::Rationed => {
                if !entry.rationed {
                    entry.rationed = true;
                    self.rationed.push((key, conn.id));
                }
            }
            Status::Close(reason) => return self.connection_destroy(key, &reason),
        }
        // A line clock that started in this pass may be due before anything
        // the heap holds for this connection.
        if let Some(due) = conn.line_due()
            && entry.timer_due.is_none_or(|t| due < t)
        {
            entry.timer_due = Some(due);
            self.timers.push(Reverse((due, key)));
        }
    }

    /// Step 1: begins the graceful shutdown once the stop flag is set.
    fn check_stop(&mut self) {
        if self.shutdown_deadline.is_none() && self.shared.stop.load(Ordering::Relaxed) {
            self.begin_shutdown();
        }
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
            if self.connections[key].conn.awaiting_header() {
                // Not admitted yet: nothing of it to answer.
                self.connection_destroy(key, &CloseReason::Shutdown);
                continue;
            }
            self.connections[key].conn.begin_shutdown();
            self.drive(key);
        }
    }

    /// Step 2b: connections the global buffer budget stopped reading, driven
    /// again once it allows them (their holding or the total fell). Those
    /// that still may not read stay queued; `next_timeout` looks again
    /// every [`RATION_TICK`].
    fn retry_rationed(&mut self) {
        if self.rationed.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.rationed);
        for (key, id) in batch {
            let Some(entry) = self.connections.get_mut(key).filter(|e| e.conn.id == id) else {
                continue; // closed since
            };
            if self.budget_view.allowance(self.held, entry.conn.holding()) == 0 {
                self.rationed.push((key, id)); // not yet
                continue;
            }
            entry.rationed = false;
            if !entry.conn.queued {
                self.drive(key); // a pass stopped again re-queues it
            }
        }
    }

    /// Step 2: drives the connections queued by the last turn.
    fn run_deferred(&mut self) {
        let mut batch = std::mem::take(&mut self.deferred_spare);
        std::mem::swap(&mut batch, &mut self.deferred);
        for &(key, id) in &batch {
            if let Some(entry) = self.connections.get_mut(key)
                && entry.conn.id == id
            {
                entry.conn.queued = false;
                self.drive(key);
            }
        }
        batch.clear();
        self.deferred_spare = batch;
    }

    /// Step 3: accepts on listeners whose backlog was left non-empty, once
    /// their back-off (if any) is over.
    fn retry_listeners(&mut self) {
        // Listener keys are indices below the slab's capacity; there are few.
        for key in 0..self.listeners.capacity() {
            let Some(ls) = self.listeners.get_mut(key) else {
                continue;
            };
            if ls
                .listener
                .paused_until
                .is_some_and(|until| until > self.now)
            {
                continue;
            }
            ls.listener.paused_until = None;
            if ls.ready {
                self.listener_connection_handler(key);
            }
        }
    }

    /// Step 4: closes connections whose idle or line deadline passed.
    /// Activity does not touch the heap (it only updates `last_active`); an
    /// entry that comes due for a connection that was active since is pushed
    /// again with its real deadline. So each connection costs at most one
    /// heap operation per timeout period, and nothing scans every connection.
    fn expire_deadlines(&mut self) {
        while let Some(&Reverse((deadline, key))) = self.timers.peek() {
            if deadline > self.now {
                break;
            }
            self.timers.pop();
            let Some(entry) = self.connections.get_mut(key) else {
                continue; // closed since
            };
            // An entry is live only while it is the connection's recorded
            // deadline: one left by a closed connection (its key reused) or
            // superseded by an earlier one is skipped. Even a false match
            // would be harmless: the connection's own clocks decide.
            if entry.timer_due != Some(deadline) {
                continue;
            }
            match entry.conn.check_deadlines(self.now, entry.timeouts.get()) {
                Deadline::Expired(reason) => self.connection_destroy(key, &reason),
                Deadline::Next(due) => {
                    entry.timer_due = Some(due);
                    self.timers.push(Reverse((due, key)));
                }
                Deadline::None => entry.timer_due = None,
            }
        }
        self.arm_timer();
    }

    /// Arms the timerfd for the earliest deadline.
    fn arm_timer(&mut self) {
        if let (Some(timer), Some(Reverse((deadline, _)))) = (&mut self.timer, self.timers.peek())
            && let Err(e) = timer.arm_at(*deadline, self.now)
        {
            xps_log!(
                Level::Warning,
                "xps_core_timer()",
                "timerfd_settime() failed ({e}); deadlines now shorten epoll waits"
            );
            self.timer = None;
        }
    }

    fn rebuild_timers(&mut self) {
        let live: Vec<_> = self
            .connections
            .iter()
            .filter_map(|(key, e)| e.timer_due.map(|t| Reverse((t, key))))
            .collect();
        self.timers = BinaryHeap::from(live);
    }

    /// Step 5: during a shutdown, looks at lingering connections (their
    /// progress raises no event) and ends the grace period.
    fn step_shutdown(&mut self) {
        let Some(deadline) = self.shutdown_deadline else {
            return;
        };
        let lingering: Vec<usize> = self
            .connections
            .iter()
            .filter(|(_, e)| e.conn.phase() == Phase::Lingering)
            .map(|(k, _)| k)
            .collect();
        for key in lingering {
            let status = self.connections[key].conn.linger(&mut self.scratch.read);
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
            let keys: Vec<usize> = self.connections.iter().map(|(k, _)| k).collect();
            for key in keys {
                self.connection_destroy(key, &CloseReason::Shutdown);
            }
            self.stopped = true;
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
        if !self.rationed.is_empty() {
            let tick = self.now + RATION_TICK;
            wake = Some(wake.map_or(tick, |w| w.min(tick)));
        }
        let mut earliest = |t: Instant| {
            wake = Some(wake.map_or(t, |w| w.min(t)));
        };
        // Deadlines wake the loop through `timer`; only without one (it
        // could not be armed) do they shorten the wait.
        if let (None, Some(Reverse((t, _)))) = (&self.timer, self.timers.peek()) {
            earliest(*t);
        }
        let at_cap = self.shared.slots.full();
        for (_, ls) in &self.listeners {
            if !ls.ready {
                continue;
            }
            match ls.listener.paused_until {
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
    fn woke(&mut self) {
        self.now = Instant::now();
        // The global budget, once per turn: the other workers' totals.
        self.budget_view = self
            .admission
            .budget
            .view(self.observers.worker, self.shared.slots.taken());
    }

    fn on_event(&mut self, event: &Event) {
        match Target::of(event.token()) {
            Target::Waker => {} // stop flag and control messages: after_events
            Target::Timer => {
                if let Some(timer) = &mut self.timer {
                    timer.fired(); // deadlines run in after_events
                }
            }
            Target::Listener(key) => {
                if let Some(ls) = self.listeners.get_mut(key) {
                    ls.ready = true;
                    if ls.listener.paused_until.is_none() {
                        self.listener_connection_handler(key);
                    }
                }
            }
            Target::Connection(key) => {
                if let Some(entry) = self.connections.get_mut(key) {
                    entry.conn.note_event(event);
                    // A queued connection is driven once, in the deferred
                    // step of this turn: one read budget per turn.
                    if !entry.conn.queued {
                        self.drive(key);
                    }
                }
            }
        }
    }

    fn after_events(&mut self) -> Option<Duration> {
        self.apply_control();
        self.check_stop();
        self.run_deferred();
        self.retry_rationed();
        self.retry_listeners();
        self.expire_deadlines();
        self.step_shutdown();
        self.flush_tally();
        // One relaxed store to this worker's own padded slot per turn.
        self.admission
            .budget
            .publish(self.observers.worker, self.held);
        self.next_timeout()
    }

    fn should_stop(&self) -> bool {
        self.stopped
    }
}

/// The client a PROXY header names: its source, or the socket's own peer
/// for a header without addresses (v2 `LOCAL`, a health check; v1
/// `UNKNOWN`; v2 `UNSPEC`).
fn client_of(header: &ProxyHeader, peer: std::net::SocketAddr) -> std::net::SocketAddr {
    header.source.unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_connection_costs_at_most_256_bytes_in_the_slab() {
        // The slab entry (the connection and what the core keeps beside it)
        // of a plain idle connection: the per-connection user-space cost.
        let size = std::mem::size_of::<Entry>();
        assert!(size <= 256, "Entry is {size} bytes");
    }

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
