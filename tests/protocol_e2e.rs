//! End-to-end tests of the reversal protocol (SPEC §2) and of the connection
//! behaviour that protects it (SPEC §3): the real `xps` binary on ephemeral
//! loopback ports, real sockets, exact bytes.
//!
//! The reference for every reply is `expected()`, the library's pure protocol
//! module; the cases that pin the protocol's rules down also carry hand-written
//! expected bytes, so a bug shared by the server and the reference is caught.

mod common;
use common::*;

use std::io::{ErrorKind, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// The server's default `--max-line`.
const DEFAULT_MAX_LINE: usize = 100_000;

// ---------------------------------------------------------------------------
// Deterministic input
// ---------------------------------------------------------------------------

/// splitmix64: small, deterministic, good enough to vary inputs.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

const ASCII: &[&[u8]] = &[
    b"a", b"b", b"c", b"x", b"y", b"z", b"A", b"Q", b"0", b"7", b"9", b" ", b"!", b"~", b"\t",
    b"\r", b"-",
];
const UTF8: &[&str] = &[
    "\u{e9}",                                      // é, precomposed
    "e\u{301}",                                    // e + combining acute
    "\u{4e2d}",                                    // 中
    "\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}", // family (ZWJ sequence)
    "\u{1F1EE}\u{1F1F3}",                          // flag: regional indicators
    "\u{1F44D}\u{1F3FD}",                          // thumbs up + skin tone
    "\u{3b1}",                                     // α
];
const INVALID: &[&[u8]] = &[b"\xff", b"\xfe", b"\xc3", b"\x80", b"\x00", b"\xe2\x82"];

/// One random line of at most about `max_pieces` pieces, with its terminator:
/// ASCII only, valid UTF-8, or containing invalid UTF-8 / NUL bytes; ending in
/// LF or CR LF.
fn random_line(rng: &mut Rng, max_pieces: usize, out: &mut Vec<u8>) {
    let n = rng.below(max_pieces + 1);
    let mode = rng.below(20);
    for _ in 0..n {
        match (mode, rng.below(4)) {
            (0..=11, _) | (_, 0 | 1) => out.extend_from_slice(rng.pick(ASCII)),
            (12..=16, _) => out.extend_from_slice(rng.pick(UTF8).as_bytes()),
            _ => {
                if rng.below(2) == 0 {
                    out.extend_from_slice(rng.pick(INVALID))
                } else {
                    out.extend_from_slice(rng.pick(UTF8).as_bytes())
                }
            }
        }
    }
    if rng.below(5) == 0 {
        out.extend_from_slice(b"\r\n");
    } else {
        out.push(b'\n');
    }
}

/// `lines` random lines.
fn random_lines(rng: &mut Rng, lines: usize, max_pieces: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..lines {
        random_line(rng, max_pieces, &mut out);
    }
    out
}

// ---------------------------------------------------------------------------
// Socket helpers
// ---------------------------------------------------------------------------

/// Sends `input` in chunks whose sizes are drawn from `lo..=hi` (sleeping a
/// little now and then so that the chunks really arrive in separate reads),
/// half-closes, and returns everything received until the server closes.
fn roundtrip_chunked(port: u16, input: &[u8], seed: u64, lo: usize, hi: usize) -> Vec<u8> {
    let mut s = connect(port);
    let mut w = s.try_clone().unwrap();
    let input = input.to_vec();
    let writer = thread::spawn(move || {
        let mut rng = Rng::new(seed);
        let mut at = 0;
        while at < input.len() {
            let n = rng.range(lo, hi).min(input.len() - at);
            w.write_all(&input[at..at + n]).unwrap();
            at += n;
            // Now and then a pause (rarer for tiny chunks, to bound the
            // run time), so the chunks reach the server in separate reads.
            if rng.below(if hi < 100 { 512 } else { 16 }) == 0 {
                thread::sleep(Duration::from_millis(1));
            }
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let out = read_to_end(&mut s);
    writer.join().unwrap();
    out
}

/// Asserts two byte strings are equal, showing where they first differ
/// rather than dumping megabytes.
#[track_caller]
fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    if actual == expected {
        return;
    }
    let at = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(actual.len().min(expected.len()));
    let lo = at.saturating_sub(40);
    panic!(
        "{what}: replies differ at byte {at} (got {} bytes, expected {})\n  got:      {:?}\n  expected: {:?}",
        actual.len(),
        expected.len(),
        String::from_utf8_lossy(&actual[lo..(at + 40).min(actual.len())]),
        String::from_utf8_lossy(&expected[lo..(at + 40).min(expected.len())]),
    );
}

/// Sends `line` and reads exactly its reply (request/response use).
fn ask(s: &mut TcpStream, line: &[u8], max_line: usize) {
    let want = expected(line, max_line);
    s.write_all(line).unwrap();
    let got = read_exact_n(s, want.len());
    assert_bytes_eq(&got, &want, "request/response reply");
}

/// Half-closes `s` and asserts the server sends nothing more and closes.
#[track_caller]
fn assert_nothing_more_then_eof(s: &mut TcpStream) {
    s.shutdown(Shutdown::Write).unwrap();
    let rest = read_to_end(s);
    assert!(
        rest.is_empty(),
        "unexpected extra bytes after the last reply: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

/// Asserts the server process is still running.
#[track_caller]
fn assert_alive(server: &mut Server) {
    if let Some(st) = server.child.try_wait().unwrap() {
        panic!("xps exited ({st}); log: {:?}", server.drain_log().to_vec());
    }
}

/// Closes `s` with an RST (SO_LINGER 0), not a FIN.
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

// ---------------------------------------------------------------------------
// Scenarios (each test runs one on its own server; the last test runs them all
// on one server)
// ---------------------------------------------------------------------------

/// Random lines to every port at once, each checked exactly; then one
/// connection per port used in lock step.
fn scenario_all_ports(ports: &[u16], max_line: usize) {
    let workers: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(i, &port)| {
            thread::spawn(move || {
                let mut rng = Rng::new(0x5EED_0000 + i as u64);
                let input = random_lines(&mut rng, 3000, 40);
                let got = roundtrip_half_close(port, &input);
                assert_bytes_eq(&got, &expected(&input, max_line), &format!("port {port}"));
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    // Interleaved: a line to every port, then every reply.
    let mut conns: Vec<TcpStream> = ports.iter().map(|&p| connect(p)).collect();
    let mut rng = Rng::new(42);
    for round in 0..100 {
        let lines: Vec<Vec<u8>> = (0..conns.len())
            .map(|i| {
                let mut l = format!("round {round} port#{i} ").into_bytes();
                random_line(&mut rng, 20, &mut l);
                l
            })
            .collect();
        for (c, l) in conns.iter_mut().zip(&lines) {
            c.write_all(l).unwrap();
        }
        for (c, l) in conns.iter_mut().zip(&lines) {
            let want = expected(l, max_line);
            assert_bytes_eq(&read_exact_n(c, want.len()), &want, "interleaved ports");
        }
    }
    for c in &mut conns {
        assert_nothing_more_then_eof(c);
    }
}

/// `clients` simultaneous clients, each doing request/response round trips
/// and then a pipelined bulk transfer, each checking its own replies.
fn scenario_many_clients(port: u16, clients: usize, max_line: usize) {
    let barrier = Arc::new(Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|id| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut rng = Rng::new(0xC11E_0000 + id as u64);
                let mut s = connect(port);
                barrier.wait();
                for i in 0..200 {
                    let mut line = format!("client {id} line {i}: ").into_bytes();
                    random_line(&mut rng, 30, &mut line);
                    ask(&mut s, &line, max_line);
                }
                assert_nothing_more_then_eof(&mut s);
                let mut input = format!("client {id} bulk\n").into_bytes();
                input.extend(random_lines(&mut rng, 2000, 60));
                let got = roundtrip_chunked(port, &input, id as u64, 1, 4000);
                assert_bytes_eq(&got, &expected(&input, max_line), &format!("client {id}"));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Clients that reset their connection at awkward moments, while two others
/// keep being served; then a new client is served.
fn scenario_resets(server: &mut Server, max_line: usize) {
    let port = server.port();
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let bystanders: Vec<_> = (0..2)
        .map(|id| {
            let stop = stop.clone();
            let count = counts[id].clone();
            thread::spawn(move || {
                let mut rng = Rng::new(0xB157_0000 + id as u64);
                let mut s = connect(port);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut line = format!("bystander {id} #{i} ").into_bytes();
                    random_line(&mut rng, 30, &mut line);
                    ask(&mut s, &line, max_line);
                    i += 1;
                    count.fetch_add(1, Ordering::Relaxed);
                }
                assert_nothing_more_then_eof(&mut s);
            })
        })
        .collect();
    let wait_progress = |counts: &[Arc<AtomicUsize>], by: usize| {
        let start: Vec<usize> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        while counts
            .iter()
            .zip(&start)
            .any(|(c, &s)| c.load(Ordering::Relaxed) < s + by)
        {
            assert!(Instant::now() < deadline, "bystanders stopped being served");
            thread::sleep(Duration::from_millis(5));
        }
    };
    wait_progress(&counts, 10);

    // 1. Reset straight after connecting.
    reset(connect(port));
    // 2. Reset in the middle of a line.
    let mut s = connect(port);
    s.write_all(b"half a li").unwrap();
    reset(s);
    // 3. Reset with a lot of replies still pending: 256 KiB of lines sent,
    //    only the first KiB of replies read.
    let mut rng = Rng::new(7);
    let mut input = Vec::new();
    while input.len() < 256 * 1024 {
        random_line(&mut rng, 60, &mut input);
    }
    let want = expected(&input, max_line);
    let mut s = connect(port);
    s.write_all(&input).unwrap();
    s.write_all(b"and an unterminated tail").unwrap();
    let got = read_exact_n(&mut s, 1024);
    assert_bytes_eq(&got, &want[..1024], "prefix before the reset");
    reset(s);
    // 4. Reset by a client that never read anything, with a full pipe.
    let mut s = connect(port);
    s.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let blob = vec![b'x'; 64 * 1024];
    let line_blob: Vec<u8> = blob.iter().chain(b"\n").copied().collect();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match s.write(&line_blob) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    reset(s);

    // The bystanders go on being served after every reset.
    wait_progress(&counts, 20);
    stop.store(true, Ordering::Relaxed);
    for b in bystanders {
        b.join().unwrap();
    }
    assert_alive(server);
    // And a new client is served.
    let got = roundtrip_half_close(port, b"after the resets\nok");
    assert_eq!(got, b"steser eht retfa\nko");
}

/// A line written one byte per `write`, with pauses: exactly one reply.
fn scenario_byte_by_byte(port: u16) {
    let cases: [(&[u8], &[u8]); 4] = [
        (b"hello, world\n", b"dlrow ,olleh\n"),
        (
            "he\u{301}llo \u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}!\n".as_bytes(),
            "!\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467} olle\u{301}h\n".as_bytes(),
        ),
        (b"crlf\r\n", b"flrc\r\n"),
        (b"\xff\xfe\x00z\n", b"z\x00\xfe\xff\n"),
    ];
    let mut s = connect(port);
    for (input, want) in cases {
        for (i, b) in input.iter().enumerate() {
            s.write_all(&[*b]).unwrap();
            s.flush().unwrap();
            thread::sleep(Duration::from_millis(2));
            if i + 2 == input.len() {
                // Everything but the LF is there: no reply may have come yet.
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let mut buf = [0u8; 64];
                match read_once(&mut s, &mut buf) {
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Ok(n) => panic!(
                        "reply before the line was complete: {:?}",
                        String::from_utf8_lossy(&buf[..n])
                    ),
                    Err(e) => panic!("read: {e}"),
                }
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            }
        }
        let got = read_exact_n(&mut s, want.len());
        assert_bytes_eq(&got, want, "byte-by-byte line");
    }
    assert_nothing_more_then_eof(&mut s);
}

/// 1000 lines in one `write_all`: 1000 replies, in order.
fn scenario_pipelined(port: u16, max_line: usize) {
    let mut input = Vec::new();
    let mut want = Vec::new();
    for i in 0..1000 {
        let line = format!("line {i:04} of the pipeline");
        input.extend_from_slice(line.as_bytes());
        input.push(b'\n');
        want.extend(line.bytes().rev());
        want.push(b'\n');
    }
    assert_eq!(expected(&input, max_line), want, "reference disagrees");
    let mut s = connect(port);
    s.write_all(&input).unwrap();
    let got = read_exact_n(&mut s, want.len());
    assert_bytes_eq(&got, &want, "pipelined replies");
    assert_nothing_more_then_eof(&mut s);
}

/// Hand-written cases: (input, exact reply), all on one connection.
fn exact_cases() -> Vec<(Vec<u8>, Vec<u8>)> {
    let v = |a: &[u8], b: &[u8]| (a.to_vec(), b.to_vec());
    let s = |a: &str, b: &str| (a.as_bytes().to_vec(), b.as_bytes().to_vec());
    vec![
        // Terminators (test 6).
        v(b"abc\n", b"cba\n"),
        v(b"abc\r\n", b"cba\r\n"),
        v(b"\n", b"\n"),
        v(b"\r\n", b"\r\n"),
        v(b"ab\ncd\r\nef\n\r\n\ngh\r\n", b"ba\ndc\r\nfe\n\r\n\nhg\r\n"),
        v(b"a\rb\n", b"b\ra\n"), // a lone CR is content
        v(b"\r\r\n", b"\r\r\n"), // CR content + CR LF
        v(b"x\r\ry\r\n", b"y\r\rx\r\n"),
        // Graphemes (test 7).
        s("he\u{301}llo\n", "olle\u{301}h\n"),
        s("h\u{e9}llo\n", "oll\u{e9}h\n"),
        s(
            "ab\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}\u{200D}\u{1F466}cd\n",
            "dc\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}\u{200D}\u{1F466}ba\n",
        ),
        s(
            "\u{1F1EE}\u{1F1F3}\u{1F1FA}\u{1F1F8}\r\n",
            "\u{1F1FA}\u{1F1F8}\u{1F1EE}\u{1F1F3}\r\n",
        ),
        s("\u{4e2d}\u{6587}!\n", "!\u{6587}\u{4e2d}\n"),
        // Invalid UTF-8 and NUL: byte by byte (test 7).
        v(b"\xff\xfeab\n", b"ba\xfe\xff\n"),
        v(b"\xc3\xa9\xff\n", b"\xff\xa9\xc3\n"), // valid é + invalid byte
        v(b"\xe2\x82\n", b"\x82\xe2\n"),         // truncated sequence
        v(b"a\x00b\n", b"b\x00a\n"),
        v(b"\x00\x00\x01\r\n", b"\x01\x00\x00\r\n"),
    ]
}

fn scenario_exact_cases(port: u16, max_line: usize) {
    let cases = exact_cases();
    // One at a time, request/response.
    let mut s = connect(port);
    for (input, want) in &cases {
        assert_eq!(&expected(input, max_line), want, "reference disagrees");
        s.write_all(input).unwrap();
        let got = read_exact_n(&mut s, want.len());
        assert_bytes_eq(
            &got,
            want,
            &format!("input {:?}", String::from_utf8_lossy(input)),
        );
    }
    assert_nothing_more_then_eof(&mut s);
    // All at once.
    let input: Vec<u8> = cases.iter().flat_map(|c| c.0.clone()).collect();
    let want: Vec<u8> = cases.iter().flat_map(|c| c.1.clone()).collect();
    assert_bytes_eq(
        &roundtrip_half_close(port, &input),
        &want,
        "all cases at once",
    );
}

/// Half-close with an unterminated last line.
fn scenario_half_close(port: u16) {
    let cases: [(&[u8], &[u8]); 5] = [
        (b"abc\ndef", b"cba\nfed"),
        (b"", b""),
        (b"lonely", b"ylenol"),
        (b"x\r", b"\rx"), // a CR without LF is content, not a terminator
        (
            "a\u{1F44D}\u{1F3FD}b".as_bytes(),
            "b\u{1F44D}\u{1F3FD}a".as_bytes(),
        ),
    ];
    for (input, want) in cases {
        // roundtrip_half_close reads until EOF: the server must close.
        assert_eq!(expected(input, DEFAULT_MAX_LINE), want, "reference");
        let got = roundtrip_half_close(port, input);
        assert_bytes_eq(&got, want, &format!("{:?}", String::from_utf8_lossy(input)));
    }
    // The terminated reply arrives before the half-close; the unterminated
    // one only after it; then EOF.
    let mut s = connect(port);
    s.write_all(b"abc\ndef").unwrap();
    assert_eq!(read_exact_n(&mut s, 4), b"cba\n");
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut s), b"fed");
}

/// `--max-line 16`: overlong lines come back in 16-byte segments.
fn scenario_overlong_16(port: u16) {
    const M: usize = 16;
    let forty = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd";
    assert_eq!(forty.len(), 40);
    let mut line = forty.to_vec();
    line.push(b'\n');
    let hand: &[u8] = b"PONMLKJIHGFEDCBA543210ZYXWVUTSRQdcba9876\n";
    assert_eq!(expected(&line, M), hand, "reference disagrees");
    let mut s = connect(port);
    s.write_all(&line).unwrap();
    assert_bytes_eq(&read_exact_n(&mut s, hand.len()), hand, "40-byte line");
    // The first two segments go out as soon as they fill, before the LF.
    s.write_all(forty).unwrap();
    assert_bytes_eq(
        &read_exact_n(&mut s, 32),
        &hand[..32],
        "segments before the LF",
    );
    s.write_all(b"\n").unwrap();
    assert_bytes_eq(&read_exact_n(&mut s, 9), &hand[32..], "tail after the LF");
    // Boundaries: exactly 16, 17, 32 bytes; 16 bytes + CR LF; 15 + CR LF.
    let cases: [(&[u8], &[u8]); 5] = [
        (b"0123456789abcdef\n", b"fedcba9876543210\n"),
        (b"0123456789abcdefg\n", b"fedcba9876543210g\n"),
        (
            b"0123456789abcdef0123456789ABCDEF\n",
            b"fedcba9876543210FEDCBA9876543210\n",
        ),
        (b"0123456789abcdef\r\n", b"fedcba9876543210\r\n"),
        (b"0123456789abcde\r\n", b"edcba9876543210\r\n"),
    ];
    for (input, want) in cases {
        assert_eq!(expected(input, M), want, "reference disagrees");
        s.write_all(input).unwrap();
        let got = read_exact_n(&mut s, want.len());
        assert_bytes_eq(&got, want, &format!("{:?}", String::from_utf8_lossy(input)));
    }
    assert_nothing_more_then_eof(&mut s);
    // Random overlong lines (UTF-8 cut mid-character included), whole and
    // split byte-wise into random chunks.
    let mut rng = Rng::new(16);
    let input = random_lines(&mut rng, 300, 30);
    let want = expected(&input, M);
    assert_bytes_eq(&roundtrip_half_close(port, &input), &want, "random, max 16");
    assert_bytes_eq(
        &roundtrip_chunked(port, &input, 3, 1, 7),
        &want,
        "random chunked, max 16",
    );
}

/// `--max-line 1000`: an unterminated 1 MiB stream comes back segment by
/// segment while it is sent, the rest after the half-close, every byte once.
fn scenario_unterminated_1mb(port: u16) {
    const M: usize = 1000;
    const N: usize = 1 << 20;
    let mut rng = Rng::new(1000);
    let input: Vec<u8> = (0..N)
        .map(|_| match rng.below(256) as u8 {
            b'\n' => b'.',
            b => b,
        })
        .collect();
    let want = expected(&input, M);
    let mut s = connect(port);
    let mut w = s.try_clone().unwrap();
    let (half_close_tx, half_close_rx) = std::sync::mpsc::channel::<()>();
    let data = input.clone();
    let writer = thread::spawn(move || {
        w.write_all(&data).unwrap();
        half_close_rx.recv().unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    // Before the half-close, all full segments arrive: 1048 × 1000 bytes.
    let full = N / M * M;
    let early = read_exact_n(&mut s, full);
    half_close_tx.send(()).unwrap();
    let late = read_to_end(&mut s);
    writer.join().unwrap();
    assert_eq!(late.len(), N - full, "bytes after the half-close");
    let mut got = early;
    got.extend_from_slice(&late);
    assert_eq!(got.len(), N, "every byte comes back once");
    let mut a = got.clone();
    let mut b = input.clone();
    a.sort_unstable();
    b.sort_unstable();
    assert!(a == b, "the reply is not a permutation of the input");
    assert_bytes_eq(&got, &want, "1 MiB unterminated, max 1000");
}

/// Flow control: a client that writes without reading is paused, while
/// another client is served and memory stays bounded; every byte it sent is
/// answered once it reads.
fn scenario_flood(server: &mut Server, target: u64, write_deadline: Duration) {
    let port = server.port();
    // The flood is one line repeated: its reply is predictable byte for byte.
    let mut rng = Rng::new(99);
    let mut line: Vec<u8> = (0..99).map(|_| b'!' + rng.below(94) as u8).collect();
    line.push(b'\n');
    let period = line.len();
    let mut rline: Vec<u8> = line[..period - 1].iter().rev().copied().collect();
    rline.push(b'\n');
    let chunk: Arc<Vec<u8>> = Arc::new(line.iter().copied().cycle().take(period * 700).collect());

    let mut other = connect(port);
    ask(&mut other, b"warm up\n", DEFAULT_MAX_LINE);
    let baseline = server.rss_kib();

    let flood = connect(port);
    let mut w = flood.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let reading = Arc::new(AtomicBool::new(false));
    let writer = {
        let sent = sent.clone();
        let chunk = chunk.clone();
        let reading = reading.clone();
        thread::spawn(move || {
            let start = Instant::now();
            let mut total = 0u64;
            while total < target {
                // Only give up before the target once the reader runs, so
                // the stalled phase is always observed.
                if reading.load(Ordering::Relaxed) && start.elapsed() > write_deadline {
                    break;
                }
                let off = (total % period as u64) as usize;
                let end = chunk.len().min(off + (target - total) as usize);
                match w.write(&chunk[off..end]) {
                    Ok(0) => panic!("write returned 0"),
                    Ok(n) => {
                        total += n as u64;
                        sent.store(total, Ordering::Relaxed);
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => panic!("flood write: {e}"),
                }
            }
            w.shutdown(Shutdown::Write).unwrap();
            total
        })
    };

    // Wait until the flood stalls: nothing accepted for 1 s.
    let mut peak = baseline;
    let give_up = Instant::now() + Duration::from_secs(15);
    let mut last = (0, Instant::now());
    loop {
        thread::sleep(Duration::from_millis(50));
        peak = peak.max(server.rss_kib());
        let now = sent.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(1) {
            break;
        }
        assert!(
            Instant::now() < give_up && now < target,
            "the flood never stalled ({now} bytes accepted): the server keeps reading \
             from a client that does not read"
        );
    }
    let stalled_at = sent.load(Ordering::Relaxed);

    // While stalled, another client is served promptly, and a new one too.
    other
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    for i in 0..20 {
        let t = Instant::now();
        ask(
            &mut other,
            format!("still served {i}\n").as_bytes(),
            DEFAULT_MAX_LINE,
        );
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "round trip took {:?} during the flood",
            t.elapsed()
        );
        peak = peak.max(server.rss_kib());
    }
    let got = roundtrip_half_close(port, b"newcomer\n");
    assert_eq!(got, b"remocwen\n");
    peak = peak.max(server.rss_kib());
    assert!(
        peak < baseline + 64 * 1024,
        "server RSS grew from {baseline} KiB to {peak} KiB while a client did not read \
         ({stalled_at} bytes accepted)"
    );
    assert_nothing_more_then_eof(&mut other);

    // Now the flooder reads: every reply, in order, then EOF.
    let mut r = flood;
    r.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    reading.store(true, Ordering::Relaxed);
    let reader = thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        let mut first_mismatch: Option<u64> = None;
        let mut tail: Vec<u8> = Vec::with_capacity(2 * period);
        loop {
            let n = read_once(&mut r, &mut buf).expect("flood reply");
            if n == 0 {
                break;
            }
            for (i, &b) in buf[..n].iter().enumerate() {
                let at = total + i as u64;
                if first_mismatch.is_none() && b != rline[(at % period as u64) as usize] {
                    first_mismatch = Some(at);
                }
            }
            tail.extend_from_slice(&buf[n.saturating_sub(period)..n]);
            if tail.len() > period {
                tail.drain(..tail.len() - period);
            }
            total += n as u64;
        }
        (total, first_mismatch, tail)
    });
    let total_sent = writer.join().unwrap();
    let (received, first_mismatch, tail) = reader.join().unwrap();
    assert!(total_sent >= stalled_at);
    assert_eq!(
        received, total_sent,
        "the flooder sent {total_sent} bytes and got {received} back"
    );
    // Complete lines come back as the reversed line; a partial last line (the
    // writer may stop mid-line) as its reversed prefix.
    let partial = (total_sent % period as u64) as usize;
    let complete = total_sent - partial as u64;
    if let Some(at) = first_mismatch {
        assert!(
            at >= complete,
            "flood reply wrong at byte {at} of {received} (complete lines end at {complete})"
        );
    }
    if partial > 0 {
        let want: Vec<u8> = line[..partial].iter().rev().copied().collect();
        assert_eq!(
            &tail[tail.len() - partial..],
            &want[..],
            "reply to the partial line"
        );
    }
    eprintln!(
        "flood: stalled after {stalled_at} bytes, sent {total_sent} in all; RSS {baseline} -> peak {peak} KiB"
    );
}

/// The same random input in differently sized chunks gives the same bytes.
fn scenario_splitting(port: u16, max_line: usize) {
    let mut rng = Rng::new(0x5711_7000);
    let long_line = |rng: &mut Rng, out: &mut Vec<u8>| {
        for _ in 0..rng.range(100, 3000) {
            out.extend_from_slice(rng.pick(ASCII));
            out.extend_from_slice(rng.pick(UTF8).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    };
    // A small input for tiny chunks (each is a syscall and a wake-up) and a
    // large one for the rest; both with long lines, so that segmenting (when
    // max_line is small) is involved, and an unterminated tail.
    let mut small = random_lines(&mut rng, 200, 40);
    long_line(&mut rng, &mut small);
    small.extend(random_lines(&mut rng, 50, 40));
    let mut large = small.clone();
    large.extend(random_lines(&mut rng, 1500, 50));
    for _ in 0..3 {
        long_line(&mut rng, &mut large);
    }
    let tail = "unterminated \u{e9}nd".as_bytes();
    small.extend_from_slice(tail);
    large.extend_from_slice(tail);
    for (input, seed, lo, hi) in [
        (&small, 1, 1, 3),
        (&small, 2, 1, 100),
        (&large, 3, 50, 5000),
        (&large, 4, 1, 65536),
    ] {
        let want = expected(input, max_line);
        let got = roundtrip_chunked(port, input, seed, lo, hi);
        assert_bytes_eq(&got, &want, &format!("chunks of {lo}..={hi} bytes"));
    }
    let want = expected(&large, max_line);
    assert_bytes_eq(&roundtrip_half_close(port, &large), &want, "one write");
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn four_ports_serve_random_lines_at_once() {
    let mut server = Server::start_n(4, &[]);
    assert_eq!(server.ports.len(), 4);
    let mut distinct = server.ports.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        4,
        "ports {:?} are not distinct",
        server.ports
    );
    scenario_all_ports(&server.ports.clone(), DEFAULT_MAX_LINE);
    assert_alive(&mut server);
}

#[test]
fn ten_simultaneous_clients_get_their_own_replies() {
    let mut server = Server::start_n(1, &[]);
    scenario_many_clients(server.port(), 10, DEFAULT_MAX_LINE);
    assert_alive(&mut server);
}

#[test]
fn abrupt_disconnects_affect_only_that_client() {
    let mut server = Server::start_n(1, &[]);
    scenario_resets(&mut server, DEFAULT_MAX_LINE);
}

#[test]
fn line_split_byte_by_byte_gets_one_reply() {
    let server = Server::start_n(1, &[]);
    scenario_byte_by_byte(server.port());
}

#[test]
fn thousand_pipelined_lines_in_one_write() {
    let server = Server::start_n(1, &[]);
    scenario_pipelined(server.port(), DEFAULT_MAX_LINE);
}

#[test]
fn crlf_mixed_and_empty_lines() {
    let server = Server::start_n(1, &[]);
    let port = server.port();
    let cases: [(&[u8], &[u8]); 6] = [
        (b"abc\r\n", b"cba\r\n"),
        (b"\n", b"\n"),
        (b"\r\n", b"\r\n"),
        (b"one\ntwo\r\nthree\n", b"eno\nowt\r\neerht\n"),
        (b"\n\r\n\n\r\n", b"\n\r\n\n\r\n"),
        (b"a\rb\r\n", b"b\ra\r\n"),
    ];
    for (input, want) in cases {
        let got = roundtrip_half_close(port, input);
        assert_bytes_eq(&got, want, &format!("{:?}", String::from_utf8_lossy(input)));
    }
}

#[test]
fn graphemes_invalid_utf8_and_nul_bytes() {
    let server = Server::start_n(1, &[]);
    scenario_exact_cases(server.port(), DEFAULT_MAX_LINE);
}

#[test]
fn half_close_answers_the_unterminated_line_then_closes() {
    let server = Server::start_n(1, &[]);
    scenario_half_close(server.port());
}

#[test]
fn overlong_lines_come_back_in_max_line_segments() {
    let server = Server::start_n(1, &["--max-line", "16"]);
    scenario_overlong_16(server.port());
}

#[test]
fn unterminated_megabyte_comes_back_exactly_once() {
    let server = Server::start_n(1, &["--max-line", "1000"]);
    scenario_unterminated_1mb(server.port());
}

#[test]
fn flow_control_bounds_memory_and_keeps_others_served() {
    let mut server = Server::start_n(1, &[]);
    scenario_flood(&mut server, 200 << 20, Duration::from_secs(12));
    assert_alive(&mut server);
}

#[test]
fn replies_do_not_depend_on_tcp_splitting() {
    let server = Server::start_n(1, &[]);
    scenario_splitting(server.port(), DEFAULT_MAX_LINE);
    let small = Server::start_n(1, &["--max-line", "37"]);
    scenario_splitting(small.port(), 37);
}

/// Everything above against one server, which must still serve a fresh
/// connection afterwards.
#[test]
fn server_stays_up_after_everything() {
    const M: usize = 1000;
    // One listening port used twice where a scenario wants several (four
    // ports at once are the first test's job).
    let mut server = Server::start_n(1, &["--max-line", "1000"]);
    let port = server.port();
    let ports = [port, port];
    scenario_all_ports(&ports, M);
    scenario_many_clients(port, 10, M);
    scenario_resets(&mut server, M);
    scenario_byte_by_byte(port);
    scenario_pipelined(port, M);
    scenario_exact_cases(port, M);
    scenario_half_close(port);
    scenario_unterminated_1mb(port);
    scenario_splitting(ports[1], M);
    scenario_flood(&mut server, 64 << 20, Duration::from_secs(8));
    assert_alive(&mut server);
    assert_eq!(roundtrip_half_close(port, b"still here\n"), b"ereh llits\n");
    let mut s = connect(port);
    ask(&mut s, "fresh \u{1F44B}\r\n".as_bytes(), M);
    assert_nothing_more_then_eof(&mut s);
    assert_alive(&mut server);
}

/// Lines of grapheme clusters that take the server a moment to reverse.
fn slow_lines(bytes: usize) -> Vec<u8> {
    let mut blob = Vec::with_capacity(bytes + 64);
    let mut n = 0;
    while blob.len() < bytes {
        blob.extend_from_slice("e\u{301}\u{1F44D}\u{1F3FD}a".as_bytes());
        n += 1;
        if n % 200 == 0 {
            blob.push(b'\n');
        }
    }
    blob.push(b'\n');
    blob
}

/// A victim that streams `blob` while reading (and discarding) its replies,
/// so the server answers it straight away, then resets mid-stream.
fn streaming_victim(port: u16, blob: &[u8], reset_after: usize) {
    let mut v = connect(port);
    v.set_nonblocking(true).unwrap();
    let mut at = 0;
    let mut sink = vec![0u8; 256 * 1024];
    let deadline = Instant::now() + Duration::from_secs(10);
    while at < reset_after && Instant::now() < deadline {
        match v.write(&blob[at..(at + 16 * 1024).min(blob.len())]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("victim write: {e}"),
        }
        loop {
            match read_once(&mut v, &mut sink) {
                Ok(0) => panic!("server closed the victim"),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("victim read: {e}"),
            }
        }
    }
    reset(v);
}

/// Clients that reset while the server is answering them: their replies must
/// never reach another client (the loop's output buffer is shared).
#[test]
fn reset_during_reply_never_leaks_into_another_client() {
    let mut server = Server::start_n(1, &[]);
    let port = server.port();
    let stop = Arc::new(AtomicBool::new(false));
    let bystander = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut s = connect(port);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                ask(
                    &mut s,
                    format!("bystander {i}\n").as_bytes(),
                    DEFAULT_MAX_LINE,
                );
                i += 1;
            }
            assert_nothing_more_then_eof(&mut s);
            i
        })
    };
    let probe = |port: u16| {
        let mut p = connect(port);
        ask(&mut p, b"probe\n", DEFAULT_MAX_LINE);
        assert_nothing_more_then_eof(&mut p);
    };
    // 1. Streaming victims, reset with megabytes still queued at the server.
    let big = slow_lines(4 << 20);
    for round in 0..20 {
        streaming_victim(port, &big, (1 << 20) + round * 100_000);
        probe(port);
    }
    // 2. Victims that send a short burst and reset after a varying pause, so
    //    that some resets land between the server's read and its reply.
    let blob = slow_lines(48 * 1024);
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut victims = 0;
    let mut rng = Rng::new(5);
    while Instant::now() < deadline && victims < 1500 {
        let mut v = connect(port);
        v.write_all(&blob).unwrap();
        thread::sleep(Duration::from_micros(rng.below(1500) as u64));
        reset(v);
        victims += 1;
        if victims % 10 == 0 {
            probe(port);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let asked = bystander.join().unwrap();
    eprintln!("{victims} resets, {asked} bystander round trips");
    assert_alive(&mut server);
}
