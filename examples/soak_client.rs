//! Load client for `scripts/soak.sh`: bounded-time mixed load against a
//! running xps on loopback, with verified replies.
//!
//! `--mode soak` runs, until `--secs` have passed, all at once:
//!
//! * idle: `--idle` connections that never send; watched with mio, so a
//!   connection the server closes or writes to counts as an error;
//! * pipeliners: batches of up to 200 mixed lines (ASCII, UTF-8 with combining
//!   marks and emoji, invalid UTF-8, CR LF, empty, now and then one longer than
//!   the server's max line) written in random-sized pieces, then all replies
//!   read and compared byte for byte; some connections end with an
//!   unterminated line and a half-close, which must be answered, then EOF;
//! * flooders: send a stream of identical lines without reading, up to
//!   `--flood-bytes` or until the server's flow control stalls them; then
//!   either half-close and read every reply back (each byte checked), or walk
//!   away (close, or reset with SO_LINGER 0) with replies pending;
//! * resetters: send up to 2 MB without reading, then reset (SO_LINGER 0);
//! * churners: connect, one line, check the reply, close, at `--churn-rate`
//!   connections per second in total.
//!
//! `--mode idle` opens `--idle` connections (with `--warm`, each first sends
//! one line and reads its reply), writes `ready=1` to the stats file, and
//! holds them until `--secs` have passed.
//!
//! Counters go to `--stats` (one `key=value ...` line, rewritten four times
//! a second). Expected replies come from `xps::protocol::reverse_stream`, the
//! protocol module that the fuzzer checks against an independent model; what
//! the soak checks is that the server delivers them whole, in order, once.
//! Exit status: 0 if no reply was wrong and no error occurred, 1 otherwise.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use xps::protocol::{DEFAULT_MAX_LINE, reverse_stream};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Soak,
    Idle,
}

#[derive(Debug, Parser)]
#[command(about = "bounded-time mixed load against xps on loopback")]
struct Args {
    /// Server ports on 127.0.0.1, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    ports: Vec<u16>,
    #[arg(long, value_enum, default_value = "soak")]
    mode: Mode,
    /// Run time in seconds (hard bound for every loop).
    #[arg(long, default_value_t = 300)]
    secs: u64,
    /// Idle connections.
    #[arg(long, default_value_t = 5000)]
    idle: usize,
    /// Idle mode: each idle connection first sends one line and reads the reply.
    #[arg(long)]
    warm: bool,
    #[arg(long, default_value_t = 4)]
    pipeliners: usize,
    #[arg(long, default_value_t = 3)]
    flooders: usize,
    /// Most bytes one flooder connection sends.
    #[arg(long, default_value_t = 100_000_000)]
    flood_bytes: u64,
    #[arg(long, default_value_t = 2)]
    resetters: usize,
    #[arg(long, default_value_t = 2)]
    churners: usize,
    /// Churn connections per second, over all churners.
    #[arg(long, default_value_t = 200)]
    churn_rate: u64,
    /// The server's --max-line (for the expected replies).
    #[arg(long, default_value_t = DEFAULT_MAX_LINE)]
    max_line: usize,
    /// Counters file, rewritten four times a second.
    #[arg(long)]
    stats: PathBuf,
}

/// Shared counters.
#[derive(Default)]
struct Stats {
    errors: AtomicU64,
    mismatches: AtomicU64,
    idle_open: AtomicU64,
    idle_lost: AtomicU64,
    pipe_lines: AtomicU64,
    pipe_bytes: AtomicU64,
    pipe_halfclose: AtomicU64,
    flood_conns: AtomicU64,
    flood_sent: AtomicU64,
    flood_verified: AtomicU64,
    flood_stalls: AtomicU64,
    flood_max_unread: AtomicU64,
    resets: AtomicU64,
    churn_ok: AtomicU64,
    ready: AtomicU64,
}

impl Stats {
    fn line(&self) -> String {
        let g = |a: &AtomicU64| a.load(Relaxed);
        format!(
            "errors={} mismatches={} idle_open={} idle_lost={} pipe_lines={} pipe_bytes={} \
             pipe_halfclose={} flood_conns={} flood_sent={} flood_verified={} flood_stalls={} \
             flood_max_unread={} resets={} churn_ok={} ready={}",
            g(&self.errors),
            g(&self.mismatches),
            g(&self.idle_open),
            g(&self.idle_lost),
            g(&self.pipe_lines),
            g(&self.pipe_bytes),
            g(&self.pipe_halfclose),
            g(&self.flood_conns),
            g(&self.flood_sent),
            g(&self.flood_verified),
            g(&self.flood_stalls),
            g(&self.flood_max_unread),
            g(&self.resets),
            g(&self.churn_ok),
            g(&self.ready),
        )
    }

    /// Counts an error; prints the first 50 to stderr.
    fn error(&self, who: &str, what: impl std::fmt::Display) {
        let n = self.errors.fetch_add(1, Relaxed);
        if n < 50 {
            eprintln!("[soak_client] error #{}: {who}: {what}", n + 1);
        }
    }

    /// Counts a wrong reply; prints the first 20 with where they differ.
    fn mismatch(&self, who: &str, expected: &[u8], got: &[u8], offset: usize) {
        let n = self.mismatches.fetch_add(1, Relaxed);
        if n < 20 {
            let at = expected
                .iter()
                .zip(got)
                .position(|(a, b)| a != b)
                .unwrap_or(expected.len().min(got.len()));
            let snip = |v: &[u8]| {
                let s = at.saturating_sub(16);
                String::from_utf8_lossy(&v[s..(at + 16).min(v.len())]).into_owned()
            };
            eprintln!(
                "[soak_client] WRONG REPLY #{}: {who}: stream offset {}, expected {} bytes, got {}: \
                 expected {:?}, got {:?}",
                n + 1,
                offset + at,
                expected.len(),
                got.len(),
                snip(expected),
                snip(got)
            );
        }
    }
}

/// xorshift64*: enough randomness for load shapes, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const UTF8_PIECES: [&str; 10] = [
    "hello",
    "e\u{301}",
    "漢字",
    "👨‍👩‍👧‍👦",
    "👍🏽",
    "🇫🇷",
    "नमस्ते",
    "ñ ",
    "a\u{308}\u{332}",
    "\u{1F600}",
];

/// One line's content (no LF) of a random kind and length.
fn random_content(rng: &mut Rng, max_line: usize) -> Vec<u8> {
    let len = match rng.range(0, 99) {
        0..=4 => 0,
        5..=69 => rng.range(1, 100),
        70..=97 => rng.range(100, 8000),
        // Longer than the server's max line: answered in segments.
        _ => rng.range(max_line as u64 + 1, max_line as u64 * 3 / 2 + 2),
    } as usize;
    let mut v = Vec::with_capacity(len + 8);
    match rng.range(0, 2) {
        0 => {
            while v.len() < len {
                v.push(rng.range(0x20, 0x7E) as u8);
            }
        }
        1 => {
            while v.len() < len {
                v.extend_from_slice(UTF8_PIECES[rng.range(0, 9) as usize].as_bytes());
            }
        }
        _ => {
            while v.len() < len {
                let b = rng.next() as u8;
                v.push(if b == b'\n' { 0xFF } else { b });
            }
            if let Some(f) = v.first_mut() {
                *f = 0xC3; // a lead byte, rarely followed by a valid continuation
            }
        }
    }
    v
}

fn connect(ports: &[u16], rng: &mut Rng) -> io::Result<TcpStream> {
    let port = ports[rng.range(0, ports.len() as u64 - 1) as usize];
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Reads exactly `n` bytes, or fails (timeout, reset, early EOF).
fn read_n(s: &mut TcpStream, n: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// Writes `data` in random-sized pieces (sometimes 1–3 bytes, to cut UTF-8
/// sequences and CR LF pairs across TCP segments).
fn write_pieces(s: &mut TcpStream, data: &[u8], rng: &mut Rng) -> io::Result<()> {
    let mut rest = data;
    while !rest.is_empty() {
        let n = if rng.chance(10) {
            rng.range(1, 3)
        } else {
            rng.range(1, 65536)
        } as usize;
        let n = n.min(rest.len());
        s.write_all(&rest[..n])?;
        rest = &rest[n..];
    }
    Ok(())
}

fn pipeliner(id: u64, args: &Args, stats: &Stats, deadline: Instant) {
    let mut rng = Rng::new(0x5011 + id);
    let who = format!("pipeliner {id}");
    while Instant::now() < deadline {
        let mut s = match connect(&args.ports, &mut rng) {
            Ok(s) => s,
            Err(e) => {
                stats.error(&who, format_args!("connect: {e}"));
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(20)));
        let batches = rng.range(1, 20);
        let mut offset = 0usize;
        let mut ok = true;
        for _ in 0..batches {
            if Instant::now() >= deadline {
                break;
            }
            // Up to 200 lines, at most ~512 KiB: below the server's 1 MiB
            // high-water mark, so writing it all before reading cannot
            // deadlock.
            let mut batch = Vec::new();
            let mut lines = 0;
            for _ in 0..rng.range(1, 200) {
                let c = random_content(&mut rng, args.max_line);
                if !batch.is_empty() && batch.len() + c.len() > 512 * 1024 {
                    break;
                }
                batch.extend_from_slice(&c);
                batch.extend_from_slice(if rng.chance(20) { b"\r\n" } else { b"\n" });
                lines += 1;
            }
            let expected = reverse_stream(&batch, args.max_line);
            if let Err(e) = write_pieces(&mut s, &batch, &mut rng) {
                stats.error(&who, format_args!("write: {e}"));
                ok = false;
                break;
            }
            match read_n(&mut s, expected.len()) {
                Ok(got) if got == expected => {
                    stats.pipe_lines.fetch_add(lines, Relaxed);
                    stats.pipe_bytes.fetch_add(batch.len() as u64, Relaxed);
                }
                Ok(got) => {
                    stats.mismatch(&who, &expected, &got, offset);
                    ok = false;
                    break;
                }
                Err(e) => {
                    stats.error(&who, format_args!("read {} bytes: {e}", expected.len()));
                    ok = false;
                    break;
                }
            }
            offset += expected.len();
        }
        if ok && rng.chance(30) {
            // An unterminated last line and a half-close: answered without a
            // terminator, then the server closes.
            let c = random_content(&mut rng, args.max_line);
            let expected = reverse_stream(&c, args.max_line);
            let r = write_pieces(&mut s, &c, &mut rng).and_then(|()| s.shutdown(Shutdown::Write));
            if let Err(e) = r {
                stats.error(&who, format_args!("half-close write: {e}"));
                continue;
            }
            let mut got = Vec::new();
            match s.read_to_end(&mut got) {
                Ok(_) if got == expected => {
                    stats.pipe_halfclose.fetch_add(1, Relaxed);
                }
                Ok(_) => stats.mismatch(&format!("{who} (half-close)"), &expected, &got, offset),
                Err(e) => stats.error(&who, format_args!("half-close read: {e}")),
            }
        }
    }
}

/// What a flooder does once it has pushed its bytes.
enum FloodEnd {
    Verify,
    Close,
    Reset,
}

fn flooder(id: u64, args: &Args, stats: &Stats, deadline: Instant) {
    let mut rng = Rng::new(0xF100D + id);
    let who = format!("flooder {id}");
    let chunk_len = 64 * 1024;
    while Instant::now() < deadline {
        let mut s = match connect(&args.ports, &mut rng) {
            Ok(s) => s,
            Err(e) => {
                stats.error(&who, format_args!("connect: {e}"));
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        stats.flood_conns.fetch_add(1, Relaxed);
        // One ASCII line repeated: its reply is known without buffering the
        // whole stream.
        let content: Vec<u8> = (0..rng.range(1, 4000))
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        let mut unit = content.clone();
        unit.push(b'\n');
        let mut chunk = Vec::with_capacity(chunk_len + unit.len());
        while chunk.len() < chunk_len {
            chunk.extend_from_slice(&unit);
        }
        let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
        // Push until flood_bytes, a stall of 3 s (flow control) or the deadline.
        let mut sent: u64 = 0;
        let mut stalled_since: Option<Instant> = None;
        let mut failed = false;
        while sent < args.flood_bytes && Instant::now() < deadline {
            // Continue the line stream exactly where the last write stopped.
            let start = (sent % unit.len() as u64) as usize;
            let want = ((args.flood_bytes - sent) as usize).min(chunk.len() - start);
            match s.write(&chunk[start..start + want]) {
                Ok(n) => {
                    sent += n as u64;
                    stats.flood_sent.fetch_add(n as u64, Relaxed);
                    stalled_since = None;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    let t = *stalled_since.get_or_insert_with(Instant::now);
                    if t.elapsed() >= Duration::from_secs(3) {
                        stats.flood_stalls.fetch_add(1, Relaxed);
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    stats.error(&who, format_args!("write after {sent} bytes: {e}"));
                    failed = true;
                    break;
                }
            }
        }
        stats.flood_max_unread.fetch_max(sent, Relaxed);
        if failed {
            continue;
        }
        let end = match rng.range(0, 3) {
            0 | 1 => FloodEnd::Verify,
            2 => FloodEnd::Close,
            _ => FloodEnd::Reset,
        };
        match end {
            FloodEnd::Close => drop(s),
            FloodEnd::Reset => {
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                drop(s);
            }
            FloodEnd::Verify => {
                if let Err(e) = s.shutdown(Shutdown::Write) {
                    stats.error(&who, format_args!("shutdown: {e}"));
                    continue;
                }
                // Every line comes back reversed, then the unterminated tail
                // (a prefix of the line) reversed, then EOF.
                let full = sent / unit.len() as u64 * unit.len() as u64;
                let tail = (sent - full) as usize;
                let mut rev_unit: Vec<u8> = content.iter().rev().copied().collect();
                rev_unit.push(b'\n');
                let rev_tail: Vec<u8> = content[..tail].iter().rev().copied().collect();
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                match verify_flood(&mut s, &rev_unit, full, &rev_tail, deadline) {
                    Ok(()) => {
                        stats.flood_verified.fetch_add(sent, Relaxed);
                    }
                    Err(FloodErr::Io(at, e)) => {
                        stats.error(&who, format_args!("reading replies at {at}/{sent}: {e}"))
                    }
                    Err(FloodErr::Wrong(at, exp, got)) => {
                        stats.mismatch(&who, &exp, &got, at as usize);
                    }
                }
            }
        }
    }
}

enum FloodErr {
    Io(u64, io::Error),
    Wrong(u64, Vec<u8>, Vec<u8>),
}

/// Reads the replies to a flood and checks every byte, then EOF.
fn verify_flood(
    s: &mut TcpStream,
    rev_unit: &[u8],
    full: u64,
    rev_tail: &[u8],
    deadline: Instant,
) -> Result<(), FloodErr> {
    let total = full + rev_tail.len() as u64;
    let mut at: u64 = 0;
    let mut buf = vec![0u8; 256 * 1024];
    // Allow the drain some time past the deadline, bounded.
    let hard = deadline + Duration::from_secs(60);
    loop {
        if Instant::now() > hard {
            return Err(FloodErr::Io(
                at,
                io::Error::new(ErrorKind::TimedOut, "drain past the deadline"),
            ));
        }
        let n = match s.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(FloodErr::Io(at, e)),
        };
        if n == 0 {
            if at == total {
                return Ok(());
            }
            return Err(FloodErr::Io(
                at,
                io::Error::new(ErrorKind::UnexpectedEof, format!("EOF, expected {total}")),
            ));
        }
        for (i, &b) in buf[..n].iter().enumerate() {
            let pos = at + i as u64;
            let want = if pos < full {
                Some(rev_unit[(pos % rev_unit.len() as u64) as usize])
            } else {
                rev_tail.get((pos - full) as usize).copied()
            };
            if want != Some(b) {
                let exp: Vec<u8> = want.into_iter().collect();
                return Err(FloodErr::Wrong(pos, exp, vec![b]));
            }
        }
        at += n as u64;
    }
}

fn resetter(id: u64, args: &Args, stats: &Stats, deadline: Instant) {
    let mut rng = Rng::new(0x4E5E7 + id);
    let who = format!("resetter {id}");
    while Instant::now() < deadline {
        let mut s = match connect(&args.ports, &mut rng) {
            Ok(s) => s,
            Err(e) => {
                stats.error(&who, format_args!("connect: {e}"));
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = s.set_write_timeout(Some(Duration::from_millis(300)));
        let target = rng.range(1, 2_000_000);
        let mut sent = 0u64;
        while sent < target {
            let c = random_content(&mut rng, args.max_line);
            let mut line = c;
            line.push(b'\n');
            // Stop quietly at a stall (flow control) or an error.
            if s.write_all(&line).is_err() {
                break;
            }
            sent += line.len() as u64;
        }
        // Sometimes cut a line in the middle before resetting.
        if rng.chance(50) {
            let _ = s.write(b"half a li");
        }
        thread::sleep(Duration::from_millis(rng.range(0, 200)));
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        drop(s);
        stats.resets.fetch_add(1, Relaxed);
    }
}

fn churner(id: u64, args: &Args, stats: &Stats, deadline: Instant) {
    let mut rng = Rng::new(0xC4124 + id);
    let who = format!("churner {id}");
    let per_thread = (args.churn_rate / args.churners.max(1) as u64).max(1);
    let period = Duration::from_secs(1) / per_thread as u32;
    let mut next = Instant::now();
    let mut n: u64 = 0;
    while Instant::now() < deadline {
        next += period;
        n += 1;
        match churn_once(id, n, args, &mut rng) {
            Ok((exp, got)) if exp == got => {
                stats.churn_ok.fetch_add(1, Relaxed);
            }
            Ok((exp, got)) => stats.mismatch(&who, &exp, &got, 0),
            Err(e) => stats.error(&who, e),
        }
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

/// One churn connection: connect, one line, read the reply, close.
/// Returns (expected, received).
fn churn_once(id: u64, n: u64, args: &Args, rng: &mut Rng) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut s = connect(&args.ports, rng)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let line = format!("churn {id} {n} é👍🏽\n");
    s.write_all(line.as_bytes())?;
    let expected = reverse_stream(line.as_bytes(), args.max_line);
    let got = read_n(&mut s, expected.len())?;
    Ok((expected, got))
}

/// Opens `args.idle` connections and watches them until the deadline: the
/// server must neither close nor write to a connection that sent nothing.
fn idle(args: &Args, stats: &Stats, deadline: Instant) {
    use mio::{Events, Interest, Poll, Token};
    let mut rng = Rng::new(0x1D1E);
    let who = "idle";
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            stats.error(who, format_args!("epoll: {e}"));
            return;
        }
    };
    let mut conns: Vec<Option<mio::net::TcpStream>> = Vec::with_capacity(args.idle);
    while conns.len() < args.idle && Instant::now() < deadline {
        let mut s = match connect(&args.ports, &mut rng) {
            Ok(s) => s,
            Err(e) => {
                stats.error(who, format_args!("connect #{}: {e}", conns.len()));
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if args.warm {
            let line = b"warm up this connection\n";
            let r = s
                .set_read_timeout(Some(Duration::from_secs(10)))
                .and_then(|()| {
                    s.write_all(line)?;
                    read_n(&mut s, line.len())
                });
            match r {
                Ok(got) if got == reverse_stream(line, args.max_line) => {}
                Ok(got) => stats.mismatch(who, &reverse_stream(line, args.max_line), &got, 0),
                Err(e) => stats.error(who, format_args!("warm-up: {e}")),
            }
        }
        if let Err(e) = s.set_nonblocking(true) {
            stats.error(who, format_args!("nonblocking: {e}"));
            continue;
        }
        let mut s = mio::net::TcpStream::from_std(s);
        let token = Token(conns.len());
        if let Err(e) = poll.registry().register(&mut s, token, Interest::READABLE) {
            stats.error(who, format_args!("register: {e}"));
            continue;
        }
        conns.push(Some(s));
        stats.idle_open.fetch_add(1, Relaxed);
    }
    stats.ready.store(1, Relaxed);
    let mut events = Events::with_capacity(1024);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = poll.poll(&mut events, Some(left.min(Duration::from_secs(1)))) {
            if e.kind() != ErrorKind::Interrupted {
                stats.error(who, format_args!("poll: {e}"));
            }
            continue;
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(s) = conns[i].as_mut() else { continue };
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        stats.error(who, format_args!("connection {i} closed by the server"));
                        stats.idle_lost.fetch_add(1, Relaxed);
                        stats.idle_open.fetch_sub(1, Relaxed);
                        conns[i] = None;
                        break;
                    }
                    Ok(n) => {
                        stats.error(who, format_args!("connection {i}: {n} unexpected bytes"));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        stats.error(who, format_args!("connection {i}: {e}"));
                        stats.idle_lost.fetch_add(1, Relaxed);
                        stats.idle_open.fetch_sub(1, Relaxed);
                        conns[i] = None;
                        break;
                    }
                }
            }
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit.
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn write_stats(path: &PathBuf, stats: &Stats) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, stats.line() + "\n").is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

fn main() {
    let args = Arc::new(Args::parse());
    raise_nofile();
    let stats = Arc::new(Stats::default());
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.secs);
    let mut handles = Vec::new();
    let spawn =
        |handles: &mut Vec<thread::JoinHandle<()>>, f: fn(u64, &Args, &Stats, Instant), id: u64| {
            let (a, s) = (Arc::clone(&args), Arc::clone(&stats));
            handles.push(thread::spawn(move || f(id, &a, &s, deadline)));
        };
    {
        let (a, s) = (Arc::clone(&args), Arc::clone(&stats));
        handles.push(thread::spawn(move || idle(&a, &s, deadline)));
    }
    if args.mode == Mode::Soak {
        for i in 0..args.pipeliners {
            spawn(&mut handles, pipeliner, i as u64);
        }
        for i in 0..args.flooders {
            spawn(&mut handles, flooder, i as u64);
        }
        for i in 0..args.resetters {
            spawn(&mut handles, resetter, i as u64);
        }
        for i in 0..args.churners {
            spawn(&mut handles, churner, i as u64);
        }
    }
    // Counters four times a second until every load thread has stopped.
    while handles.iter().any(|h| !h.is_finished()) {
        write_stats(&args.stats, &stats);
        thread::sleep(Duration::from_millis(250));
    }
    for h in handles {
        if h.join().is_err() {
            stats.error("main", "a load thread panicked");
        }
    }
    write_stats(&args.stats, &stats);
    println!("{}", stats.line());
    let bad = stats.errors.load(Relaxed) + stats.mismatches.load(Relaxed);
    std::process::exit(if bad == 0 { 0 } else { 1 });
}
