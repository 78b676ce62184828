//! The production hook set: everything of SPEC §5–§6 that acts on
//! connections, plugged into the worker through [`Hooks`].
//!
//! | hook            | what answers it                                            |
//! |-----------------|------------------------------------------------------------|
//! | `on_accept`     | `--proxy-from` (PROXY listeners), access rules and the per-source limit (`policy`); the accept counter |
//! | preface         | the PROXY header (`policy::proxy_protocol`), then the same admission for the client it names |
//! | `allowance`     | the global memory bound (`policy::budget`)          |
//! | `on_pass`       | per-turn totals for the metrics; the access log's per-connection totals; the bytes held |
//! | `on_close`      | the close counters and the access-log record               |
//! | `on_turn`       | one metrics update and one access-log batch per turn; the budget published |
//! | `about`         | a connection's client, listener and totals, for `/api/connections` |
//!
//! Each piece keeps per-connection state only when it is on: a plain idle
//! connection with no access log, no metrics and no per-source limit costs
//! this module two pointers and a counter.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{ListenAddr, Settings};
use crate::core::hooks::{About, Carried, Hooks, PrefaceEnd, PrefaceStep, Verdict};
use crate::network::connection::{Connection, Pass};
use crate::network::io::CloseReason;
use crate::observe::access_log::{AccessLog, Record};
use crate::observe::metrics::{AcceptError, ListenerCounter, Metrics, WorkerMetrics};
use crate::policy::access::AccessRules;
use crate::policy::budget::{BudgetView, BufferBudget, Holding};
use crate::policy::proxy_protocol::{
    HEADER_TIMEOUT, HeaderFailure, HeaderReader, ProxyError, ProxyHeader,
};
use crate::policy::source_limit::{SourceLimits, SourcePermit};
use crate::policy::{self, Refusal};
use crate::slots::Slots;
use crate::utils::logger::Level;
use crate::utils::ratelimit::RateLimited;
use crate::xps_log;

/// At most one refusal warning per this interval per worker.
const WARN_INTERVAL: Duration = Duration::from_secs(5);

/// SPEC §6's admission, shared by every worker. The default admits everyone
/// and bounds nothing.
#[derive(Debug, Clone)]
pub struct Admission {
    /// `--allow` / `--deny`.
    pub rules: Arc<AccessRules>,
    /// `--proxy-from` as rules; `None` = any peer may send headers.
    pub proxy_from: Option<Arc<AccessRules>>,
    /// `--max-connections-per-source`, over all workers.
    pub sources: Arc<SourceLimits>,
    /// `--max-buffered`, over all workers.
    pub budget: Arc<BufferBudget>,
}

impl Admission {
    /// SPEC §6's admission from the settings, shared by every worker.
    pub fn from_settings(settings: &Settings) -> Admission {
        Admission {
            rules: Arc::new(settings.access.clone()),
            proxy_from: AccessRules::trusted_proxies(&settings.proxy_from).map(Arc::new),
            sources: SourceLimits::new(settings.max_connections_per_source),
            budget: BufferBudget::new(settings.max_buffered, settings.workers),
        }
    }
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

/// What a reload hands each worker's features: the rules for connections
/// accepted from now on (the per-source limit and the budget are shared and
/// change in place).
#[derive(Debug)]
pub struct Update {
    /// `--allow` / `--deny`.
    pub rules: Arc<AccessRules>,
    /// `--proxy-from`.
    pub proxy_from: Option<Arc<AccessRules>>,
}

/// One worker's features.
pub struct Features {
    /// This worker's number (access log, budget slot).
    worker: usize,
    /// Access rules, trusted proxies, per-source table, buffer budget.
    admission: Admission,
    /// The `--max-connections` slots (the budget's share counts connections
    /// over all workers).
    slots: Arc<Slots>,
    /// Bytes held for this worker's clients, exact after every pass.
    held: usize,
    /// Connections holding bytes (an unterminated line or unsent replies),
    /// exact after every pass: `/api`'s `req_current`.
    holding: usize,
    /// This turn's view of the global budget.
    budget: BudgetView,
    /// The registry (per-listener counters) and this worker's block.
    metrics: Option<(Arc<Metrics>, WorkerMetrics)>,
    /// Where ended connections are written.
    access_log: Option<AccessLog>,
    /// Records of connections that ended this turn, sent once per turn.
    ended: Vec<Record>,
    /// What moved this turn, added to the metrics once per turn.
    tally: Tally,
    /// Refusals, warned about at most once per [`WARN_INTERVAL`].
    refusals: RateLimited,
}

/// What moved in one loop turn.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    received: u64,
    sent: u64,
    lines: u64,
    pauses: u64,
}

/// What the features keep per listener.
pub struct ListenerState {
    /// Its bound address, shared by the access-log records of its
    /// connections.
    name: Arc<str>,
    /// This worker's accept counter for it, with metrics on.
    counter: Option<ListenerCounter>,
    /// Connections start with a PROXY header.
    proxy: bool,
}

/// What the features keep per served connection.
pub struct ConnState {
    /// Bytes it held after its last pass (its part of `Features::held`).
    held: u32,
    /// Its per-source count, with a per-source limit (released on drop).
    _permit: Option<Box<SourcePermit>>,
    /// Who it is and what moved, with the access log or the metrics on
    /// (`/api/connections` shows it), and on a PROXY listener.
    report: Option<Box<Report>>,
}

/// What the access log records of a connection, and `/api/connections`
/// shows.
struct Report {
    /// The client: the TCP peer, or the PROXY header's source.
    client: SocketAddr,
    /// On a PROXY listener, the balancer (the TCP peer).
    proxy: Option<SocketAddr>,
    /// When it was accepted.
    since: Instant,
    /// The listener it came through.
    listener: Arc<str>,
    /// Bytes read, bytes written, replies.
    received: u64,
    sent: u64,
    lines: u64,
}

/// What the features keep while a PROXY header is read.
pub struct Preface {
    /// The bytes of an incomplete header.
    reader: HeaderReader,
    /// The balancer (the TCP peer).
    peer: SocketAddr,
    /// When it was accepted.
    since: Instant,
    /// The listener it came through.
    listener: Arc<str>,
    /// The complete header, once read.
    header: Option<ProxyHeader>,
    /// Why the bytes cannot be a header, once known.
    error: Option<ProxyError>,
}

impl Features {
    /// Worker `worker`'s features.
    pub fn new(
        worker: usize,
        admission: Admission,
        slots: Arc<Slots>,
        metrics: Option<(Arc<Metrics>, WorkerMetrics)>,
        access_log: Option<AccessLog>,
    ) -> Features {
        Features {
            worker,
            admission,
            slots,
            held: 0,
            holding: 0,
            budget: BudgetView::OFF,
            metrics,
            access_log,
            ended: Vec::new(),
            tally: Tally::default(),
            refusals: RateLimited::new(WARN_INTERVAL),
        }
    }

    /// Access rules, then the per-source permit, for `client`.
    fn admit(&self, client: SocketAddr) -> Result<Option<Box<SourcePermit>>, Refusal> {
        policy::admit(&self.admission.rules, &self.admission.sources, client.ip())
            .map(|permit| permit.key().is_some().then(|| Box::new(permit)))
    }

    /// The state of an admitted connection.
    #[inline]
    fn serve(
        &self,
        permit: Option<Box<SourcePermit>>,
        client: SocketAddr,
        proxy: Option<SocketAddr>,
        since: Instant,
        listener: &Arc<str>,
    ) -> ConnState {
        // A PROXY client's address is kept even when nothing reports it:
        // the socket cannot tell it again, and an upgrade must carry it
        // (the per-source count of the new process is keyed by it).
        let keep = self.access_log.is_some() || self.metrics.is_some() || proxy.is_some();
        let report = keep.then(|| {
            Box::new(Report {
                client,
                proxy,
                since,
                listener: listener.clone(),
                received: 0,
                sent: 0,
                lines: 0,
            })
        });
        ConnState {
            held: 0,
            _permit: permit,
            report,
        }
    }

    /// A refused connection (SPEC §6): the refusal counter, the access log,
    /// a DEBUG line naming the client, and a rate-limited warning.
    fn refuse(&mut self, why: Refusal, r: Ended<'_>, now: Instant) {
        if let Some((_, m)) = &self.metrics {
            m.refused(why);
        }
        self.record(&r, why.label(), now);
        xps_log!(
            Level::Debug,
            "xps_admission()",
            "refused {} on {}: {}",
            r.client,
            r.listener,
            why
        );
        if let Some(n) = self.refusals.hit(now) {
            xps_log!(
                Level::Warning,
                "xps_admission()",
                "refusing connections: {n} since the last warning, the latest from {} ({why}); DEBUG lines name each",
                r.client
            );
        }
    }

    /// Queues the access-log record of a connection that ended.
    fn record(&mut self, r: &Ended<'_>, end: &'static str, now: Instant) {
        if self.access_log.is_none() {
            return;
        }
        self.ended.push(Record {
            time: std::time::SystemTime::now(),
            listener: r.listener.clone(),
            client: r.client,
            proxy: r.proxy,
            worker: self.worker,
            duration: now.saturating_duration_since(r.since),
            received: r.totals.0,
            sent: r.totals.1,
            lines: r.totals.2,
            end,
        });
    }
}

/// A connection that ended, as its report names it.
struct Ended<'a> {
    listener: &'a Arc<str>,
    client: SocketAddr,
    proxy: Option<SocketAddr>,
    since: Instant,
    /// Received, sent, lines.
    totals: (u64, u64, u64),
}

impl Hooks for Features {
    type Listener = ListenerState;
    type Conn = ConnState;
    type Preface = Box<Preface>;
    type Update = Update;

    fn listener(&mut self, addr: &ListenAddr, bound: SocketAddr) -> ListenerState {
        let name: Arc<str> = bound.to_string().into();
        let counter = self.metrics.as_ref().map(|(m, _)| m.listener(&name));
        ListenerState {
            name,
            counter,
            proxy: addr.proxy,
        }
    }

    fn listener_changed(&mut self, listener: &mut ListenerState, addr: &ListenAddr) {
        listener.proxy = addr.proxy;
    }

    fn reconfigure(&mut self, update: Update) {
        self.admission.rules = update.rules;
        self.admission.proxy_from = update.proxy_from;
    }

    fn woke(&mut self, _now: Instant, _open: usize) {
        // The global budget, once per turn: the other workers' totals.
        self.budget = self.admission.budget.view(self.worker, self.slots.taken());
    }

    fn accept_failed(&mut self, e: &std::io::Error) {
        if let Some((_, m)) = &self.metrics {
            m.accept_error(AcceptError::from_io(e));
        }
    }

    fn on_accept(
        &mut self,
        listener: &ListenerState,
        peer: SocketAddr,
        now: Instant,
    ) -> Verdict<ConnState, Box<Preface>> {
        if let (Some((_, m)), Some(counter)) = (&self.metrics, &listener.counter) {
            m.accepted(counter);
        }
        let ended = |proxy| Ended {
            listener: &listener.name,
            client: peer,
            proxy,
            since: now,
            totals: (0, 0, 0),
        };
        if listener.proxy {
            // The rules and the per-source limit wait for the header's client.
            let trusted = self
                .admission
                .proxy_from
                .as_ref()
                .is_none_or(|r| r.allows(peer.ip()));
            if !trusted {
                self.refuse(
                    Refusal::ProxyHeader(HeaderFailure::Untrusted),
                    ended(Some(peer)),
                    now,
                );
                return Verdict::Refuse;
            }
            return Verdict::Preface {
                state: Box::new(Preface {
                    reader: HeaderReader::new(),
                    peer,
                    since: now,
                    listener: listener.name.clone(),
                    header: None,
                    error: None,
                }),
                within: HEADER_TIMEOUT,
            };
        }
        match self.admit(peer) {
            Ok(permit) => Verdict::Serve(self.serve(permit, peer, None, now, &listener.name)),
            Err(why) => {
                self.refuse(why, ended(None), now);
                Verdict::Refuse
            }
        }
    }

    fn preface_feed(&mut self, p: &mut Box<Preface>, bytes: &[u8]) -> PrefaceStep {
        match p.reader.feed(bytes) {
            Ok(Some((header, start))) => {
                p.header = Some(header);
                PrefaceStep::Done(start)
            }
            Ok(None) => PrefaceStep::More,
            Err(e) => {
                p.error = Some(e);
                PrefaceStep::Bad
            }
        }
    }

    fn preface_done(&mut self, p: &mut Box<Preface>, now: Instant) -> Option<ConnState> {
        let header = p.header?;
        // A header without addresses (v2 LOCAL, v1 UNKNOWN) names the socket's peer.
        let client = header.source.unwrap_or(p.peer);
        xps_log!(
            Level::Debug,
            "xps_proxy_header()",
            "connection from {}: PROXY v{} header, client {}",
            p.peer,
            header.version,
            client
        );
        let listener = p.listener.clone();
        match self.admit(client) {
            Ok(permit) => Some(self.serve(permit, client, Some(p.peer), p.since, &listener)),
            Err(why) => {
                let ended = Ended {
                    listener: &listener,
                    client,
                    proxy: Some(p.peer),
                    since: p.since,
                    totals: (0, 0, 0),
                };
                self.refuse(why, ended, now);
                None
            }
        }
    }

    fn preface_failed(&mut self, p: &mut Box<Preface>, why: PrefaceEnd, now: Instant) {
        let listener = p.listener.clone();
        let ended = Ended {
            listener: &listener,
            client: p.peer,
            proxy: Some(p.peer),
            since: p.since,
            totals: (0, 0, 0),
        };
        let failure = match why {
            PrefaceEnd::Bad => {
                HeaderFailure::Malformed(p.error.unwrap_or(ProxyError::BadSignature))
            }
            PrefaceEnd::Closed => HeaderFailure::Closed,
            PrefaceEnd::Timeout => HeaderFailure::Timeout,
            // Not the header's fault: counted as an ordinary close.
            PrefaceEnd::Failed(reason) => return self.closed(&reason, Some(&ended), now),
            PrefaceEnd::Shutdown => return self.closed(&CloseReason::Shutdown, Some(&ended), now),
        };
        self.refuse(Refusal::ProxyHeader(failure), ended, now);
    }

    fn allowance(&self, state: &ConnState, conn: &Connection) -> usize {
        let _ = state;
        let holding = Holding {
            bytes: conn.held(),
            line: conn.partial_len(),
            max_line: conn.max_line(),
        };
        self.budget.allowance(self.held, holding)
    }

    fn on_pass(&mut self, state: &mut ConnState, pass: &Pass, conn: &Connection) {
        self.tally.received += pass.received as u64;
        self.tally.sent += pass.sent as u64;
        self.tally.lines += pass.replies as u64;
        self.tally.pauses += u64::from(pass.paused);
        if let Some(r) = &mut state.report {
            r.received += pass.received as u64;
            r.sent += pass.sent as u64;
            r.lines += pass.replies as u64;
        }
        self.set_held(state, conn.held());
    }

    #[inline]
    fn on_close(&mut self, mut state: ConnState, reason: &CloseReason, now: Instant) {
        self.set_held(&mut state, 0);
        let ended = state.report.as_deref().map(|r| Ended {
            listener: &r.listener,
            client: r.client,
            proxy: r.proxy,
            since: r.since,
            totals: (r.received, r.sent, r.lines),
        });
        self.closed(reason, ended.as_ref(), now);
    }

    fn on_turn(&mut self) {
        if let Some(log) = &self.access_log {
            log.log_batch(&mut self.ended);
        }
        let t = std::mem::take(&mut self.tally);
        if let Some((_, m)) = &self.metrics {
            if t.received > 0 {
                m.received(t.received);
            }
            if t.sent > 0 {
                m.sent(t.sent);
            }
            if t.lines > 0 {
                m.lines(t.lines);
            }
            for _ in 0..t.pauses {
                m.flow_pause();
            }
            m.holding(self.holding as u64);
        }
        // One relaxed store to this worker's own padded slot per turn.
        self.admission.budget.publish(self.worker, self.held);
    }

    fn hand_over(&mut self, mut state: ConnState, _conn: &Connection, now: Instant) -> Carried {
        self.set_held(&mut state, 0);
        if let Some((_, m)) = &self.metrics {
            m.handed_over();
        }
        // Without a report (no access log, no metrics, no PROXY header) the
        // snapshot's view is empty: the new process knows the client by its
        // TCP peer.
        Carried::of(self.about(&state), now)
    }

    fn hand_over_preface(&mut self, mut p: Box<Preface>, now: Instant) -> Carried {
        if let Some((_, m)) = &self.metrics {
            m.handed_over();
        }
        Carried {
            listener: p.listener.to_string(),
            client: None,
            proxy: Some(p.peer),
            age: now.saturating_duration_since(p.since),
            totals: [0; 3],
            preface: p.reader.take_buffered(),
        }
    }

    fn adopt(
        &mut self,
        c: &Carried,
        peer: SocketAddr,
        conn: &Connection,
        now: Instant,
    ) -> ConnState {
        if let Some((_, m)) = &self.metrics {
            m.adopted();
        }
        let client = c.client.unwrap_or(peer);
        let permit = self.admission.sources.acquire_forced(client.ip());
        let permit = permit.key().is_some().then(|| Box::new(permit));
        let since = now.checked_sub(c.age).unwrap_or(now);
        let listener = moved_listener_name(c, conn);
        let mut state = self.serve(permit, client, c.proxy, since, &listener);
        if let Some(r) = &mut state.report {
            [r.received, r.sent, r.lines] = c.totals;
        }
        self.set_held(&mut state, conn.held());
        state
    }

    fn adopt_preface(
        &mut self,
        c: &Carried,
        peer: SocketAddr,
        now: Instant,
    ) -> Option<Box<Preface>> {
        let mut reader = HeaderReader::new();
        if !c.preface.is_empty() && !matches!(reader.feed(&c.preface), Ok(None)) {
            return None; // it was incomplete where it came from
        }
        if let Some((_, m)) = &self.metrics {
            m.adopted();
        }
        Some(Box::new(Preface {
            reader,
            peer,
            since: now.checked_sub(c.age).unwrap_or(now),
            listener: c.listener.as_str().into(),
            header: None,
            error: None,
        }))
    }

    fn about(&self, state: &ConnState) -> About {
        state
            .report
            .as_deref()
            .map_or_else(About::default, |r| About {
                listener: Some(r.listener.clone()),
                client: Some(r.client),
                proxy: r.proxy,
                since: Some(r.since),
                received: r.received,
                sent: r.sent,
                lines: r.lines,
            })
    }

    fn about_preface(&self, p: &Box<Preface>) -> About {
        // The client is not known before its header: the TCP peer is shown.
        About {
            listener: Some(p.listener.clone()),
            client: Some(p.peer),
            since: Some(p.since),
            ..About::default()
        }
    }
}

/// The listener a moved connection's record names: the one it came
/// through, or, when the process it came from kept no name, its local
/// address.
fn moved_listener_name(c: &Carried, conn: &Connection) -> Arc<str> {
    if !c.listener.is_empty() {
        return c.listener.as_str().into();
    }
    conn.local_addr()
        .map_or_else(|_| "-".into(), |a| a.to_string().into())
}

impl Features {
    /// What a connection holds is now `held` bytes: the worker's total and
    /// its count of connections holding bytes follow. The one place both
    /// change (a pass, a close, a move out or in).
    #[inline]
    fn set_held(&mut self, state: &mut ConnState, held: usize) {
        self.held = self.held - state.held as usize + held;
        self.holding = self.holding - usize::from(state.held > 0) + usize::from(held > 0);
        state.held = held.min(u32::MAX as usize) as u32;
    }

    /// A served connection (or a preface the socket or a shutdown ended)
    /// closed: the close counter and the access-log record.
    fn closed(&mut self, reason: &CloseReason, ended: Option<&Ended<'_>>, now: Instant) {
        if let Some((_, m)) = &self.metrics {
            m.closed(reason);
        }
        if let Some(r) = ended {
            self.record(r, reason.label(), now);
        }
    }
}
