//! `upgrade`: how long a SIGUSR2 binary upgrade of xps takes under load,
//! and how long clients wait meanwhile (SPEC §7; docs/performance.md).
//!
//! Opens `--conns` idle connections (each verified with one round trip)
//! and `--busy` connections that ping-pong lines back to back, plus one
//! pinger that sends a line every 5 ms. After `--warmup` it sends SIGUSR2
//! to the pid in `--pid-file` and watches that process end through a pidfd
//! (in the same poll as the sockets), keeps the load going `--duration`
//! seconds more, then verifies every idle connection with a round trip
//! (they are the new process's now). Reports: ms from the signal to the old
//! process's exit; the pinger's round trips during the upgrade (p50, p99,
//! max); per busy connection the longest wait for a reply during the
//! upgrade (p99 and max over the connections); every reply verified.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::net::wait;
use crate::{Args, secs};

/// The pinger's period.
const PING_EVERY: Duration = Duration::from_millis(5);
/// Token of the old process's pidfd.
const PIDFD: Token = Token(usize::MAX);

/// One busy connection (or the pinger): a line in flight, its reply being
/// read.
struct Conn {
    s: TcpStream,
    /// The line and the reply it must get.
    line: Vec<u8>,
    want: Vec<u8>,
    /// Reply bytes read so far.
    got: usize,
    /// When the line in flight was sent; `None` while none is.
    sent_at: Option<Instant>,
    /// The longest wait for a reply that began during the upgrade.
    worst: Duration,
}

impl Conn {
    fn new(s: TcpStream, tag: usize, size: usize) -> Conn {
        let mut line = format!("busy {tag:06} ").into_bytes();
        while line.len() + 1 < size.max(16) {
            line.push(b'a' + (line.len() % 26) as u8);
        }
        let mut want: Vec<u8> = line.iter().rev().copied().collect();
        want.push(b'\n');
        line.push(b'\n');
        Conn {
            s,
            line,
            want,
            got: 0,
            sent_at: None,
            worst: Duration::ZERO,
        }
    }

    /// Sends the line (small: one write takes it on loopback).
    fn send(&mut self) -> io::Result<()> {
        self.s.write_all(&self.line)?;
        self.got = 0;
        self.sent_at = Some(Instant::now());
        Ok(())
    }

    /// Reads what is there; the round trip's time once the reply is whole.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<Option<Duration>> {
        loop {
            match self.s.read(buf) {
                Ok(0) => return Err(io::Error::other("the server closed the connection")),
                Ok(n) => {
                    let end = self.got + n;
                    if end > self.want.len() || buf[..n] != self.want[self.got..end] {
                        return Err(io::Error::other("wrong reply"));
                    }
                    self.got = end;
                    if self.got == self.want.len() {
                        let rtt = self.sent_at.take().map(|t| t.elapsed());
                        return Ok(rtt);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Runs the upgrade measurement; prints one JSON line.
pub fn main(args: &Args) -> ExitCode {
    match run(args) {
        Ok(json) => {
            let failed = !json.contains("\"errors\":0,");
            println!("{json}");
            if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("xps-bench: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> io::Result<String> {
    let pid_file = args
        .pid_file
        .as_ref()
        .ok_or_else(|| io::Error::other("upgrade needs --pid-file (the server's --pid-file)"))?;
    let old: i32 = std::fs::read_to_string(pid_file)?
        .trim()
        .parse()
        .map_err(|_| io::Error::other("the pid file holds no pid"))?;
    let addr = args.addr[0];
    let size = args.size();
    let mut errors = 0u64;
    let mut buf = vec![0u8; 64 * 1024];

    // Idle connections, each verified once (blocking, in order).
    let t_open = Instant::now();
    let mut idle = Vec::with_capacity(args.conns);
    for i in 0..args.conns {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(secs(args.timeout)))?;
        round_trip(&mut s, i)?;
        idle.push(s);
    }
    let connect_s = t_open.elapsed().as_secs_f64();

    // Busy connections and the pinger (the last one), on one poll.
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<Conn> = Vec::with_capacity(args.busy + 1);
    for i in 0..=args.busy {
        let s = std::net::TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        let mut c = Conn::new(TcpStream::from_std(s), i, size);
        poll.registry()
            .register(&mut c.s, Token(i), Interest::READABLE)?;
        conns.push(c);
    }
    let pinger = args.busy;
    for c in conns.iter_mut().take(args.busy) {
        c.send()?;
    }
    let mut next_ping = Instant::now();
    let mut pings: Vec<Duration> = Vec::new();
    let mut busy_replies = 0u64;

    let t_signal = Instant::now() + secs(args.warmup);
    let mut signalled = false;
    let mut exited: Option<Instant> = None;
    let mut pidfd: Option<OwnedFd> = None;
    loop {
        let now = Instant::now();
        if let Some(t) = exited
            && now >= t + secs(args.duration)
        {
            break;
        }
        if !signalled && now >= t_signal {
            let fd = pidfd_open(old)?;
            poll.registry()
                .register(&mut SourceFd(&fd.as_raw_fd()), PIDFD, Interest::READABLE)?;
            pidfd = Some(fd);
            // SAFETY: kill(2) on the pid the server wrote.
            if unsafe { libc::kill(old, libc::SIGUSR2) } != 0 {
                return Err(io::Error::last_os_error());
            }
            signalled = true;
        }
        if signalled && exited.is_none() && now >= t_signal + secs(args.timeout) {
            return Err(io::Error::other(format!(
                "pid {old} did not exit within --timeout {} s of SIGUSR2",
                args.timeout
            )));
        }
        if now >= next_ping && conns[pinger].sent_at.is_none() {
            conns[pinger].send()?;
            next_ping = now + PING_EVERY;
        }
        let until = next_ping.max(now + Duration::from_micros(100));
        wait(&mut poll, &mut events, until - now)?;
        let during =
            signalled && exited.is_none_or(|t| Instant::now() < t + Duration::from_millis(500));
        for ev in events.iter() {
            if ev.token() == PIDFD {
                exited.get_or_insert_with(Instant::now);
                continue;
            }
            let i = ev.token().0;
            let c = &mut conns[i];
            match c.read(&mut buf) {
                Ok(None) => {}
                Ok(Some(rtt)) => {
                    if i == pinger {
                        if during {
                            pings.push(rtt);
                        }
                    } else {
                        busy_replies += 1;
                        if during {
                            c.worst = c.worst.max(rtt);
                        }
                        if let Err(e) = c.send() {
                            errors += 1;
                            eprintln!("xps-bench: busy connection {i}: {e}");
                        }
                    }
                }
                Err(e) => {
                    errors += 1;
                    eprintln!("xps-bench: connection {i}: {e}");
                    let _ = poll.registry().deregister(&mut c.s);
                }
            }
        }
    }
    drop(pidfd);
    let t_exit = exited.expect("loop ends after the exit");
    let upgrade_ms = (t_exit - t_signal).as_secs_f64() * 1e3;

    // Every idle connection is the new process's now: one round trip each.
    let mut verified = 0u64;
    for (i, s) in idle.iter_mut().enumerate() {
        match round_trip(s, i + 1) {
            Ok(()) => verified += 1,
            Err(e) => {
                errors += 1;
                if errors < 10 {
                    eprintln!("xps-bench: idle connection {i}: {e}");
                }
            }
        }
    }
    let new = std::fs::read_to_string(pid_file)?.trim().to_string();

    pings.sort_unstable();
    let mut worst: Vec<Duration> = conns[..args.busy].iter().map(|c| c.worst).collect();
    worst.sort_unstable();
    let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
    Ok(format!(
        concat!(
            "{{\"mode\":\"upgrade\",\"idle\":{},\"busy\":{},\"old_pid\":{},\"new_pid\":{},",
            "\"connect_s\":{:.2},\"upgrade_ms\":{:.1},\"pings\":{},\"ping_p50_ms\":{:.2},",
            "\"ping_p99_ms\":{:.2},\"ping_max_ms\":{:.2},\"busy_replies\":{},",
            "\"busy_worst_wait_p99_ms\":{:.2},\"busy_worst_wait_max_ms\":{:.2},",
            "\"idle_verified\":{},\"errors\":{},\"size\":{}}}"
        ),
        args.conns,
        args.busy,
        old,
        new,
        connect_s,
        upgrade_ms,
        pings.len(),
        ms(percentile(&pings, 0.50)),
        ms(percentile(&pings, 0.99)),
        ms(pings.last()),
        busy_replies,
        ms(percentile(&worst, 0.99)),
        ms(worst.last()),
        verified,
        errors,
        size,
    ))
}

/// One line and its exact reply, blocking.
fn round_trip(s: &mut std::net::TcpStream, tag: usize) -> io::Result<()> {
    let line = format!("idle {tag:08}\n");
    s.write_all(line.as_bytes())?;
    let mut got = vec![0u8; line.len()];
    s.read_exact(&mut got)?;
    let want: Vec<u8> = line.trim_end().bytes().rev().chain([b'\n']).collect();
    if got != want {
        return Err(io::Error::other("wrong reply"));
    }
    Ok(())
}

/// The element at quantile `q` of sorted `v`.
fn percentile(v: &[Duration], q: f64) -> Option<&Duration> {
    if v.is_empty() {
        return None;
    }
    v.get(
        ((v.len() as f64 * q).ceil() as usize)
            .saturating_sub(1)
            .min(v.len() - 1),
    )
}

/// A pidfd for `pid` (readable once it exits); it need not be our child.
fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall; a non-negative result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
