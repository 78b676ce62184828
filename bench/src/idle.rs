//! `idle`: open C connections, at most `--max-connecting` in the handshake
//! and first round trip at once (so the listen backlog never overflows),
//! hold them for `--hold` seconds, then verify every one with a second
//! round trip. Reports how many stayed open and, with `--server-pid`, the
//! server's RSS before and while holding them.

use std::io::{self, Read};
use std::time::Instant;

use mio::{Events, Poll, Token};

use crate::churn::{Exchange, Step};
use crate::net::{Connector, wait};
use crate::pattern::{K, Patterns};
use crate::report::{self, Errors, Report};
use crate::sys::{self, CpuMeter};
use crate::{Args, secs};

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    NotStarted,
    /// First round trip in progress.
    Opening,
    /// Verified once, idle.
    Held,
    /// Final round trip in progress.
    Checking,
    /// Verified twice.
    Verified,
    Failed,
}

pub fn run(args: &Args) -> io::Result<Report> {
    let pats = Patterns::new(args.size(), args.verify, 1);
    let mut scratch = vec![0u8; 64 * 1024];
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut connector = Connector::new(args.addr.clone(), args.src_spread);
    let mut errors = Errors::default();
    let mut hist = report::histogram();
    let c = args.conns;
    let mut ex: Vec<Option<Exchange>> = (0..c).map(|_| None).collect();
    let mut state = vec![State::NotStarted; c];
    let rss_before = args.server_pid.and_then(sys::rss_kb);

    // Phase 1: open and verify, paced.
    let t_open = Instant::now();
    let deadline = t_open + secs(args.timeout);
    let (mut launched, mut in_flight, mut settled) = (0usize, 0usize, 0usize);
    while settled < c {
        while in_flight < args.max_connecting.max(1) && launched < c {
            let i = launched;
            launched += 1;
            match Exchange::start(&mut connector, poll.registry(), Token(i), i % K) {
                Ok(x) => {
                    ex[i] = Some(x);
                    state[i] = State::Opening;
                    in_flight += 1;
                }
                Err(e) => {
                    errors.add(&format!("connection {i}: connect: {e}"));
                    state[i] = State::Failed;
                    settled += 1;
                }
            }
        }
        let now = Instant::now();
        if now >= deadline {
            errors.add(&format!(
                "only {settled} of {c} connections settled within --timeout {}s",
                args.timeout
            ));
            break;
        }
        wait(&mut poll, &mut events, deadline - now)?;
        for ev in events.iter() {
            let i = ev.token().0;
            if state[i] != State::Opening {
                continue;
            }
            let x = ex[i].as_mut().expect("opening slot has an exchange");
            match x.step(&pats, &mut scratch) {
                Ok(Step::Pending) => continue,
                Ok(Step::Done) => {
                    report::record(&mut hist, x.started.elapsed());
                    state[i] = State::Held;
                }
                Err(e) => {
                    errors.add(&format!("connection {i}: {e}"));
                    fail(&poll, &mut ex[i], &mut state[i]);
                }
            }
            in_flight -= 1;
            settled += 1;
        }
    }
    let connect_s = t_open.elapsed().as_secs_f64();
    let opened = state.iter().filter(|s| **s == State::Held).count();

    // Phase 2: hold. Any event on a held connection is the server closing
    // it or sending something unasked.
    let mut cpu = CpuMeter::new(args.server_pid);
    cpu.start();
    let t_hold = Instant::now();
    let hold_end = t_hold + secs(args.hold);
    loop {
        let now = Instant::now();
        if now >= hold_end {
            break;
        }
        wait(&mut poll, &mut events, hold_end - now)?;
        for ev in events.iter() {
            let i = ev.token().0;
            if state[i] != State::Held {
                continue;
            }
            let x = ex[i].as_mut().expect("held slot has an exchange");
            let bad = match x.s.read(&mut scratch) {
                Ok(0) => Some("server closed an idle connection".to_string()),
                Ok(n) => Some(format!("{n} unrequested bytes on an idle connection")),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
                Err(e) => Some(format!("idle connection: {e}")),
            };
            if let Some(e) = bad {
                errors.add(&format!("connection {i}: {e}"));
                fail(&poll, &mut ex[i], &mut state[i]);
            }
        }
    }
    let held_s = t_hold.elapsed().as_secs_f64();
    let cpu_window = cpu.stop();
    let rss_held = args.server_pid.and_then(sys::rss_kb);

    // Phase 3: one more round trip on each held connection.
    let check_end = Instant::now() + secs(args.timeout);
    let mut pending = 0usize;
    for i in 0..c {
        if state[i] != State::Held {
            continue;
        }
        let x = ex[i].as_mut().expect("held slot has an exchange");
        x.again((i + 1) % K);
        state[i] = State::Checking;
        match x.step(&pats, &mut scratch) {
            Ok(Step::Pending) => pending += 1,
            Ok(Step::Done) => state[i] = State::Verified,
            Err(e) => {
                errors.add(&format!("connection {i}: final check: {e}"));
                fail(&poll, &mut ex[i], &mut state[i]);
            }
        }
    }
    while pending > 0 {
        let now = Instant::now();
        if now >= check_end {
            errors.add(&format!(
                "{pending} connections did not answer the final check within --timeout"
            ));
            break;
        }
        wait(&mut poll, &mut events, check_end - now)?;
        for ev in events.iter() {
            let i = ev.token().0;
            if state[i] != State::Checking {
                continue;
            }
            let x = ex[i].as_mut().expect("checking slot has an exchange");
            match x.step(&pats, &mut scratch) {
                Ok(Step::Pending) => continue,
                Ok(Step::Done) => state[i] = State::Verified,
                Err(e) => {
                    errors.add(&format!("connection {i}: final check: {e}"));
                    fail(&poll, &mut ex[i], &mut state[i]);
                }
            }
            pending -= 1;
        }
    }
    let verified = state.iter().filter(|s| **s == State::Verified).count();

    let mut rep = Report::new(args);
    rep.duration = held_s;
    rep.connections = opened as u64;
    rep.lines = opened as u64 + verified as u64;
    rep.bytes = rep.lines * args.size() as u64;
    rep.conns_per_s = Some(opened as f64 / connect_s);
    rep.connect_s = Some(connect_s);
    rep.latency = Some(hist);
    rep.open = Some(verified as u64);
    rep.errors = errors.count;
    rep.cpu = cpu_window;
    rep.server_rss_before_kb = rss_before;
    rep.server_rss_kb = rss_held;
    if let (Some(a), Some(b)) = (rss_before, rss_held)
        && opened > 0
    {
        rep.rss_per_conn_bytes = Some((b as f64 - a as f64) * 1024.0 / opened as f64);
    }
    if verified < c {
        eprintln!("xps-bench: {verified} of {c} connections open and verified at the end");
    }
    Ok(rep)
}

fn fail(poll: &Poll, x: &mut Option<Exchange>, st: &mut State) {
    if let Some(mut x) = x.take() {
        let _ = poll.registry().deregister(&mut x.s);
    }
    *st = State::Failed;
}
