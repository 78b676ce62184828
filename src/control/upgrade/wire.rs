//! The hand-over format, written by hand: little-endian, every field in a
//! fixed order, lengths before bytes, nothing implicit.
//!
//! Why not serde with a binary format: this format crosses *binary
//! versions* — a new xps must read what an old one wrote — so every byte
//! must be where the code says, and a serde-derived layout moves silently
//! when a field or variant is added or reordered. Decoding checks every
//! length against the frame and every value against its range, and the
//! golden tests below pin the bytes.
//!
//! Two layers, two version numbers:
//! * the **envelope** ([`ENVELOPE`]), frozen: the frame header
//!   (`channel.rs`), [`Hello`] (which also lists the listening sockets),
//!   [`Ready`], [`Fail`], [`Commit`], `Accepting` and `Bye`. Every xps reads
//!   it, so a new binary always takes the listeners over;
//! * the **state** ([`STATE`]): [`Kind::Batch`] (moved connections) and
//!   [`Done`] (counters). The new process says which state versions it
//!   reads ([`Ready::reads`]); when it cannot read the old one's, the old
//!   process keeps its connections and finishes them as at shutdown.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::OwnedFd;
use std::time::Duration;

use crate::config::ListenAddr;
use crate::core::handover::Moved;
use crate::core::hooks::Carried;
use crate::core::timers::{LineSnapshot, TimersSnapshot};
use crate::network::connection::Snapshot;

/// The first bytes of [`Hello`].
pub const MAGIC: [u8; 8] = *b"XPSUPGRD";
/// The envelope's version (frozen: never changes).
pub const ENVELOPE: u16 = 1;
/// The state version this binary writes.
pub const STATE: u16 = 1;
/// The longest `--max-line` (the option's range).
const MAX_LINE: u32 = 1 << 30;
/// Unsent replies of one connection, at most (flow control keeps them
/// near 1 MiB).
const MAX_PENDING: u32 = 64 << 20;
/// A PROXY header's bytes so far, at most.
const MAX_PREFACE: u32 = 64 << 10;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Old → new, first: the listeners (envelope).
    Hello = 1,
    /// New → old: configuration loaded, listeners taken (envelope).
    Ready = 2,
    /// New → old: cannot take over, and why (envelope).
    Fail = 3,
    /// Old → new: start accepting (envelope).
    Commit = 4,
    /// Old → new: moved connections (state).
    Batch = 5,
    /// Old → new: everything is handed over; the counters (state).
    Done = 6,
    /// New → old: the pid file is ours; exit (envelope).
    Bye = 7,
    /// New → old: `Commit` received, its workers start: alive and
    /// accepting (envelope). Nothing leaves the old process before it.
    Accepting = 8,
}

impl Kind {
    /// The kind numbered `n`.
    pub fn of(n: u16) -> Option<Kind> {
        Some(match n {
            1 => Kind::Hello,
            2 => Kind::Ready,
            3 => Kind::Fail,
            4 => Kind::Commit,
            5 => Kind::Batch,
            6 => Kind::Done,
            7 => Kind::Bye,
            8 => Kind::Accepting,
            _ => return None,
        })
    }
}

/// Old → new: who is handing over, and the listening sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The state version the old process writes.
    pub state: u16,
    /// The old process's pid.
    pub pid: u32,
    /// Its workers (each listener has one socket per worker).
    pub workers: u16,
    /// Its listeners came from systemd (socket activation).
    pub activated: bool,
    /// Connections open when it began.
    pub connections: u64,
    /// Its listeners, in configuration order; the frame's descriptors are
    /// their sockets, listener by listener, then the metrics socket.
    pub listeners: Vec<Group>,
    /// Its metrics endpoint, if any.
    pub metrics: Option<Endpoint>,
}

/// One configured listener and how many sockets it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// As configured.
    pub addr: ListenAddr,
    /// Where its sockets are bound.
    pub bound: SocketAddr,
    /// How many of the frame's descriptors are its sockets.
    pub sockets: u16,
}

/// The metrics endpoint's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// As configured.
    pub addr: ListenAddr,
    /// Where it is bound.
    pub bound: SocketAddr,
}

/// New → old: ready to accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The new process's pid.
    pub pid: u32,
    /// The state versions it reads.
    pub reads: Vec<u16>,
}

/// Old → new: everything is handed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// Connections moved.
    pub handed_over: u64,
    /// Every `_total` series of the old process: (series as exposed, with
    /// its labels; value as exposed).
    pub counters: Vec<(String, String)>,
}

/// A malformed frame.
pub type DecodeError = String;

/// Bytes being written.
#[derive(Debug, Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A string of at most 64 KiB (longer ones are cut: names and reasons
    /// only).
    fn str(&mut self, s: &str) {
        let mut end = s.len().min(u16::MAX as usize);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16);
        self.0.extend_from_slice(&s.as_bytes()[..end]);
    }
    fn blob(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn addr(&mut self, a: Option<SocketAddr>) {
        match a {
            None => self.u8(0),
            Some(SocketAddr::V4(a)) => {
                self.u8(4);
                self.0.extend_from_slice(&a.ip().octets());
                self.u16(a.port());
            }
            Some(SocketAddr::V6(a)) => {
                self.u8(6);
                self.0.extend_from_slice(&a.ip().octets());
                self.u16(a.port());
                self.u32(a.scope_id());
            }
        }
    }
    fn listen_addr(&mut self, a: &ListenAddr) {
        self.str(&a.host);
        self.u16(a.port);
        self.u8(a.proxy as u8);
    }
}

/// Bytes being read, every read bounds-checked.
#[derive(Debug)]
pub struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader of `b`.
    pub fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(format!(
                "truncated: {n} byte(s) wanted, {} left",
                self.b.len()
            ));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            n => Err(format!("{n} is not a flag")),
        }
    }
    fn str(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a string is not UTF-8".to_string())
    }
    fn blob(&mut self, max: u32, what: &str) -> Result<Vec<u8>, DecodeError> {
        let n = self.u32()?;
        if n > max {
            return Err(format!("{what}: {n} bytes, more than {max}"));
        }
        Ok(self.take(n as usize)?.to_vec())
    }
    fn addr(&mut self) -> Result<Option<SocketAddr>, DecodeError> {
        Ok(match self.u8()? {
            0 => None,
            4 => {
                let ip: [u8; 4] = self.take(4)?.try_into().unwrap();
                Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), self.u16()?))
            }
            6 => {
                let ip: [u8; 16] = self.take(16)?.try_into().unwrap();
                let port = self.u16()?;
                let scope = self.u32()?;
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(ip),
                    port,
                    0,
                    scope,
                )))
            }
            n => return Err(format!("address family {n}")),
        })
    }
    fn some_addr(&mut self) -> Result<SocketAddr, DecodeError> {
        self.addr()?
            .ok_or_else(|| "an address is missing".to_string())
    }
    fn listen_addr(&mut self) -> Result<ListenAddr, DecodeError> {
        Ok(ListenAddr {
            host: self.str()?,
            port: self.u16()?,
            proxy: self.bool()?,
        })
    }
    /// Fails unless everything was read.
    fn end(&self) -> Result<(), DecodeError> {
        match self.b.len() {
            0 => Ok(()),
            n => Err(format!("{n} byte(s) past the end")),
        }
    }
}

/// [`Hello`]'s bytes.
pub fn hello(h: &Hello) -> Vec<u8> {
    let mut w = Writer::default();
    w.0.extend_from_slice(&MAGIC);
    w.u16(ENVELOPE);
    w.u16(h.state);
    w.u32(h.pid);
    w.u16(h.workers);
    w.u8(h.activated as u8);
    w.u64(h.connections);
    w.u16(h.listeners.len() as u16);
    for g in &h.listeners {
        w.listen_addr(&g.addr);
        w.addr(Some(g.bound));
        w.u16(g.sockets);
    }
    match &h.metrics {
        None => w.u8(0),
        Some(m) => {
            w.u8(1);
            w.listen_addr(&m.addr);
            w.addr(Some(m.bound));
        }
    }
    w.0
}

/// Reads a [`Hello`]; `nfds` is how many descriptors came with it.
pub fn read_hello(b: &[u8], nfds: usize) -> Result<Hello, DecodeError> {
    let mut r = Reader::new(b);
    if r.take(8)? != MAGIC {
        return Err("not an xps hand-over (bad magic)".to_string());
    }
    let envelope = r.u16()?;
    if envelope != ENVELOPE {
        return Err(format!(
            "envelope version {envelope} (this xps reads {ENVELOPE})"
        ));
    }
    let mut h = Hello {
        state: r.u16()?,
        pid: r.u32()?,
        workers: r.u16()?,
        activated: r.bool()?,
        connections: r.u64()?,
        listeners: Vec::new(),
        metrics: None,
    };
    for _ in 0..r.u16()? {
        h.listeners.push(Group {
            addr: r.listen_addr()?,
            bound: r.some_addr()?,
            sockets: r.u16()?,
        });
    }
    if r.bool()? {
        h.metrics = Some(Endpoint {
            addr: r.listen_addr()?,
            bound: r.some_addr()?,
        });
    }
    r.end()?;
    let want: usize = h
        .listeners
        .iter()
        .map(|g| g.sockets as usize)
        .sum::<usize>()
        + h.metrics.is_some() as usize;
    if want != nfds {
        return Err(format!("{want} socket(s) listed, {nfds} passed"));
    }
    Ok(h)
}

/// [`Ready`]'s bytes.
pub fn ready(m: &Ready) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(m.pid);
    w.u16(m.reads.len() as u16);
    for &v in &m.reads {
        w.u16(v);
    }
    w.0
}

/// Reads a [`Ready`].
pub fn read_ready(b: &[u8]) -> Result<Ready, DecodeError> {
    let mut r = Reader::new(b);
    let pid = r.u32()?;
    let reads = (0..r.u16()?).map(|_| r.u16()).collect::<Result<_, _>>()?;
    r.end()?;
    Ok(Ready { pid, reads })
}

/// A `Fail`'s bytes: the reason.
pub fn fail(reason: &str) -> Vec<u8> {
    let mut w = Writer::default();
    w.str(reason);
    w.0
}

/// Reads a `Fail`.
pub fn read_fail(b: &[u8]) -> Result<String, DecodeError> {
    let mut r = Reader::new(b);
    let s = r.str()?;
    r.end()?;
    Ok(s)
}

/// A `Commit`'s bytes: whether connections follow.
pub fn commit(connections: bool) -> Vec<u8> {
    vec![connections as u8]
}

/// Reads a `Commit`.
pub fn read_commit(b: &[u8]) -> Result<bool, DecodeError> {
    let mut r = Reader::new(b);
    let c = r.bool()?;
    r.end()?;
    Ok(c)
}

/// A batch's bytes: `u16 worker | u16 count`, then each connection (state
/// version 1). The descriptors go with the frame, in the same order.
pub fn batch(worker: usize, conns: &[Moved]) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(
        4 + conns.iter().map(|m| 128 + m.bytes()).sum::<usize>(),
    ));
    w.u16(worker as u16);
    w.u16(conns.len() as u16);
    for m in conns {
        record(&mut w, m);
    }
    w.0
}

/// One connection, state version 1.
fn record(w: &mut Writer, m: &Moved) {
    let (c, t, k) = (&m.conn, &m.timers, &m.carried);
    w.u8(m.preface as u8 | (c.input_done as u8) << 1 | (c.paused as u8) << 2);
    w.str(&k.listener);
    w.addr(k.client);
    w.addr(k.proxy);
    w.u64(k.age.as_millis() as u64);
    w.u32(t.idle_secs);
    w.u32(t.line_secs);
    w.u64(t.last_active_ms);
    match t.line {
        LineSnapshot::Clear => {
            w.u8(0);
            w.u64(0);
        }
        LineSnapshot::Running { due_ms } => {
            w.u8(1);
            w.u64(due_ms);
        }
        LineSnapshot::Stopped { left_ms } => {
            w.u8(2);
            w.u64(left_ms);
        }
    }
    w.u32(c.max_line);
    w.u32(c.send_queue);
    for v in k.totals {
        w.u64(v);
    }
    w.blob(&c.partial);
    w.blob(&c.pending);
    w.blob(&k.preface);
}

/// Reads a batch (state version 1) with its descriptors: the worker it
/// came from and its connections.
pub fn read_batch(b: &[u8], fds: Vec<OwnedFd>) -> Result<(usize, Vec<Moved>), DecodeError> {
    let mut r = Reader::new(b);
    let worker = r.u16()? as usize;
    let n = r.u16()? as usize;
    if n != fds.len() {
        return Err(format!("{n} connection(s) with {} socket(s)", fds.len()));
    }
    let mut conns = Vec::with_capacity(n);
    for fd in fds {
        conns.push(read_record(&mut r, fd)?);
    }
    r.end()?;
    Ok((worker, conns))
}

/// One connection, state version 1.
fn read_record(r: &mut Reader<'_>, fd: OwnedFd) -> Result<Moved, DecodeError> {
    let flags = r.u8()?;
    if flags > 0b111 {
        return Err(format!("flags {flags:#x}"));
    }
    let listener = r.str()?;
    let client = r.addr()?;
    let proxy = r.addr()?;
    let age = Duration::from_millis(r.u64()?);
    let idle_secs = r.u32()?;
    let line_secs = r.u32()?;
    let last_active_ms = r.u64()?;
    let line = match (r.u8()?, r.u64()?) {
        (0, _) => LineSnapshot::Clear,
        (1, due_ms) => LineSnapshot::Running { due_ms },
        (2, left_ms) => LineSnapshot::Stopped { left_ms },
        (n, _) => return Err(format!("line clock {n}")),
    };
    let max_line = r.u32()?;
    if !(1..=MAX_LINE).contains(&max_line) {
        return Err(format!("max_line {max_line}"));
    }
    let send_queue = r.u32()?;
    let totals = [r.u64()?, r.u64()?, r.u64()?];
    let partial = r.blob(max_line, "unterminated line")?;
    if partial.contains(&b'\n') {
        return Err("the unterminated line holds a LF".to_string());
    }
    let pending = r.blob(MAX_PENDING, "unsent replies")?;
    let preface = r.blob(MAX_PREFACE, "preface")?;
    Ok(Moved {
        fd,
        conn: Snapshot {
            partial,
            pending,
            max_line,
            input_done: flags & 0b10 != 0,
            paused: flags & 0b100 != 0,
            send_queue,
        },
        timers: TimersSnapshot {
            idle_secs,
            line_secs,
            last_active_ms,
            line,
        },
        carried: Carried {
            listener,
            client,
            proxy,
            age,
            totals,
            preface,
        },
        preface: flags & 1 != 0,
    })
}

/// [`Done`]'s bytes (state version 1).
pub fn done(d: &Done) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(d.handed_over);
    w.u32(d.counters.len() as u32);
    for (series, value) in &d.counters {
        w.str(series);
        w.str(value);
    }
    w.0
}

/// Reads a [`Done`] (state version 1).
pub fn read_done(b: &[u8]) -> Result<Done, DecodeError> {
    let mut r = Reader::new(b);
    let handed_over = r.u64()?;
    let n = r.u32()?;
    let mut counters = Vec::new();
    for _ in 0..n {
        counters.push((r.str()?, r.str()?));
    }
    r.end()?;
    Ok(Done {
        handed_over,
        counters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devnull() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    fn sample() -> Moved {
        Moved {
            fd: devnull(),
            conn: Snapshot {
                partial: b"hel".to_vec(),
                pending: b"olleh\n".to_vec(),
                max_line: 100,
                input_done: true,
                paused: false,
                send_queue: 7,
            },
            timers: TimersSnapshot {
                idle_secs: 300,
                line_secs: 60,
                last_active_ms: 0x0102,
                line: LineSnapshot::Running { due_ms: 0x0304 },
            },
            carried: Carried {
                listener: "127.0.0.1:8001".to_string(),
                client: Some("203.0.113.7:51234".parse().unwrap()),
                proxy: Some("[::1]:9".parse().unwrap()),
                age: Duration::from_millis(1500),
                totals: [10, 6, 1],
                preface: Vec::new(),
            },
            preface: false,
        }
    }

    #[test]
    fn a_record_of_state_version_1_has_these_bytes() {
        let bytes = batch(1, &[sample()]);
        #[rustfmt::skip]
        let golden: Vec<u8> = [
            &[1, 0, 1, 0][..],                               // worker 1, 1 connection
            &[0b010],                                        // flags: input done
            &[14, 0], b"127.0.0.1:8001",                     // listener
            &[4, 203, 0, 113, 7], &51234u16.to_le_bytes(),   // client
            &[6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 9, 0, 0, 0, 0, 0], // proxy [::1]:9
            &1500u64.to_le_bytes(),                          // age (ms)
            &300u32.to_le_bytes(), &60u32.to_le_bytes(),     // idle, line (s)
            &0x0102u64.to_le_bytes(),                        // last active (ms)
            &[1], &0x0304u64.to_le_bytes(),                  // line clock: running, due
            &100u32.to_le_bytes(), &7u32.to_le_bytes(),      // max_line, send queue
            &10u64.to_le_bytes(), &6u64.to_le_bytes(), &1u64.to_le_bytes(), // totals
            &[3, 0, 0, 0], b"hel",                           // unterminated line
            &[6, 0, 0, 0], b"olleh\n",                       // unsent replies
            &[0, 0, 0, 0],                                   // preface
        ]
        .concat();
        assert_eq!(bytes, golden);
        let (worker, back) = read_batch(&bytes, vec![devnull()]).unwrap();
        assert_eq!(worker, 1);
        let (m, s) = (&back[0], sample());
        assert_eq!(
            (&m.conn, &m.timers, &m.carried, m.preface),
            (&s.conn, &s.timers, &s.carried, s.preface)
        );
    }

    #[test]
    fn bad_input_is_refused_never_trusted() {
        let good = batch(0, &[sample()]);
        // Every truncation fails.
        for n in 0..good.len() {
            assert!(
                read_batch(&good[..n], vec![devnull()]).is_err(),
                "cut at {n}"
            );
        }
        // Extra bytes, a socket count that does not match.
        assert!(read_batch(&[good.clone(), vec![0]].concat(), vec![devnull()]).is_err());
        assert!(read_batch(&good, vec![]).is_err());
        // An unterminated line longer than its max_line; an unknown clock.
        let mut long = sample();
        long.conn.max_line = 2;
        assert!(
            read_batch(&batch(0, &[long]), vec![devnull()])
                .unwrap_err()
                .contains("unterminated line")
        );
        let mut bad = good.clone();
        let clock = 4 + 1 + 16 + 7 + 23 + 8 + 8 + 8; // the line clock's tag
        assert_eq!(bad[clock], 1);
        bad[clock] = 9;
        assert!(read_batch(&bad, vec![devnull()]).is_err());
    }

    #[test]
    fn the_envelope_reads_back_and_is_checked() {
        let h = Hello {
            state: STATE,
            pid: 42,
            workers: 2,
            activated: false,
            connections: 3,
            listeners: vec![Group {
                addr: ListenAddr {
                    host: "localhost".to_string(),
                    port: 0,
                    proxy: true,
                },
                bound: "127.0.0.1:40001".parse().unwrap(),
                sockets: 2,
            }],
            metrics: Some(Endpoint {
                addr: ListenAddr {
                    host: "127.0.0.1".to_string(),
                    port: 0,
                    proxy: false,
                },
                bound: "127.0.0.1:40002".parse().unwrap(),
            }),
        };
        let b = hello(&h);
        assert_eq!(&b[..12], b"XPSUPGRD\x01\x00\x01\x00");
        assert_eq!(read_hello(&b, 3).unwrap(), h);
        assert!(
            read_hello(&b, 2)
                .unwrap_err()
                .contains("3 socket(s) listed, 2 passed")
        );
        let mut other = b.clone();
        other[8] = 2;
        assert!(
            read_hello(&other, 3)
                .unwrap_err()
                .contains("envelope version 2")
        );
        let r = Ready {
            pid: 7,
            reads: vec![1, 2],
        };
        assert_eq!(read_ready(&ready(&r)).unwrap(), r);
        assert_eq!(ready(&r), [7, 0, 0, 0, 2, 0, 1, 0, 2, 0]);
        assert!(read_commit(&commit(false)).is_ok_and(|c| !c));
        assert_eq!(read_fail(&fail("bad config")).unwrap(), "bad config");
        let d = Done {
            handed_over: 5,
            counters: vec![("xps_lines_total".to_string(), "12".to_string())],
        };
        assert_eq!(read_done(&done(&d)).unwrap(), d);
    }
}
