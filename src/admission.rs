//! Admission: "may this connection be accepted, and may it be read now?"
//! (SPEC §6). Three independent pieces, each with the narrowest interface the
//! core needs, and none of them on the per-line path:
//!
//! | piece            | asked                                  | cost                          |
//! |------------------|----------------------------------------|-------------------------------|
//! | [`AccessRules`]  | once per accepted connection           | a scan of the rules, no lock  |
//! | [`SourceLimits`] | once per accepted connection, and on close (drop of the [`SourcePermit`]) | one mutex, or nothing at limit 0 |
//! | [`BufferBudget`] | once per loop turn ([`BufferBudget::publish`], [`BufferBudget::view`]) and per read pass ([`BudgetView::allowance`]) | relaxed atomics in padded slots |
//!
//! [`admit`] chains the first two in the order the core needs (rules first,
//! so a denied address never takes the per-source lock).
//!
//! # Access rules: nginx's `allow` / `deny`
//!
//! The semantics are nginx's `ngx_http_access_module` (and its stream twin),
//! because that is what operators already write: rules are checked in the
//! order given, the first whose scope contains the client address decides,
//! and an address no rule matches is allowed (so `deny all` must be written
//! last to make a whitelist). Scopes are `all`, an address (`127.0.0.1` is a
//! /32, `::1` a /128, brackets allowed: `[::1]`) or a CIDR (`10.0.0.0/8`,
//! `2001:db8::/32`).
//!
//! * **Host bits set** (`10.1.2.3/8`): nginx accepts it, truncates it to
//!   `10.0.0.0/8` and warns "low address bits are meaningless". We reject it
//!   and name the network meant. A deny/allow list is a security boundary: the
//!   common cause of `10.1.2.3/8` is a slip for `/32` (or for `/24`), and
//!   silently widening it to sixteen million addresses is the worst guess. The
//!   fix is one edit, and `--check` reports it before a reload applies it.
//! * **IPv4-mapped IPv6** (`::ffff:10.1.2.3`, what a dual-stack `[::]`
//!   listener reports for an IPv4 client) is matched as the IPv4 address, as
//!   nginx does: an operator who wrote `deny 10.0.0.0/8` means those clients
//!   whatever socket family carried them. Rules written in mapped form
//!   (`::ffff:10.0.0.0/104`) are turned into their IPv4 form (`10.0.0.0/8`) at
//!   parse time, so both spellings mean the same thing; a wider IPv6 rule
//!   such as `::/0` covers native IPv6 only.
//!
//! # Per-source limit: systemd's `MaxConnectionsPerSource`
//!
//! `--max-connections-per-source N` is systemd's socket option of the same
//! name (and HAProxy's `src_conn_cur` idiom): at most N open connections per
//! source, over all workers. One table behind one mutex is shared by every
//! worker: the lock is taken once at accept and once at close, never per
//! line, and a per-worker table could not count across workers (the kernel's
//! SO_REUSEPORT spreads one client's connections over all of them).
//!
//! * **Keys**: an IPv4 address by itself; an IPv6 address by its /64, because
//!   one host routinely owns a whole /64 (SLAAC, privacy addresses) and could
//!   otherwise take a fresh address per connection. This is the granularity
//!   nginx's and Cloudflare's IPv6 rate limits commonly use. Mapped IPv6 is
//!   keyed as its IPv4 address, as for the rules.
//! * **Release on drop**: [`SourceLimits::try_acquire`] returns a
//!   [`SourcePermit`] the connection owns; dropping the connection drops the
//!   permit, which decrements the count. There is no "release" call to forget,
//!   and no path (error, timeout, shutdown) that leaks a count.
//! * **Bounded table**: an entry is removed when its count reaches 0, so the
//!   table holds at most one entry per *open* connection; a scan over millions
//!   of source addresses leaves nothing behind.
//! * **Limit 0** (the default) costs nothing: the permit carries no key and
//!   neither acquiring nor dropping it touches the lock.
//! * **Reload** ([`SourceLimits::set_limit`]) applies to new connections:
//!   lowering the limit closes nobody (connections over it stay until they
//!   end); raising it from 0 counts only connections accepted afterwards,
//!   since permits taken at limit 0 carry no key.
//! * The map uses std's SipHash: its keys are chosen by clients, so a
//!   flooding-resistant hash is the right default.
//!
//! # Global buffer budget: Redis's soft/hard output limits, Sōzu's buffer pool
//!
//! `--max-buffered` bounds the bytes held for clients (unsent replies plus
//! unterminated lines) over all connections of all workers. Sōzu bounds the
//! same thing with a fixed, shared buffer pool; Redis with per-class
//! `client-output-buffer-limit` soft and hard limits. A shared counter
//! updated on every read would put a contended cache line on the line path,
//! so instead:
//!
//! * each worker keeps its own exact running total (it knows every byte it
//!   holds) and [`publish`](BufferBudget::publish)es it once per loop turn
//!   into its own slot, padded to 128 bytes so two workers never write the
//!   same cache line (128 rather than 64 because x86 prefetches line pairs;
//!   crossbeam's `CachePadded` makes the same choice);
//! * readers sum the slots ([`total`](BufferBudget::total)); the sum is at
//!   most one loop turn per worker stale, and the bound below accounts for it;
//! * the worker takes one [`BudgetView`] per loop turn
//!   ([`view`](BufferBudget::view)) and asks it, pure and without atomics,
//!   before each read pass.
//!
//! ## The rule
//!
//! Let `L` be the limit, `n` the open connections and `M` a connection's
//! `--max-line`. Rationing starts at the **pause mark** `P = L − L/4`
//! (Redis's soft limit, with the `L/4` left above it as the room the
//! rationing itself may use). While the total is past `P`:
//!
//! * each connection's **share** is `S = max(L / (4·n), 64 KiB)`;
//! * a connection holding `held < S` may be read, at most `S − held` bytes in
//!   this pass ([`BudgetView::allowance`]);
//! * a connection holding `S` or more that holds **nothing but its
//!   unterminated line** (no unsent replies) may still be read, at most
//!   `M + 1 − line` bytes: enough for the line to complete, or to pass `M`
//!   bytes and be cut into a segment reply (the protocol cuts a line once
//!   more than `M` bytes of it are held);
//! * any other connection holding `S` or more is paused;
//! * paused connections keep *sending*: their held bytes only fall, and they
//!   are read again as soon as they drop under `S`, down to their line, or
//!   the total under `P`.
//!
//! Why this keeps well-behaved clients served: a client that reads its
//! replies soon holds nothing but its unterminated line, and such a client
//! is always read, whatever the total, until that line completes (or is cut
//! at `--max-line`) and is answered. The line rule is needed because
//! `--max-line` (100 000 by default) may exceed the share: without it a
//! connection holding 80 000 bytes of a line would be paused with its LF
//! unread, and nothing it could do would ever free its share. Why it cannot
//! starve anybody for good: a paused client holds unsent replies; once it
//! reads them it holds only its line and is read again; only a client that
//! does not read stays paused, and it is exactly the one growing the total.
//! Nothing is dropped: a paused client's bytes wait in the kernel and TCP
//! pushes back on it.
//!
//! ## The bound
//!
//! Each byte read becomes exactly one held byte (the reversal's reply has the
//! input's length; the rest stays as the partial line) until it is sent, so
//! a connection's held bytes grow only by reading. Let `G` be the most one
//! unrationed read pass can add (with `network::connection`'s constants, its
//! read budget plus one `recv()`: 256 KiB + 64 KiB) and `C` one `recv()`
//! (64 KiB), the most a rationed pass can overshoot its allowance. Let `F =
//! max(64 KiB, M + 1)` (with several `--max-line` in force after reloads,
//! the largest), so that `max(S, M + 1) ≤ L/(4·n) + F`.
//!
//! Two assumptions about the core, both true of today's loop: each worker
//! publishes its exact total once per turn and takes its view at the start
//! of the next, and drives each connection at most once per turn.
//!
//! 1. *Staleness.* A worker's view is its own total (exact: it published it
//!    at the end of its last turn) plus the others' published totals. What
//!    any view misses is the growth of the turns in progress, at most one
//!    pass per connection. Reads on a view under `P` therefore leave the
//!    true total at most `P + n·G`.
//! 2. *Rationing.* A connection is read only while it holds less than `S`,
//!    and then ends the pass under `S + C`; or while it holds nothing but a
//!    line of `line ≥ S` bytes, and then ends it with at most `M + 1 + C`
//!    (what it read becomes replies or the new line, byte for byte). One that
//!    holds more only drains. So each connection holds at most `max(what it
//!    held when its worker started rationing, max(S, M + 1) + C)`, and the
//!    total at most `(P + n·G) + n·(max(S, M + 1) + C)`. Since `P + L/4 =
//!    L`:
//!
//! ```text
//! total ≤ L + n · (G + C + F)      (with today's constants and the default
//!                                   --max-line: L + n · (384 KiB + 97.7 KiB))
//! ```
//!
//! A fixed overhead per connection, whatever the number of clients sending
//! without reading. `F` is the price of answering every line up to
//! `--max-line`: a connection must be able to hold one whole unterminated
//! line (SPEC §3 already lets each hold up to `--max-line` of it), so no rule
//! can do with less; a smaller `--max-line` lowers it down to the 64 KiB
//! floor. `G`, the price of publishing once per turn rather than per read,
//! dominates the rest: a core that lowers the per-pass read budget lowers
//! the overhead with it, and one that also caps each `recv()` at the
//! allowance makes `C = 0` (xps's core does, and counts its own total
//! exactly, which leaves `L + n · F` plus what the other workers read in one
//! turn: see [`BudgetView::allowance`]).
//! The per-connection high-water mark (SPEC §3, 1 MiB) still applies on top
//! and is what bounds a single connection when the budget is off.
//! `simulated_flood_stays_under_the_bound` (in the tests) replays the worst
//! case: from 1 to 1000 clients that never read, sending short lines, lines
//! just under `--max-line`, or no LF at all, with their replies held or
//! taken by the kernel.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::{IpNet, Ipv4Net};

use crate::network::proxy_header::HeaderFailure;

// ---------------------------------------------------------------------------
// Refusal reasons
// ---------------------------------------------------------------------------

/// Why a connection was turned away before it was served (SPEC §6). The
/// label is the `reason` the access log and the refusal counters use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An access rule denied the client address.
    Denied,
    /// The client's source already holds `--max-connections-per-source`
    /// connections.
    PerSourceLimit,
    /// The PROXY header was not received as it must be.
    ProxyHeader(HeaderFailure),
}

impl Refusal {
    /// Every label, in the order of [`index`](Self::index).
    pub const LABELS: [&'static str; 3] = ["denied", "per_source_limit", "proxy_header"];

    /// The reason's place in [`LABELS`](Self::LABELS) (a counter's index).
    pub fn index(self) -> usize {
        match self {
            Refusal::Denied => 0,
            Refusal::PerSourceLimit => 1,
            Refusal::ProxyHeader(_) => 2,
        }
    }

    /// The reason as logged and counted: `denied`, `per_source_limit` or
    /// `proxy_header`.
    pub fn label(self) -> &'static str {
        Self::LABELS[self.index()]
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Denied => f.write_str("denied by the access rules"),
            Refusal::PerSourceLimit => f.write_str("per-source connection limit reached"),
            Refusal::ProxyHeader(why) => why.fmt(f),
        }
    }
}

/// Everything admission asks at accept, in the order that costs least: the
/// access rules (no lock), then the per-source table. `ip` is the client
/// address (from the PROXY header on PROXY listeners). Keep the permit for as
/// long as the connection lives.
pub fn admit(
    rules: &AccessRules,
    limits: &Arc<SourceLimits>,
    ip: IpAddr,
) -> Result<SourcePermit, Refusal> {
    if !rules.allows(ip) {
        return Err(Refusal::Denied);
    }
    limits.try_acquire(ip)
}

// ---------------------------------------------------------------------------
// Access rules
// ---------------------------------------------------------------------------

/// What a matching rule decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Accept the connection (`--allow`, config `{"allow": ...}`).
    Allow,
    /// Close it before reading anything (`--deny`, config `{"deny": ...}`).
    Deny,
}

/// Which client addresses a rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every address (`all`).
    All,
    /// One network, host bits zero. IPv4-mapped IPv6 networks are stored in
    /// their IPv4 form (see the module docs).
    Net(IpNet),
}

impl Scope {
    /// Whether the scope covers `ip`, which must already be canonical
    /// (mapped IPv6 turned into IPv4).
    fn contains(&self, ip: &IpAddr) -> bool {
        match self {
            Scope::All => true,
            Scope::Net(net) => net.contains(ip),
        }
    }
}

impl fmt::Display for Scope {
    /// As the operator would write it: `all`, `10.0.0.0/8`, `::1/128`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::All => f.write_str("all"),
            Scope::Net(net) => write!(f, "{net}"),
        }
    }
}

/// One `allow` or `deny` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    /// What happens when the scope matches.
    pub action: Action,
    /// The addresses it covers.
    pub scope: Scope,
}

impl fmt::Display for Rule {
    /// `allow 10.0.0.0/8`, `deny all`: nginx's spelling.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
        };
        write!(f, "{action} {}", self.scope)
    }
}

/// Parses a rule's scope: `all`, an address (`127.0.0.1`, `::1`, `[::1]`) or
/// a CIDR (`10.0.0.0/8`, `2001:db8::/32`, `[2001:db8::]/32`). A CIDR with host
/// bits set is refused, naming the network meant; mapped IPv6 is turned into
/// IPv4. The error is one line naming the bad text.
pub fn parse_scope(s: &str) -> Result<Scope, String> {
    if s == "all" {
        return Ok(Scope::All);
    }
    let (addr_text, prefix_text) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let bracketed = addr_text
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'));
    let (addr_text, must_be_v6) = match bracketed {
        Some(inner) => (inner, true),
        None => (addr_text, false),
    };
    let addr: IpAddr = addr_text
        .parse()
        .map_err(|_| format!("'{s}' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'"))?;
    if must_be_v6 && addr.is_ipv4() {
        return Err(format!(
            "'{s}': brackets are for IPv6 addresses; write IPv4 without them"
        ));
    }
    let max = match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    let prefix = match prefix_text {
        None => max,
        Some(p) => parse_prefix(p, max).map_err(|why| format!("'{s}': {why}"))?,
    };
    let net = IpNet::new(addr, prefix).map_err(|_| format!("'{s}': bad prefix length"))?;
    if net.trunc() != net {
        return Err(format!(
            "'{s}' has host bits set: write {} (or /{max} for one address)",
            net.trunc()
        ));
    }
    Ok(Scope::Net(canonical_net(net)))
}

/// The prefix length after a `/`: decimal digits only, at most `max`.
fn parse_prefix(p: &str, max: u8) -> Result<u8, String> {
    if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("prefix length '{p}' is not a number in 0-{max}"));
    }
    match p.parse::<u8>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(format!("prefix length '{p}' is not a number in 0-{max}")),
    }
}

/// `::ffff:a.b.c.d/n` with `n ≥ 96` as `a.b.c.d/(n − 96)`; anything else as is.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
        && let Ok(v4net) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(v4net);
    }
    net
}

/// An ordered list of rules: first match decides, no match allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessRules {
    /// In the order given on the command line or in the config.
    rules: Vec<Rule>,
}

impl AccessRules {
    /// The rules, in the order they are checked.
    pub fn new(rules: Vec<Rule>) -> Self {
        AccessRules { rules }
    }

    /// Whether a connection from `ip` may be accepted. Mapped IPv6 is
    /// checked as IPv4.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match self.rules.iter().find(|r| r.scope.contains(&ip)) {
            Some(rule) => rule.action == Action::Allow,
            None => true,
        }
    }

    /// No rules: every address is allowed and the core may skip the check.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules, in order (for `--check` and the start-up log).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// `--proxy-from A --proxy-from B` as rules: allow A, allow B, deny all;
    /// `None` (no scope given) = any peer may send headers.
    pub fn trusted_proxies(scopes: &[Scope]) -> Option<AccessRules> {
        (!scopes.is_empty()).then(|| {
            let allow = scopes.iter().map(|&scope| Rule {
                action: Action::Allow,
                scope,
            });
            let deny_rest = std::iter::once(Rule {
                action: Action::Deny,
                scope: Scope::All,
            });
            AccessRules::new(allow.chain(deny_rest).collect())
        })
    }
}

// ---------------------------------------------------------------------------
// Per-source limit
// ---------------------------------------------------------------------------

/// What the per-source limit counts by: an IPv4 address, or the /64 an IPv6
/// address belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    /// An IPv4 source (including IPv4-mapped IPv6).
    V4(Ipv4Addr),
    /// The first 64 bits of an IPv6 source.
    V6Prefix(u64),
}

impl SourceKey {
    /// The key `ip` is counted under.
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => SourceKey::V4(v4),
            IpAddr::V6(v6) => SourceKey::V6Prefix((v6.to_bits() >> 64) as u64),
        }
    }
}

impl fmt::Display for SourceKey {
    /// `10.1.2.3` or `2001:db8:1:2::/64`, for DEBUG lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceKey::V4(v4) => write!(f, "{v4}"),
            SourceKey::V6Prefix(p) => {
                write!(f, "{}/64", Ipv6Addr::from_bits(u128::from(*p) << 64))
            }
        }
    }
}

/// Open connections per source over all workers, shared as an `Arc`.
#[derive(Debug)]
pub struct SourceLimits {
    /// Connections allowed per source; 0 = no limit. Read without the lock.
    limit: AtomicUsize,
    /// Open connections per key; never holds a zero count.
    counts: Mutex<HashMap<SourceKey, usize>>,
}

impl SourceLimits {
    /// A table allowing `limit` connections per source (0 = no limit).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(SourceLimits {
            limit: AtomicUsize::new(limit),
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// The limit for connections accepted from now on (a reload).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// The current limit; 0 = none.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Counts one more connection from `ip`, or refuses it when its source
    /// already holds `limit`. With limit 0 no lock is taken and the permit
    /// does nothing.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<SourcePermit, Refusal> {
        let limit = self.limit();
        if limit == 0 {
            return Ok(SourcePermit { held: None });
        }
        let key = SourceKey::of(ip);
        let mut counts = self.lock();
        // A fresh entry starts at 0 and, as `limit ≥ 1`, is always counted
        // up to 1 here: no zero entry survives the lock.
        let count = counts.entry(key).or_insert(0);
        if *count >= limit {
            return Err(Refusal::PerSourceLimit);
        }
        *count += 1;
        Ok(SourcePermit {
            held: Some((Arc::clone(self), key)),
        })
    }

    /// Open connections counted for `ip`'s source (0 when untracked).
    pub fn count(&self, ip: IpAddr) -> usize {
        self.lock().get(&SourceKey::of(ip)).copied().unwrap_or(0)
    }

    /// Entries in the table: sources with at least one counted connection.
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    /// The table. No code panics while holding it, but a poisoned lock would
    /// still hold consistent counts, so it is used rather than propagated.
    fn lock(&self) -> MutexGuard<'_, HashMap<SourceKey, usize>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Uncounts one connection of `key`, removing the entry at 0.
    fn release(&self, key: &SourceKey) {
        let mut counts = self.lock();
        if let Some(count) = counts.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(key);
            }
        }
    }
}

/// One counted connection; dropping it uncounts it. Owned by the connection,
/// so every way a connection ends releases its count exactly once.
#[must_use = "dropping the permit releases the connection's count at once"]
#[derive(Debug)]
pub struct SourcePermit {
    /// The table and key to release, or `None` for a permit taken at limit 0.
    held: Option<(Arc<SourceLimits>, SourceKey)>,
}

impl SourcePermit {
    /// The key this permit counts under, if it counts at all.
    pub fn key(&self) -> Option<SourceKey> {
        self.held.as_ref().map(|(_, k)| *k)
    }
}

impl Drop for SourcePermit {
    fn drop(&mut self) {
        if let Some((limits, key)) = self.held.take() {
            limits.release(&key);
        }
    }
}

// ---------------------------------------------------------------------------
// Global buffer budget
// ---------------------------------------------------------------------------

/// The per-connection share never falls below this while rationing: a
/// connection holding less is always read (module docs, "The rule").
pub const MIN_SHARE: usize = 64 * 1024;

/// What one connection holds, as "The rule" asks it: its bytes in all, the
/// part of them that is its unterminated line, and its `--max-line` (a
/// reload changes that for new connections only, so each one brings its
/// own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    /// Every byte held for it: unsent replies, its unterminated line, an
    /// incomplete PROXY header.
    pub bytes: usize,
    /// Of which its unterminated line.
    pub line: usize,
    /// The length past which its line is cut into a segment reply.
    pub max_line: usize,
}

/// "The rule" for one connection while rationing, with `share` the share:
/// how many bytes it may read in this pass (0 = paused).
fn ration(share: usize, h: Holding) -> usize {
    if h.bytes < share {
        share - h.bytes
    } else if h.bytes == h.line {
        // Nothing but its line: only reading on can complete it (or cut it,
        // once more than `max_line` bytes are held), so read on that far.
        (h.max_line + 1).saturating_sub(h.line)
    } else {
        0 // replies wait: they must drain first
    }
}

/// SPEC §6's default `--max-buffered`: 256 MiB.
pub const DEFAULT_MAX_BUFFERED: usize = 256 << 20;

/// One worker's published total, alone on its cache-line pair.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Slot(AtomicUsize);

/// The bytes held for clients over all workers, and the read policy when
/// they pass the bound. Shared as an `Arc`; each worker writes only its slot.
#[derive(Debug)]
pub struct BufferBudget {
    /// `--max-buffered`; 0 = no bound.
    limit: AtomicUsize,
    /// Each worker's last published total, indexed by worker number.
    slots: Box<[Slot]>,
}

impl BufferBudget {
    /// A budget of `limit` bytes (0 = off) for `workers` workers, numbered
    /// from 0.
    pub fn new(limit: usize, workers: usize) -> Arc<Self> {
        Arc::new(BufferBudget {
            limit: AtomicUsize::new(limit),
            slots: (0..workers).map(|_| Slot::default()).collect(),
        })
    }

    /// Changes the bound (a reload); applies from each worker's next turn.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// The bound; 0 = off.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Where rationing starts: ¾ of the limit (0 when off).
    pub fn pause_mark(&self) -> usize {
        pause_mark(self.limit())
    }

    /// Records that `worker` holds `held` bytes. Call once per loop turn; a
    /// worker number out of range is ignored.
    pub fn publish(&self, worker: usize, held: usize) {
        if let Some(slot) = self.slots.get(worker) {
            slot.0.store(held, Ordering::Relaxed);
        }
    }

    /// The sum of the published totals.
    pub fn total(&self) -> usize {
        self.slots.iter().fold(0usize, |sum, s| {
            sum.saturating_add(s.0.load(Ordering::Relaxed))
        })
    }

    /// Whether reads are being rationed: the total is past the pause mark.
    /// Always false when the budget is off.
    pub fn over(&self) -> bool {
        let limit = self.limit();
        limit != 0 && self.total() > pause_mark(limit)
    }

    /// The read policy for this loop turn, with `open_connections` open over
    /// the server (a worker that knows only its own count may pass
    /// `own × workers`). Take it once per turn and ask it per read pass.
    pub fn gate(&self, open_connections: usize) -> ReadGate {
        let limit = self.limit();
        if limit == 0 || self.total() <= pause_mark(limit) {
            return ReadGate::Open;
        }
        ReadGate::Rationed {
            share: share(limit, open_connections),
        }
    }

    /// While over the bound, may a connection holding `held` be read?
    /// `self.gate(open_connections).may_read(held)`: sums the slots on each
    /// call, so prefer one [`gate`](Self::gate) per turn.
    pub fn may_read(&self, held: Holding, open_connections: usize) -> bool {
        self.gate(open_connections).may_read(held)
    }
}

impl BufferBudget {
    /// Worker `worker`'s view for one loop turn: the other workers'
    /// published totals and the rule, with `open_connections` open over the
    /// server. Unlike [`gate`](Self::gate), the view leaves out the worker's
    /// own slot: the worker adds its own exact, live total at every pass
    /// ([`BudgetView::allowance`]), so its own reads are never one turn
    /// stale — only the other workers' growth during the turn is unseen.
    pub fn view(&self, worker: usize, open_connections: usize) -> BudgetView {
        let limit = self.limit();
        if limit == 0 {
            return BudgetView::OFF;
        }
        let own = self
            .slots
            .get(worker)
            .map_or(0, |s| s.0.load(Ordering::Relaxed));
        BudgetView {
            limit,
            others: self.total().saturating_sub(own),
            share: share(limit, open_connections),
            workers: self.slots.len().max(1),
        }
    }
}

/// One worker's budget for a loop turn (see [`BufferBudget::view`]): plain
/// numbers, so asking it per read pass costs no atomics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetView {
    /// `--max-buffered`; 0 = off.
    limit: usize,
    /// What the other workers published at the start of the turn.
    others: usize,
    /// Each connection's share while rationing ("The rule").
    share: usize,
    /// Workers sharing the budget: each may take this fraction of the room
    /// left under the pause mark in one pass, since none sees the others'
    /// growth until they publish.
    workers: usize,
}

impl BudgetView {
    /// No bound: every allowance is unlimited.
    pub const OFF: BudgetView = BudgetView {
        limit: 0,
        others: 0,
        share: 0,
        workers: 1,
    };

    /// How many bytes a connection holding `held` may read in this pass,
    /// when this worker holds `own` bytes in all (exactly, now): what "The
    /// rule" allows whatever the total (up to its share, or on to the end of
    /// its line: a well-behaved client is never paused), and beyond it only
    /// while the total stays under the pause mark (a worker's part of the
    /// room left there). 0 means "not now": the core looks again when the
    /// total or the connection's holding falls. `usize::MAX` when the
    /// budget is off.
    ///
    /// Capping each `recv()` at this makes `C = 0` and the exact own total
    /// removes this worker's `G` from "The bound": the total stays under
    /// `L + n · F`, plus what the other workers read in one turn.
    pub fn allowance(&self, own: usize, held: Holding) -> usize {
        if self.limit == 0 {
            return usize::MAX;
        }
        let total = self.others.saturating_add(own);
        let mark = pause_mark(self.limit);
        let by_rule = ration(self.share, held);
        match mark.checked_sub(total) {
            Some(room) if room > 0 => (room / self.workers).max(by_rule),
            _ => by_rule,
        }
    }

    /// Whether the budget is off.
    pub fn is_off(&self) -> bool {
        self.limit == 0
    }
}

/// `limit − limit/4`.
fn pause_mark(limit: usize) -> usize {
    limit - limit / 4
}

/// `max(limit / (4·open), MIN_SHARE)`; `open` of 0 counts as 1.
fn share(limit: usize, open: usize) -> usize {
    (limit / 4 / open.max(1)).max(MIN_SHARE)
}

/// One loop turn's read policy: a snapshot, so asking costs no atomics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadGate {
    /// Under the pause mark (or the budget is off): read as usual.
    Open,
    /// Past the pause mark: only connections holding less than `share`
    /// bytes are read, and at most up to `share`, or those holding nothing
    /// but their line, up to its end ("The rule").
    Rationed {
        /// Bytes a connection may hold and still be read this turn.
        share: usize,
    },
}

impl ReadGate {
    /// Whether a connection holding `held` may be read this pass.
    pub fn may_read(&self, held: Holding) -> bool {
        self.allowance(held) > 0
    }

    /// How many bytes a connection holding `held` may read this pass:
    /// `usize::MAX` when open (the connection's own read budget applies), 0
    /// when paused. Capping the pass at this keeps the bound tight (module
    /// docs, "The bound").
    pub fn allowance(&self, held: Holding) -> usize {
        match *self {
            ReadGate::Open => usize::MAX,
            ReadGate::Rationed { share } => ration(share, held),
        }
    }

    /// Whether reads are being rationed this turn.
    pub fn is_rationed(&self) -> bool {
        matches!(self, ReadGate::Rationed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rule(action: Action, scope: &str) -> Rule {
        Rule {
            action,
            scope: parse_scope(scope).unwrap(),
        }
    }

    fn net(s: &str) -> Scope {
        Scope::Net(s.parse().unwrap())
    }

    // --- BudgetView -----------------------------------------------------------

    /// The default `--max-line`.
    const M: usize = 100_000;

    /// A connection holding `bytes` of unsent replies and no line.
    fn replies(bytes: usize) -> Holding {
        Holding {
            bytes,
            line: 0,
            max_line: M,
        }
    }

    /// A connection holding nothing but a line of `line` bytes.
    fn line_only(line: usize) -> Holding {
        Holding {
            bytes: line,
            line,
            max_line: M,
        }
    }

    #[test]
    fn a_view_is_unlimited_when_off() {
        let b = BufferBudget::new(0, 2);
        b.publish(1, 1 << 40);
        let v = b.view(0, 10);
        assert!(v.is_off());
        assert_eq!(v.allowance(1 << 40, replies(1 << 30)), usize::MAX);
    }

    #[test]
    fn a_view_counts_the_others_and_lets_the_worker_add_its_own() {
        let limit = 4 << 20; // pause mark 3 MiB
        let b = BufferBudget::new(limit, 2);
        b.publish(0, 123_456); // our own stale slot: ignored by the view
        b.publish(1, 1 << 20);
        let v = b.view(0, 4);
        // share = max(4 MiB / 16, 64 KiB) = 256 KiB.
        // Under the mark: half (two workers) of the room left, or the share.
        assert_eq!(v.allowance(0, replies(0)), (2 << 20) / 2);
        assert_eq!(v.allowance((2 << 20) - 1000, replies(0)), 256 << 10);
        assert_eq!(
            v.allowance((2 << 20) - 1000, replies(200 << 10)),
            (256 - 200) << 10
        );
        // At or past the mark: only the share.
        assert_eq!(v.allowance(2 << 20, replies(10)), (256 << 10) - 10);
        assert_eq!(v.allowance(2 << 20, replies(256 << 10)), 0);
        assert_eq!(v.allowance(usize::MAX, replies(0)), 256 << 10);
    }

    #[test]
    fn a_connection_holding_only_its_line_is_read_to_its_end() {
        // Issue 13: 12 clients with 80 000-byte lines under a 1 MB bound were
        // paused at the 64 KiB share with their LF unread, for good.
        let b = BufferBudget::new(1_000_000, 1);
        b.publish(0, 0);
        let v = b.view(0, 12); // share = max(20 833, 64 KiB) = 64 KiB
        let own = 960_000; // past the pause mark (750 000)
        assert_eq!(v.allowance(own, line_only(80_000)), M + 1 - 80_000);
        // Under the share, the share decides (a second pass reads on).
        assert_eq!(v.allowance(own, line_only(60_000)), MIN_SHARE - 60_000);
        // Whatever the share and the line, such a connection may read
        // enough to complete its line or have it cut (more than M held).
        for n in [1, 12, 1000, 100_000] {
            let v = b.view(0, n);
            for line in [0, 1, MIN_SHARE - 1, MIN_SHARE, 80_000, M - 1, M] {
                let allow = v.allowance(usize::MAX, line_only(line));
                assert!(allow >= 1, "n={n} line={line}");
                assert!(
                    line < MIN_SHARE || allow >= M + 1 - line,
                    "n={n} line={line}: {allow}"
                );
            }
        }
        // With replies waiting it is paused at the share, line or not:
        // its client must read them first.
        let mixed = Holding {
            bytes: 80_001,
            line: 80_000,
            max_line: M,
        };
        assert_eq!(v.allowance(own, mixed), 0);
        assert_eq!(v.allowance(own, replies(MIN_SHARE)), 0);
        // Each connection brings its own --max-line (a reload changes it
        // for new connections only).
        let short = Holding {
            bytes: 70_000,
            line: 70_000,
            max_line: 70_000,
        };
        assert_eq!(v.allowance(own, short), 1);
    }

    /// What a client that never reads makes the server hold, in the
    /// simulations: the protocol's arithmetic, not the protocol.
    #[derive(Debug, Clone, Copy)]
    enum Sends {
        /// Lines of this many bytes before their LF (at most `M`).
        Lines(usize),
        /// Never a LF: the line is cut every `M` bytes.
        NoLf,
    }

    #[derive(Debug, Clone, Copy)]
    struct Client {
        sends: Sends,
        /// The kernel takes every reply (the server holds none): the line
        /// rule's worst case. Otherwise every reply stays held.
        kernel_takes: bool,
        line: usize,
        replies: usize,
    }

    impl Client {
        fn new(sends: Sends, kernel_takes: bool) -> Client {
            Client {
                sends,
                kernel_takes,
                line: 0,
                replies: 0,
            }
        }

        fn holding(&self) -> Holding {
            Holding {
                bytes: self.held(),
                line: self.line,
                max_line: M,
            }
        }

        fn held(&self) -> usize {
            self.line + self.replies
        }

        /// The server reads `k` more bytes.
        fn read(&mut self, k: usize) {
            let total = self.line + k;
            self.line = match self.sends {
                Sends::Lines(len) => total % (len + 1),
                // A segment of M is cut each time more than M are held.
                Sends::NoLf if total > M => total - (total - 1) / M * M,
                Sends::NoLf => total,
            };
            if !self.kernel_takes {
                self.replies += total - self.line;
            }
        }
    }

    /// Every kind of client that never reads, alone and mixed: short
    /// lines, lines just under `--max-line`, no LF at all; replies held or
    /// taken by the kernel. Each mix is named, and says whether all of its
    /// clients hold their replies.
    fn flood_mixes(n: usize) -> Vec<(String, bool, Vec<Client>)> {
        let kinds = [Sends::Lines(61), Sends::Lines(M - 1), Sends::NoLf];
        let mut mixes = Vec::new();
        for kernel_takes in [false, true] {
            for sends in kinds {
                let name = format!("{sends:?}, kernel takes replies: {kernel_takes}");
                mixes.push((
                    name,
                    !kernel_takes,
                    vec![Client::new(sends, kernel_takes); n],
                ));
            }
        }
        let mixed = (0..n)
            .map(|i| Client::new(kinds[i % 3], i % 2 == 0))
            .collect();
        mixes.push(("mixed".to_string(), false, mixed));
        mixes
    }

    /// F of "The bound": the most a rationed connection may hold.
    const F: usize = if MIN_SHARE > M + 1 { MIN_SHARE } else { M + 1 };

    #[test]
    fn simulated_flood_with_views_stays_under_the_tight_bound() {
        // One worker, n clients that never read, each with unlimited data:
        // read passes capped at the allowance and at the read budget, exact
        // own total. The total never passes L + n·F.
        for n in [1usize, 10, 100, 1000] {
            for (mix, held, mut clients) in flood_mixes(n) {
                let limit = 64 << 20;
                let b = BufferBudget::new(limit, 1);
                let mut own = 0usize;
                let mut peak = 0;
                for _turn in 0..200 {
                    let v = b.view(0, n);
                    for c in clients.iter_mut() {
                        let got = v.allowance(own, c.holding()).min(256 << 10);
                        let before = c.held();
                        c.read(got);
                        own = own - before + c.held();
                        peak = peak.max(own);
                    }
                    b.publish(0, own);
                }
                assert!(peak <= limit + n * F, "n={n} {mix}: {peak}");
                if n == 1000 && held {
                    assert!(b.over(), "{mix}: the flood never reached the bound");
                }
            }
        }
    }

    // --- parse_scope --------------------------------------------------------

    #[test]
    fn parses_all_addresses_and_cidrs() {
        assert_eq!(parse_scope("all"), Ok(Scope::All));
        assert_eq!(parse_scope("10.0.0.0/8"), Ok(net("10.0.0.0/8")));
        assert_eq!(parse_scope("127.0.0.1"), Ok(net("127.0.0.1/32")));
        assert_eq!(parse_scope("0.0.0.0/0"), Ok(net("0.0.0.0/0")));
        assert_eq!(parse_scope("::1"), Ok(net("::1/128")));
        assert_eq!(parse_scope("[::1]"), Ok(net("::1/128")));
        assert_eq!(parse_scope("2001:db8::/32"), Ok(net("2001:db8::/32")));
        assert_eq!(parse_scope("[2001:db8::]/32"), Ok(net("2001:db8::/32")));
        assert_eq!(parse_scope("::/0"), Ok(net("::/0")));
        assert_eq!(parse_scope("10.0.0.0/08"), Ok(net("10.0.0.0/8")));
    }

    #[test]
    fn mapped_rules_become_ipv4() {
        assert_eq!(parse_scope("::ffff:10.1.2.3"), Ok(net("10.1.2.3/32")));
        assert_eq!(parse_scope("::ffff:10.0.0.0/104"), Ok(net("10.0.0.0/8")));
        assert_eq!(parse_scope("::ffff:0:0/96"), Ok(net("0.0.0.0/0")));
        // Wider than the mapped range: stays an IPv6 network.
        assert_eq!(parse_scope("::/64"), Ok(net("::/64")));
    }

    #[test]
    fn parse_errors_name_the_text() {
        let cases = [
            (
                "",
                "'' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'",
            ),
            (
                "ALL",
                "'ALL' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'",
            ),
            (
                "10.0.0",
                "'10.0.0' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'",
            ),
            (
                "localhost",
                "'localhost' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'",
            ),
            (
                " 10.0.0.1",
                "' 10.0.0.1' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'",
            ),
            (
                "010.0.0.1",
                "'010.0.0.1' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'",
            ),
            (
                "10.0.0.0/33",
                "'10.0.0.0/33': prefix length '33' is not a number in 0-32",
            ),
            (
                "::/129",
                "'::/129': prefix length '129' is not a number in 0-128",
            ),
            (
                "10.0.0.0/",
                "'10.0.0.0/': prefix length '' is not a number in 0-32",
            ),
            (
                "10.0.0.0/+8",
                "'10.0.0.0/+8': prefix length '+8' is not a number in 0-32",
            ),
            (
                "10.0.0.0/8/8",
                "'10.0.0.0/8/8': prefix length '8/8' is not a number in 0-32",
            ),
            (
                "10.0.0.0/0008",
                "'10.0.0.0/0008': prefix length '0008' is not a number in 0-32",
            ),
            (
                "/8",
                "'/8' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'",
            ),
            (
                "[10.0.0.1]",
                "'[10.0.0.1]': brackets are for IPv6 addresses; write IPv4 without them",
            ),
            (
                "[::1",
                "'[::1' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'",
            ),
            (
                "10.1.2.3/8",
                "'10.1.2.3/8' has host bits set: write 10.0.0.0/8 (or /32 for one address)",
            ),
            (
                "2001:db8::1/32",
                "'2001:db8::1/32' has host bits set: write 2001:db8::/32 (or /128 for one address)",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_scope(text), Err(want.to_string()), "{text:?}");
        }
    }

    // --- AccessRules --------------------------------------------------------

    #[test]
    fn no_rules_allow_everything() {
        let rules = AccessRules::new(vec![]);
        assert!(rules.is_empty());
        assert!(rules.allows(ip("127.0.0.1")));
        assert!(rules.allows(ip("::1")));
    }

    #[test]
    fn first_match_decides() {
        let rules = AccessRules::new(vec![
            rule(Action::Allow, "127.0.0.1"),
            rule(Action::Deny, "all"),
        ]);
        assert!(!rules.is_empty());
        assert!(rules.allows(ip("127.0.0.1")));
        assert!(!rules.allows(ip("127.0.0.2")));
        assert!(!rules.allows(ip("::1")));

        // The same rules the other way round deny everyone.
        let reversed = AccessRules::new(vec![
            rule(Action::Deny, "all"),
            rule(Action::Allow, "127.0.0.1"),
        ]);
        assert!(!reversed.allows(ip("127.0.0.1")));
    }

    #[test]
    fn no_match_allows() {
        let rules = AccessRules::new(vec![rule(Action::Deny, "127.0.0.0/8")]);
        assert!(!rules.allows(ip("127.0.0.1")));
        assert!(!rules.allows(ip("127.255.255.255")));
        assert!(rules.allows(ip("128.0.0.1")));
        assert!(rules.allows(ip("::1")));
    }

    #[test]
    fn deny_all_covers_ipv6() {
        let rules = AccessRules::new(vec![rule(Action::Deny, "all")]);
        assert!(!rules.allows(ip("::1")));
        assert!(!rules.allows(ip("2001:db8::1")));
        assert!(!rules.allows(ip("10.0.0.1")));
        let v6 = AccessRules::new(vec![rule(Action::Deny, "::1")]);
        assert!(!v6.allows(ip("::1")));
        assert!(v6.allows(ip("127.0.0.1")));
    }

    #[test]
    fn mapped_addresses_match_ipv4_rules() {
        let rules = AccessRules::new(vec![
            rule(Action::Allow, "10.0.0.0/8"),
            rule(Action::Deny, "all"),
        ]);
        assert!(rules.allows(ip("::ffff:10.1.2.3")));
        assert!(!rules.allows(ip("::ffff:11.1.2.3")));
        let deny = AccessRules::new(vec![rule(Action::Deny, "127.0.0.1")]);
        assert!(!deny.allows(ip("::ffff:127.0.0.1")));
        // A rule in mapped form matches plain IPv4 too.
        let mapped = AccessRules::new(vec![rule(Action::Deny, "::ffff:10.0.0.0/104")]);
        assert!(!mapped.allows(ip("10.9.9.9")));
        assert!(!mapped.allows(ip("::ffff:10.9.9.9")));
        // An IPv6 rule covers native IPv6 only, as in nginx.
        let v6all = AccessRules::new(vec![rule(Action::Deny, "::/0")]);
        assert!(!v6all.allows(ip("::1")));
        assert!(v6all.allows(ip("::ffff:10.1.2.3")));
    }

    #[test]
    fn rules_display_as_written() {
        let r = [
            rule(Action::Allow, "10.0.0.0/8"),
            rule(Action::Deny, "all"),
            rule(Action::Deny, "[::1]"),
        ];
        let text: Vec<String> = r.iter().map(|r| r.to_string()).collect();
        assert_eq!(text, ["allow 10.0.0.0/8", "deny all", "deny ::1/128"]);
    }

    #[test]
    fn refusal_labels() {
        assert_eq!(Refusal::Denied.label(), "denied");
        assert_eq!(Refusal::PerSourceLimit.label(), "per_source_limit");
        assert_eq!(
            Refusal::PerSourceLimit.to_string(),
            "per-source connection limit reached"
        );
    }

    #[test]
    fn admit_checks_rules_then_limit() {
        let rules = AccessRules::new(vec![rule(Action::Deny, "10.0.0.0/8")]);
        let limits = SourceLimits::new(1);
        assert_eq!(
            admit(&rules, &limits, ip("10.0.0.1")).unwrap_err(),
            Refusal::Denied
        );
        assert_eq!(limits.tracked(), 0, "a denied address takes no count");
        let p = admit(&rules, &limits, ip("127.0.0.1")).unwrap();
        assert_eq!(
            admit(&rules, &limits, ip("127.0.0.1")).unwrap_err(),
            Refusal::PerSourceLimit
        );
        drop(p);
        assert_eq!(limits.tracked(), 0);
    }

    // --- SourceLimits -------------------------------------------------------

    #[test]
    fn limit_reached_and_released_on_drop() {
        let limits = SourceLimits::new(2);
        let a = limits.try_acquire(ip("10.0.0.1")).unwrap();
        let b = limits.try_acquire(ip("10.0.0.1")).unwrap();
        assert_eq!(
            limits.try_acquire(ip("10.0.0.1")).unwrap_err(),
            Refusal::PerSourceLimit
        );
        // Another source is counted apart.
        let c = limits.try_acquire(ip("10.0.0.2")).unwrap();
        assert_eq!(limits.count(ip("10.0.0.1")), 2);
        assert_eq!(limits.tracked(), 2);
        drop(a);
        assert_eq!(limits.count(ip("10.0.0.1")), 1);
        let a2 = limits.try_acquire(ip("10.0.0.1")).unwrap();
        drop((a2, b, c));
        assert_eq!(limits.tracked(), 0, "the table empties back to nothing");
        assert_eq!(limits.count(ip("10.0.0.1")), 0);
    }

    #[test]
    fn ipv6_is_grouped_by_64() {
        let limits = SourceLimits::new(2);
        let _a = limits.try_acquire(ip("2001:db8:1:2::1")).unwrap();
        let _b = limits
            .try_acquire(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
            .unwrap();
        assert_eq!(
            limits.try_acquire(ip("2001:db8:1:2:abcd::9")).unwrap_err(),
            Refusal::PerSourceLimit
        );
        // The neighbouring /64 is another source.
        let _c = limits.try_acquire(ip("2001:db8:1:3::1")).unwrap();
        assert_eq!(limits.tracked(), 2);
        assert_eq!(
            SourceKey::of(ip("2001:db8:1:2::1")).to_string(),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn mapped_ipv6_counts_as_ipv4() {
        let limits = SourceLimits::new(1);
        let _a = limits.try_acquire(ip("10.0.0.1")).unwrap();
        assert_eq!(
            limits.try_acquire(ip("::ffff:10.0.0.1")).unwrap_err(),
            Refusal::PerSourceLimit
        );
        assert_eq!(SourceKey::of(ip("::ffff:10.0.0.1")).to_string(), "10.0.0.1");
    }

    #[test]
    fn limit_zero_takes_no_count() {
        let limits = SourceLimits::new(0);
        let permits: Vec<_> = (0..100)
            .map(|_| limits.try_acquire(ip("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(limits.tracked(), 0);
        assert!(permits.iter().all(|p| p.key().is_none()));
    }

    #[test]
    fn reload_changes_the_limit_for_new_connections() {
        let limits = SourceLimits::new(3);
        let held: Vec<_> = (0..3)
            .map(|_| limits.try_acquire(ip("10.0.0.1")).unwrap())
            .collect();
        limits.set_limit(1);
        assert_eq!(limits.limit(), 1);
        assert!(limits.try_acquire(ip("10.0.0.1")).is_err());
        assert_eq!(limits.count(ip("10.0.0.1")), 3, "nobody is closed");
        drop(held);
        assert_eq!(limits.tracked(), 0);
        // Permits taken at limit 0 stay uncounted after raising it.
        limits.set_limit(0);
        let free = limits.try_acquire(ip("10.0.0.1")).unwrap();
        limits.set_limit(1);
        let counted = limits.try_acquire(ip("10.0.0.1")).unwrap();
        drop(free);
        assert_eq!(limits.count(ip("10.0.0.1")), 1);
        drop(counted);
        assert_eq!(limits.tracked(), 0);
    }

    #[test]
    fn two_threads_acquire_and_release_back_to_zero() {
        let limits = SourceLimits::new(3);
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let limits = Arc::clone(&limits);
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    let mut refused = 0usize;
                    for i in 0..20_000usize {
                        let addr = if i % 3 == 0 {
                            "10.0.0.1"
                        } else {
                            "2001:db8::1"
                        };
                        match limits.try_acquire(ip(addr)) {
                            Ok(p) => held.push(p),
                            Err(_) => refused += 1,
                        }
                        if (i + t) % 2 == 0 {
                            drop(held.pop());
                        }
                        if held.len() > 4 {
                            drop(held.remove(0));
                        }
                        assert!(limits.count(ip(addr)) <= 3);
                    }
                    refused
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(limits.tracked(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Acquire(usize),
        Drop(usize),
    }

    const POOL: [&str; 5] = [
        "10.0.0.1",
        "::ffff:10.0.0.1",
        "10.0.0.2",
        "2001:db8::1",
        "2001:db8::2",
    ];

    proptest! {
        #[test]
        fn counts_match_live_permits(
            limit in 0usize..4,
            ops in proptest::collection::vec(
                prop_oneof![
                    (0..POOL.len()).prop_map(Op::Acquire),
                    any::<usize>().prop_map(Op::Drop),
                ],
                0..200,
            ),
        ) {
            let limits = SourceLimits::new(limit);
            let mut live: Vec<SourcePermit> = Vec::new();
            for op in ops {
                match op {
                    Op::Acquire(i) => {
                        let addr = ip(POOL[i]);
                        let before = limits.count(addr);
                        match limits.try_acquire(addr) {
                            Ok(p) => {
                                prop_assert!(limit == 0 || before < limit);
                                live.push(p);
                            }
                            Err(r) => {
                                prop_assert_eq!(r, Refusal::PerSourceLimit);
                                prop_assert!(limit != 0 && before >= limit);
                            }
                        }
                    }
                    Op::Drop(i) => {
                        if !live.is_empty() {
                            let i = i % live.len();
                            drop(live.swap_remove(i));
                        }
                    }
                }
                // The table is exactly the live permits, and never a zero.
                let mut want: HashMap<SourceKey, usize> = HashMap::new();
                for k in live.iter().filter_map(SourcePermit::key) {
                    *want.entry(k).or_insert(0) += 1;
                }
                let table = limits.lock().clone();
                prop_assert!(table.values().all(|&c| c > 0));
                prop_assert_eq!(table, want);
            }
            drop(live);
            prop_assert_eq!(limits.tracked(), 0);
        }
    }

    // --- BufferBudget -------------------------------------------------------

    const MIB: usize = 1 << 20;

    #[test]
    fn slots_are_padded() {
        assert_eq!(std::mem::align_of::<Slot>(), 128);
        assert_eq!(std::mem::size_of::<Slot>(), 128);
    }

    #[test]
    fn publish_and_total() {
        let b = BufferBudget::new(100 * MIB, 3);
        assert_eq!(b.total(), 0);
        b.publish(0, 10);
        b.publish(2, 5);
        assert_eq!(b.total(), 15);
        b.publish(0, 1);
        assert_eq!(b.total(), 6, "a publish replaces the worker's last value");
        b.publish(3, 1000); // out of range: ignored, no panic
        assert_eq!(b.total(), 6);
        b.publish(1, usize::MAX);
        assert_eq!(b.total(), usize::MAX, "the sum saturates");
    }

    #[test]
    fn over_starts_at_the_pause_mark() {
        let b = BufferBudget::new(100 * MIB, 2);
        assert_eq!(b.pause_mark(), 75 * MIB);
        b.publish(0, 40 * MIB);
        b.publish(1, 35 * MIB);
        assert!(!b.over());
        assert_eq!(b.gate(10), ReadGate::Open);
        b.publish(1, 35 * MIB + 1);
        assert!(b.over());
        assert!(b.gate(10).is_rationed());
        b.publish(0, 0);
        assert!(!b.over(), "rationing ends when the total falls back");
    }

    #[test]
    fn off_budget_never_rations() {
        let b = BufferBudget::new(0, 1);
        b.publish(0, usize::MAX);
        assert!(!b.over());
        assert!(b.may_read(replies(usize::MAX), 1));
        assert_eq!(b.gate(1).allowance(replies(123)), usize::MAX);
    }

    #[test]
    fn may_read_pauses_the_heavy_and_keeps_the_light() {
        let b = BufferBudget::new(100 * MIB, 1);
        b.publish(0, 90 * MIB);
        // 100 open: share = max(100 MiB / 400, 64 KiB) = 256 KiB.
        assert_eq!(b.gate(100), ReadGate::Rationed { share: 256 * 1024 });
        assert!(b.may_read(replies(0), 100));
        assert!(b.may_read(replies(256 * 1024 - 1), 100));
        assert!(!b.may_read(replies(256 * 1024), 100));
        assert!(!b.may_read(replies(MIB), 100));
        // 100 000 open: the share floors at 64 KiB; a client holding a
        // short line is still read, and so is one holding a long line.
        assert_eq!(b.gate(100_000), ReadGate::Rationed { share: MIN_SHARE });
        assert!(b.may_read(line_only(100), 100_000));
        assert!(b.may_read(line_only(M), 100_000));
        assert!(!b.may_read(replies(MIN_SHARE), 100_000));
        // 0 open counts as 1.
        assert_eq!(b.gate(0), ReadGate::Rationed { share: 25 * MIB });
        // Under the mark, even a heavy connection is read.
        b.publish(0, 10 * MIB);
        assert!(b.may_read(replies(10 * MIB), 100));
    }

    #[test]
    fn allowance_caps_a_rationed_pass() {
        let g = ReadGate::Rationed { share: 1000 };
        assert_eq!(g.allowance(replies(0)), 1000);
        assert_eq!(g.allowance(replies(900)), 100);
        assert_eq!(g.allowance(replies(1000)), 0);
        assert_eq!(g.allowance(replies(5000)), 0);
        assert!(!g.may_read(replies(1000)));
        // A line past the share is read on to its end, no further.
        assert_eq!(g.allowance(line_only(5000)), M + 1 - 5000);
        assert_eq!(g.allowance(line_only(M)), 1);
        assert_eq!(ReadGate::Open.allowance(replies(5000)), usize::MAX);
        assert!(ReadGate::Open.may_read(replies(usize::MAX)));
    }

    #[test]
    fn reload_changes_the_budget() {
        let b = BufferBudget::new(100 * MIB, 1);
        b.publish(0, 80 * MIB);
        assert!(b.over());
        b.set_limit(200 * MIB);
        assert_eq!(b.limit(), 200 * MIB);
        assert!(!b.over());
        b.set_limit(0);
        assert!(!b.over());
    }

    /// A simulation of the bound: `n` clients that never read, each driven
    /// once per turn with the gate's allowance (plus a whole `recv()` of
    /// overshoot), one worker publishing once per turn. The total never
    /// passes `L + n·(G + C + F)`.
    #[test]
    fn simulated_flood_stays_under_the_bound() {
        const G: usize = 320 * 1024;
        const C: usize = 64 * 1024;
        for n in [1usize, 10, 100, 1000] {
            for (mix, held, mut clients) in flood_mixes(n) {
                let limit = 64 * MIB;
                let b = BufferBudget::new(limit, 1);
                let bound = limit + n * (G + C + F);
                let mut peak = 0;
                for _ in 0..200 {
                    let gate = b.gate(n);
                    for c in clients.iter_mut() {
                        let allow = gate.allowance(c.holding());
                        if allow > 0 {
                            // Reads a whole pass, or the allowance rounded
                            // up to a full recv().
                            c.read(if allow == usize::MAX { G } else { allow + C });
                        }
                    }
                    let total: usize = clients.iter().map(Client::held).sum();
                    peak = peak.max(total);
                    b.publish(0, total);
                }
                assert!(peak <= bound, "n={n} {mix}: peak {peak} > bound {bound}");
                if n == 1000 && held {
                    assert!(b.over(), "{mix}: the flood never reached the bound");
                }
            }
        }
    }
}
