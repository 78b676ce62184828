//! `lines` and `bulk`: long-lived connections streaming lines.
//!
//! Every connection is a position in the periodic request stream (`tx`,
//! bytes written) and in the expected reply stream (`rx`, bytes received and
//! verified). `lines` lets `tx` run at most `pipeline` lines ahead of the
//! complete replies and timestamps each line when its last byte is written;
//! `bulk` writes whatever the socket takes (or up to `--window` bytes ahead).
//! Reads go into one shared scratch buffer and are compared in place, so the
//! steady state allocates nothing.

use std::io::{self, Read, Write};
use std::time::Instant;

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::net::{self, Connector};
use crate::pattern::Patterns;
use crate::report::{self, Errors, Report};
use crate::sys::{self, CpuMeter};
use crate::{Args, Mode, secs};

const SCRATCH: usize = 256 * 1024;
/// Largest single write.
const MAX_WRITE: usize = 256 * 1024;

struct Conn {
    s: TcpStream,
    tx: u64,
    rx: u64,
    /// Lines whose last byte has been written.
    tx_lines: u64,
    /// Send time of line `i` at `i % pipeline` (lines mode).
    sent: Box<[Instant]>,
    dead: bool,
}

struct Ctx<'a> {
    pats: &'a Patterns,
    size: u64,
    pipeline: Option<u64>,
    window: u64,
    scratch: Vec<u8>,
    hist: Histogram<u64>,
    measuring: bool,
    lines: u64,
    bytes: u64,
}

pub fn run(args: &Args) -> io::Result<Report> {
    let size = args.size();
    let pats = Patterns::new(size, args.verify, 64 * 1024);
    let pipeline = (args.mode == Mode::Lines).then_some(args.pipeline as u64);
    let mut ctx = Ctx {
        pats: &pats,
        size: size as u64,
        pipeline,
        window: if args.window == 0 {
            u64::MAX
        } else {
            args.window as u64
        },
        scratch: vec![0; SCRATCH],
        hist: report::histogram(),
        measuring: false,
        lines: 0,
        bytes: 0,
    };
    let mut errors = Errors::default();
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut connector = Connector::new(args.addr.clone(), 1);
    let start = Instant::now();
    let mut conns: Vec<Conn> = Vec::with_capacity(args.conns);
    for i in 0..args.conns {
        let mut s = connector.connect()?;
        poll.registry()
            .register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE)?;
        conns.push(Conn {
            s,
            tx: 0,
            rx: 0,
            tx_lines: 0,
            sent: vec![start; pipeline.unwrap_or(0) as usize].into_boxed_slice(),
            dead: false,
        });
    }
    let mut alive = conns.len();

    let warm_end = start + secs(args.warmup);
    let end = warm_end + secs(args.duration);
    let mut cpu = CpuMeter::new(args.server_pid);
    let mut t0 = start;
    let (mut lines0, mut bytes0) = (0, 0);
    if args.warmup <= 0.0 {
        ctx.measuring = true;
        cpu.start();
    }
    loop {
        let now = Instant::now();
        if !ctx.measuring && now >= warm_end {
            ctx.measuring = true;
            t0 = now;
            lines0 = ctx.lines;
            bytes0 = ctx.bytes;
            ctx.hist.reset();
            cpu.start();
        }
        if now >= end || alive == 0 {
            break;
        }
        let next = if ctx.measuring { end } else { warm_end };
        net::wait(&mut poll, &mut events, next.saturating_duration_since(now))?;
        for ev in events.iter() {
            let c = &mut conns[ev.token().0];
            if c.dead {
                continue;
            }
            if let Err(e) = service(c, &mut ctx) {
                errors.add(&format!("connection {}: {e}", ev.token().0));
                let _ = poll.registry().deregister(&mut c.s);
                c.dead = true;
                alive -= 1;
            }
        }
    }
    let t1 = Instant::now();
    let cpu_window = cpu.stop();
    let window = t1.duration_since(t0).as_secs_f64();
    let mut rep = Report::new(args);
    rep.pipeline = pipeline.map(|p| p as usize);
    rep.duration = window;
    rep.lines = ctx.lines - lines0;
    rep.bytes = ctx.bytes - bytes0;
    rep.lines_per_s = Some(rep.lines as f64 / window);
    rep.mb_per_s = Some(rep.bytes as f64 / window / 1e6);
    if pipeline.is_some() {
        rep.latency = Some(ctx.hist);
    }
    rep.errors = errors.count;
    rep.cpu = cpu_window;
    rep.server_rss_kb = args.server_pid.and_then(sys::rss_kb);
    if rep.lines == 0 && rep.errors == 0 {
        errors.add("no reply completed in the measured window");
        rep.errors = errors.count;
    }
    Ok(rep)
}

/// Reads everything available, verifies it, then refills the pipe.
fn service(c: &mut Conn, ctx: &mut Ctx) -> Result<(), String> {
    let n_line = ctx.size;
    loop {
        match c.s.read(&mut ctx.scratch) {
            Ok(0) => return Err("server closed the connection".into()),
            Ok(n) => {
                let now = Instant::now();
                let data = &ctx.scratch[..n];
                if c.rx + n as u64 > c.tx {
                    return Err(format!(
                        "received {} bytes but sent only {}",
                        c.rx + n as u64,
                        c.tx
                    ));
                }
                if !ctx.pats.check(c.rx, data) {
                    return Err(ctx.pats.describe_mismatch(c.rx, data));
                }
                let before = c.rx / n_line;
                c.rx += n as u64;
                let after = c.rx / n_line;
                ctx.lines += after - before;
                ctx.bytes += n as u64;
                if let Some(p) = ctx.pipeline
                    && ctx.measuring
                {
                    for l in before..after {
                        report::record(&mut ctx.hist, now - c.sent[(l % p) as usize]);
                    }
                }
                if n < ctx.scratch.len() {
                    // A short read drained the socket; the next byte brings a new edge.
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let limit = match ctx.pipeline {
        Some(p) => (c.rx / n_line + p) * n_line,
        None => c.rx.saturating_add(ctx.window),
    };
    if c.tx >= limit {
        return Ok(());
    }
    let now = Instant::now();
    while c.tx < limit {
        let want = (limit - c.tx).min(MAX_WRITE as u64) as usize;
        let buf = ctx.pats.tx_slice(c.tx, want);
        match c.s.write(buf) {
            Ok(0) => return Err("write returned 0".into()),
            Ok(n) => {
                c.tx += n as u64;
                if let Some(p) = ctx.pipeline {
                    while (c.tx_lines + 1) * n_line <= c.tx {
                        c.sent[(c.tx_lines % p) as usize] = now;
                        c.tx_lines += 1;
                    }
                }
                if n < buf.len() {
                    // Send buffer full: EPOLLOUT will fire when it drains.
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::NotConnected => break,
            Err(e) => return Err(format!("write: {e}")),
        }
    }
    Ok(())
}
