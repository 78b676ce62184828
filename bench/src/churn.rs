//! `churn`: C slots, each repeatedly connect → send one line → read the
//! reply → close. Measures completed connections per second and the
//! latency from the connect call to the complete reply.

use std::io::{self, Read, Write};
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Registry, Token};

use crate::net::{self, Connector};
use crate::pattern::{K, Patterns};
use crate::report::{self, Errors, Report};
use crate::sys::{self, CpuMeter};
use crate::{Args, secs};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    Connecting,
    /// Bytes of the PROXY header written (`--proxy-v2`).
    Header(usize),
    /// Bytes of the line written.
    Sending(usize),
    /// Bytes of the reply received.
    Receiving(usize),
}

/// One connect → line → reply exchange.
pub struct Exchange {
    pub s: TcpStream,
    pub phase: Phase,
    pub started: Instant,
    pub pattern: usize,
}

pub enum Step {
    /// Waiting for the next readiness event.
    Pending,
    /// The reply arrived complete and correct.
    Done,
}

impl Exchange {
    pub fn start(
        connector: &mut Connector,
        registry: &Registry,
        token: Token,
        pattern: usize,
    ) -> io::Result<Exchange> {
        let started = Instant::now();
        let mut s = connector.connect()?;
        registry.register(&mut s, token, Interest::READABLE | Interest::WRITABLE)?;
        Ok(Exchange {
            s,
            phase: Phase::Connecting,
            started,
            pattern,
        })
    }

    /// Restarts the exchange on the already connected stream (idle's final check).
    pub fn again(&mut self, pattern: usize) {
        self.phase = Phase::Sending(0);
        self.started = Instant::now();
        self.pattern = pattern;
    }

    /// Advances as far as the socket allows.
    pub fn step(&mut self, pats: &Patterns, scratch: &mut [u8]) -> Result<Step, String> {
        self.step_with(&[], pats, scratch)
    }

    /// [`step`](Self::step), sending `header` (a PROXY header) first on a
    /// new connection.
    pub fn step_with(
        &mut self,
        header: &[u8],
        pats: &Patterns,
        scratch: &mut [u8],
    ) -> Result<Step, String> {
        if self.phase == Phase::Connecting {
            match net::connected(&self.s) {
                Ok(true) if header.is_empty() => self.phase = Phase::Sending(0),
                Ok(true) => self.phase = Phase::Header(0),
                Ok(false) => return Ok(Step::Pending),
                Err(e) => return Err(format!("connect: {e}")),
            }
        }
        if let Phase::Header(mut off) = self.phase {
            // Header and first line in one write (one segment), as a
            // balancer that already has the client's first bytes sends
            // them (HAProxy puts the header in the same send).
            let line = pats.line(self.pattern);
            while off < header.len() {
                let parts = [io::IoSlice::new(&header[off..]), io::IoSlice::new(line)];
                match self.s.write_vectored(&parts) {
                    Ok(0) => return Err("write returned 0".into()),
                    Ok(n) => off += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.phase = Phase::Header(off);
                        return Ok(Step::Pending);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("write: {e}")),
                }
            }
            // What went past the header was the line's start.
            self.phase = Phase::Sending(off - header.len());
        }
        if let Phase::Sending(mut off) = self.phase {
            let line = pats.line(self.pattern);
            while off < line.len() {
                match self.s.write(&line[off..]) {
                    Ok(0) => return Err("write returned 0".into()),
                    Ok(n) => off += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.phase = Phase::Sending(off);
                        return Ok(Step::Pending);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("write: {e}")),
                }
            }
            self.phase = Phase::Receiving(0);
        }
        if let Phase::Receiving(mut got) = self.phase {
            let want = pats.reply(self.pattern);
            loop {
                match self.s.read(scratch) {
                    Ok(0) => {
                        return Err(format!(
                            "server closed the connection after {got} of {} reply bytes",
                            want.len()
                        ));
                    }
                    Ok(n) => {
                        if got + n > want.len() {
                            return Err(format!(
                                "reply longer than the line: {} bytes for {}: {:?}",
                                got + n,
                                want.len(),
                                String::from_utf8_lossy(&scratch[..n.min(200)])
                            ));
                        }
                        if scratch[..n] != want[got..got + n] {
                            return Err(format!(
                                "wrong reply: got {:?}, want {:?}",
                                String::from_utf8_lossy(&scratch[..n]),
                                String::from_utf8_lossy(&want[got..got + n])
                            ));
                        }
                        got += n;
                        if got == want.len() {
                            return Ok(Step::Done);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.phase = Phase::Receiving(got);
                        return Ok(Step::Pending);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("read: {e}")),
                }
            }
        }
        Ok(Step::Pending)
    }
}

/// A PROXY protocol v2 header (`PROXY`, TCP over IPv4, 192.0.2.1:4242 →
/// 192.0.2.2:8001), what HAProxy's `send-proxy-v2` prepends.
pub fn proxy_v2_header() -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
    h.extend_from_slice(&[192, 0, 2, 1, 192, 0, 2, 2]);
    h.extend_from_slice(&4242u16.to_be_bytes());
    h.extend_from_slice(&8001u16.to_be_bytes());
    h
}

pub fn run(args: &Args) -> io::Result<Report> {
    let header = if args.proxy_v2 {
        proxy_v2_header()
    } else {
        Vec::new()
    };
    let pats = Patterns::new(args.size(), args.verify, 1);
    let mut scratch = vec![0u8; 64 * 1024];
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut connector = Connector::new(args.addr.clone(), args.src_spread);
    let mut errors = Errors::default();
    let mut hist = report::histogram();
    let mut slots: Vec<Option<Exchange>> = Vec::with_capacity(args.conns);
    let mut seq = 0usize;
    for i in 0..args.conns {
        slots.push(Some(Exchange::start(
            &mut connector,
            poll.registry(),
            Token(i),
            seq % K,
        )?));
        seq += 1;
    }
    let start = Instant::now();
    let warm_end = start + secs(args.warmup);
    let end = warm_end + secs(args.duration);
    let mut cpu = CpuMeter::new(args.server_pid);
    let mut measuring = false;
    let mut t0 = start;
    let mut done: u64 = 0;
    let mut done0: u64 = 0;
    if args.warmup <= 0.0 {
        measuring = true;
        cpu.start();
    }
    let mut alive = args.conns;
    loop {
        let now = Instant::now();
        if !measuring && now >= warm_end {
            measuring = true;
            t0 = now;
            done0 = done;
            hist.reset();
            cpu.start();
        }
        if now >= end || alive == 0 {
            break;
        }
        let next = if measuring { end } else { warm_end };
        net::wait(&mut poll, &mut events, next.saturating_duration_since(now))?;
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(x) = slots[i].as_mut() else { continue };
            let restart = match x.step_with(&header, &pats, &mut scratch) {
                Ok(Step::Pending) => false,
                Ok(Step::Done) => {
                    if measuring {
                        report::record(&mut hist, x.started.elapsed());
                    }
                    done += 1;
                    true
                }
                Err(e) => {
                    errors.add(&format!("slot {i}: {e}"));
                    true
                }
            };
            if restart {
                if let Some(mut old) = slots[i].take() {
                    let _ = poll.registry().deregister(&mut old.s);
                }
                match Exchange::start(&mut connector, poll.registry(), Token(i), seq % K) {
                    Ok(x) => slots[i] = Some(x),
                    Err(e) => {
                        errors.add(&format!("slot {i}: connect: {e}"));
                        alive -= 1;
                    }
                }
                seq += 1;
            }
        }
    }
    let t1 = Instant::now();
    let cpu_window = cpu.stop();
    let window = t1.duration_since(t0).as_secs_f64();
    let mut rep = Report::new(args);
    rep.duration = window;
    rep.connections = done - done0;
    rep.lines = rep.connections;
    rep.bytes = rep.connections * args.size() as u64;
    rep.conns_per_s = Some(rep.connections as f64 / window);
    rep.lines_per_s = rep.conns_per_s;
    rep.latency = Some(hist);
    rep.errors = errors.count;
    rep.cpu = cpu_window;
    rep.server_rss_kb = args.server_pid.and_then(sys::rss_kb);
    if rep.connections == 0 && rep.errors == 0 {
        errors.add("no connection completed in the measured window");
        rep.errors = errors.count;
    }
    Ok(rep)
}
