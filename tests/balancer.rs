//! SPEC §6 on the real binary: PROXY protocol listeners, `--proxy-from`,
//! access rules, the per-source limit, refusals in the metrics and the
//! access log, and the global memory bound under a flood of clients that
//! send without reading.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use socket2::{Domain, Socket, Type};

// ─── helpers ────────────────────────────────────────────────────────────────

/// A v2 `PROXY` header over TCP for `src` → `dst` (IPv4 or IPv6), with
/// one TLV (skipped by the server).
fn v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut block = Vec::new();
    let fam = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            block.extend_from_slice(&s.ip().octets());
            block.extend_from_slice(&d.ip().octets());
            0x11
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            block.extend_from_slice(&s.ip().octets());
            block.extend_from_slice(&d.ip().octets());
            0x21
        }
        _ => panic!("mixed families"),
    };
    block.extend_from_slice(&src.port().to_be_bytes());
    block.extend_from_slice(&dst.port().to_be_bytes());
    block.extend_from_slice(&[0x04, 0x00, 0x03, b'a', b'b', b'c']); // PP2_TYPE_NOOP
    v2_raw(0x21, fam, &block)
}

/// A v2 `LOCAL` header (a health check), no addresses.
fn v2_local() -> Vec<u8> {
    v2_raw(0x20, 0x00, &[])
}

fn v2_raw(ver_cmd: u8, fam: u8, block: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(ver_cmd);
    h.push(fam);
    h.extend_from_slice(&(block.len() as u16).to_be_bytes());
    h.extend_from_slice(block);
    h
}

/// Whether the server closed `s` without sending anything (EOF or reset)
/// within `within`.
fn closed_unanswered(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    match read_once(s, &mut b) {
        Ok(0) => true,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Ok(n) => panic!("refused connection got {:?}", &b[..n]),
        Err(e) => panic!("connection not closed within {within:?}: {e}"),
    }
}

/// A client bound to `source` (e.g. 127.0.0.2) before connecting.
fn connect_from(source: &str, port: u16) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&format!("{source}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        .unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Sends `line` and checks its reversal comes back.
fn assert_served(s: &mut TcpStream, line: &str) {
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let reply = read_exact_n(s, line.len() + 1);
    assert_eq!(reply, format!("{}\n", rev(line)).as_bytes());
}

/// The access log's records once at least `n` are written (flushed ≤ 1 s).
fn access_log(path: &std::path::Path, n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    wait_for(
        || {
            lines = std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect();
            lines.len() >= n
        },
        "access log records",
    );
    lines
}

fn proxy_server(extra: &[&str]) -> Server {
    let mut args = vec!["--listen-proxy", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Server::start(&args, 1)
}

// ─── PROXY protocol ─────────────────────────────────────────────────────────

#[test]
fn v1_and_v2_headers_with_the_first_line_in_the_same_segment_are_answered() {
    let log = temp_file("access.log", "");
    let server = proxy_server(&[
        "--metrics",
        "127.0.0.1:0",
        "--access-log",
        log.to_str().unwrap(),
    ]);
    let port = server.port();
    let dst: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let v6dst: SocketAddr = "[2001:db8::2]:8001".parse().unwrap();
    let cases: [(Vec<u8>, &str); 5] = [
        (
            proxy_v1("203.0.113.7:51234".parse().unwrap(), dst),
            "203.0.113.7:51234",
        ),
        (
            proxy_v1("[2001:db8::7]:4242".parse().unwrap(), v6dst),
            "[2001:db8::7]:4242",
        ),
        (
            v2("198.51.100.9:60000".parse().unwrap(), dst),
            "198.51.100.9:60000",
        ),
        (
            v2("[2001:db8::9]:61000".parse().unwrap(), v6dst),
            "[2001:db8::9]:61000",
        ),
        (v2_local(), "LOCAL"),
    ];
    let mut expect_clients = Vec::new();
    for (header, client) in &cases {
        let mut s = connect(port);
        let mut segment = header.clone();
        segment.extend_from_slice(b"first line\r\nsecond\n");
        // One write: the header and the first lines in the same segment.
        s.write_all(&segment).unwrap();
        let reply = read_exact_n(&mut s, 19);
        assert_eq!(reply, b"enil tsrif\r\ndnoces\n", "{client}");
        let local = s.local_addr().unwrap().to_string();
        s.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_end(&mut s), b"");
        // LOCAL (a health check) uses the socket's own peer address.
        expect_clients.push(if *client == "LOCAL" {
            local.clone()
        } else {
            client.to_string()
        });
        expect_clients.push(local); // the proxy field
    }
    let records = access_log(&log, cases.len());
    for (i, rec) in records.iter().enumerate() {
        let client = &expect_clients[2 * i];
        let proxy = &expect_clients[2 * i + 1];
        assert!(
            rec.contains(&format!("\"client\":\"{client}\",\"proxy\":\"{proxy}\"")),
            "record {i}: {rec}"
        );
        assert!(
            rec.contains("\"received\":19,\"sent\":19,\"lines\":2,\"end\":\"finished\""),
            "{rec}"
        );
    }
    let m = scrape(server.metrics_port());
    assert_eq!(
        sample(&m, "xps_connections_closed_total{reason=\"finished\"}"),
        5.0
    );
    assert_eq!(refused(&m, "proxy_header"), 0.0);
}

#[test]
fn a_header_sent_byte_by_byte_works() {
    let server = proxy_server(&[]);
    let port = server.port();
    for header in [
        proxy_v1(
            "10.1.2.3:1000".parse().unwrap(),
            "10.0.0.1:80".parse().unwrap(),
        ),
        v2(
            "10.1.2.3:1000".parse().unwrap(),
            "10.0.0.1:80".parse().unwrap(),
        ),
    ] {
        let mut s = connect(port);
        for b in header.iter().chain(b"ab\n") {
            s.write_all(&[*b]).unwrap();
            thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(read_exact_n(&mut s, 3), b"ba\n");
        assert_served(&mut s, "more after the header");
    }
}

#[test]
fn a_header_that_never_completes_is_refused_after_5_s() {
    let server = proxy_server(&["--metrics", "127.0.0.1:0", "--idle-timeout", "0"]);
    let port = server.port();
    let started = Instant::now();
    let mut partial = connect(port);
    partial.write_all(b"PROXY TCP4 10.0.0.1 ").unwrap();
    let mut silent = connect(port);
    assert!(closed_unanswered(&mut partial, Duration::from_secs(8)));
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(4900) && after < Duration::from_secs(7),
        "closed after {after:?}"
    );
    assert!(closed_unanswered(&mut silent, Duration::from_secs(2)));
    let m = scrape(server.metrics_port());
    assert_eq!(refused(&m, "proxy_header"), 2.0);
    assert_eq!(sample(&m, "xps_connections_open"), 0.0);
}

#[test]
fn garbage_instead_of_a_header_and_eof_mid_header_are_refused_at_once() {
    let mut server = proxy_server(&["--metrics", "127.0.0.1:0", "--log-level", "debug"]);
    let port = server.port();
    for garbage in [
        &b"hello\n"[..],
        b"PROXY TCP4 1.2.3.256 ",
        b"\r\n\r\n\0\r\nQUIT\n\x11",
    ] {
        let started = Instant::now();
        let mut s = connect(port);
        s.write_all(garbage).unwrap();
        assert!(closed_unanswered(&mut s, Duration::from_secs(2)));
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    let mut s = connect(port);
    s.write_all(b"PROXY TCP4 1.2.3.4").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert!(closed_unanswered(&mut s, Duration::from_secs(2)));
    let m = scrape(server.metrics_port());
    assert_eq!(refused(&m, "proxy_header"), 4.0);
    assert!(server.wait_log("bad PROXY header", Duration::from_secs(2)));
    assert!(server.wait_log(
        "closed before a complete PROXY header",
        Duration::from_secs(2)
    ));
    assert!(server.wait_log(
        "[WARNING] xps_admission() : refusing connections",
        Duration::from_secs(2)
    ));
}

#[test]
fn proxy_from_refuses_untrusted_peers_and_admits_trusted_ones() {
    let untrusted = proxy_server(&["--proxy-from", "10.0.0.0/8", "--metrics", "127.0.0.1:0"]);
    let mut s = connect(untrusted.port());
    assert!(closed_unanswered(&mut s, Duration::from_secs(2)));
    let m = scrape(untrusted.metrics_port());
    assert_eq!(refused(&m, "proxy_header"), 1.0);

    let trusted = proxy_server(&["--proxy-from", "10.0.0.0/8", "--proxy-from", "127.0.0.1"]);
    let mut s = connect(trusted.port());
    s.write_all(&v2_local()).unwrap();
    assert_served(&mut s, "trusted");
}

// ─── access rules ───────────────────────────────────────────────────────────

#[test]
fn allow_then_deny_all_serves_the_allowed_address_only() {
    let log = temp_file("access.log", "");
    let server = Server::start_n(
        1,
        &[
            "--allow",
            "127.0.0.1",
            "--deny",
            "all",
            "--metrics",
            "127.0.0.1:0",
            "--access-log",
            log.to_str().unwrap(),
        ],
    );
    let port = server.port();
    let mut ok = connect(port);
    assert_served(&mut ok, "allowed");
    let mut denied = connect_from("127.0.0.2", port);
    let from = denied.local_addr().unwrap();
    assert!(closed_unanswered(&mut denied, Duration::from_secs(2)));
    let m = scrape(server.metrics_port());
    assert_eq!(refused(&m, "denied"), 1.0);
    let records = access_log(&log, 1);
    assert!(
        records[0].contains(&format!("\"client\":\"{from}\""))
            && records[0].ends_with("\"end\":\"denied\"}"),
        "{records:?}"
    );
}

#[test]
fn deny_a_network_refuses_its_clients_before_reading() {
    let server = Server::start_n(1, &["--deny", "127.0.0.0/8", "--metrics", "127.0.0.1:0"]);
    let mut s = connect(server.port());
    assert!(closed_unanswered(&mut s, Duration::from_secs(2)));
    let m = scrape(server.metrics_port());
    assert_eq!(refused(&m, "denied"), 1.0);
    assert_eq!(sample(&m, "xps_received_bytes_total"), 0.0);
}

#[test]
fn deny_all_on_ipv6_loopback() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED deny_all_on_ipv6_loopback: no IPv6 loopback on this machine");
        return;
    }
    let server = Server::start(&["--listen", "[::1]:0", "--deny", "all"], 1);
    let mut s = TcpStream::connect(("::1", server.port())).unwrap();
    assert!(closed_unanswered(&mut s, Duration::from_secs(2)));
    // On a PROXY listener the rules see the header's client, not the peer.
    let server = Server::start(&["--listen-proxy", "[::1]:0", "--deny", "2001:db8::/32"], 1);
    let dst: SocketAddr = format!("[::1]:{}", server.port()).parse().unwrap();
    let mut denied = TcpStream::connect(dst).unwrap();
    denied
        .write_all(&v2("[2001:db8::1]:1".parse().unwrap(), dst))
        .unwrap();
    assert!(closed_unanswered(&mut denied, Duration::from_secs(2)));
    let mut ok = TcpStream::connect(dst).unwrap();
    ok.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    ok.write_all(&v2("[2001:db9::1]:1".parse().unwrap(), dst))
        .unwrap();
    assert_served(&mut ok, "v6 client allowed");
}

// ─── per-source limit ───────────────────────────────────────────────────────

#[test]
fn the_per_source_limit_counts_over_two_workers() {
    let server = Server::start_n(
        1,
        &[
            "--workers",
            "2",
            "--max-connections-per-source",
            "3",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let port = server.port();
    // Several connections, so SO_REUSEPORT spreads them over both workers.
    let mut held: Vec<TcpStream> = (0..3).map(|_| connect(port)).collect();
    for (i, s) in held.iter_mut().enumerate() {
        assert_served(s, &format!("held {i}"));
    }
    for _ in 0..4 {
        let mut extra = connect(port);
        assert!(closed_unanswered(&mut extra, Duration::from_secs(2)));
    }
    // Another source is not affected.
    let mut other = connect_from("127.0.0.2", port);
    assert_served(&mut other, "another source");
    // Closing one frees a place for the source.
    drop(held.pop());
    let mport = server.metrics_port();
    wait_for(
        || sample(&scrape(mport), "xps_connections_open") == 3.0,
        "the closed connection to be counted",
    );
    let mut again = connect(port);
    assert_served(&mut again, "after a close");
    let m = scrape(mport);
    assert_eq!(refused(&m, "per_source_limit"), 4.0);
}

#[test]
fn the_per_source_limit_sees_the_proxy_client() {
    let server = proxy_server(&[
        "--max-connections-per-source",
        "1",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let port = server.port();
    let dst: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut a = connect(port);
    a.write_all(&proxy_v1("10.0.0.1:1".parse().unwrap(), dst))
        .unwrap();
    assert_served(&mut a, "client one");
    let mut b = connect(port);
    b.write_all(&proxy_v1("10.0.0.2:1".parse().unwrap(), dst))
        .unwrap();
    assert_served(&mut b, "client two, same balancer");
    let mut c = connect(port);
    c.write_all(&proxy_v1("10.0.0.1:2".parse().unwrap(), dst))
        .unwrap();
    assert!(closed_unanswered(&mut c, Duration::from_secs(2)));
    assert_eq!(
        refused(&scrape(server.metrics_port()), "per_source_limit"),
        1.0
    );
}

// ─── the global memory bound ────────────────────────────────────────────────

/// Raises this process's descriptor limit to its hard limit (children
/// inherit it); returns the soft limit now in force.
fn raise_nofile() -> u64 {
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur
    }
}

const LINE: usize = 64;

/// One flooder: a connection whose kernel buffers are small (TCP_MAXSEG
/// and SO_RCVBUF set before connecting), sending identical 64-byte lines
/// that name it.
struct Flooder {
    s: TcpStream,
    /// 1024 of its lines (64 KiB, so any offset mod 64 starts a slice).
    send: Vec<u8>,
    /// Its expected reply line.
    reply: [u8; LINE],
    sent: usize,
    got: usize,
    /// Half-closed once everything is sent.
    shut: bool,
}

impl Flooder {
    fn new(port: u16, i: usize) -> Flooder {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        sock.set_tcp_mss(8192).unwrap();
        // A window of at least one MSS: a smaller one stalls the server's
        // sender on zero-window probes with exponential backoff.
        sock.set_recv_buffer_size(16 * 1024).unwrap();
        // A small send buffer too: 1000 clients' data parked in kernel
        // buffers would otherwise reach gigabytes and put TCP under memory
        // pressure (net.ipv4.tcp_mem), where the kernel shrinks windows and
        // a connection can sit on a zero window long after it drained.
        sock.set_send_buffer_size(64 * 1024).unwrap();
        sock.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())
            .unwrap();
        sock.set_nonblocking(true).unwrap();
        let line = format!("{:<63}", format!("flooder {i:05} sends and does not read"));
        let mut reply = [b'\n'; LINE];
        reply[..63].copy_from_slice(rev(&line).as_bytes());
        let mut send = Vec::with_capacity(64 * 1024);
        for _ in 0..1024 {
            send.extend_from_slice(line.as_bytes());
            send.push(b'\n');
        }
        Flooder {
            s: sock.into(),
            send,
            reply,
            sent: 0,
            got: 0,
            shut: false,
        }
    }

    /// Lets the kernel take more of the replies, for the drain (the window
    /// stays under 64 KiB: its scale was fixed at connect).
    fn widen(&self) {
        socket2::SockRef::from(&self.s)
            .set_recv_buffer_size(256 * 1024)
            .unwrap();
    }

    /// Writes what the socket takes (up to `total`); returns bytes written.
    fn push(&mut self, total: usize) -> usize {
        let mut n = 0;
        while self.sent < total {
            let off = self.sent % LINE;
            let len = (total - self.sent).min(self.send.len() - off);
            match self.s.write(&self.send[off..off + len]) {
                Ok(k) => {
                    self.sent += k;
                    n += k;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("flooder write: {e}"),
            }
        }
        n
    }

    /// Reads and checks what has arrived; returns bytes read, or None at EOF.
    fn pull(&mut self, buf: &mut [u8]) -> Option<usize> {
        let mut n = 0;
        loop {
            match self.s.read(buf) {
                Ok(0) => return if n == 0 { None } else { Some(n) },
                Ok(k) => {
                    for (j, &b) in buf[..k].iter().enumerate() {
                        assert_eq!(b, self.reply[(self.got + j) % LINE], "wrong reply byte");
                    }
                    self.got += k;
                    n += k;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(n),
                Err(e) => panic!("flooder read: {e}"),
            }
        }
    }
}

struct Flood {
    server: Server,
    flooders: Vec<Flooder>,
    max_rss_kib: u64,
    slowest_reply: Duration,
}

/// Starts xps with `--max-buffered limit`, connects `n` flooders and makes
/// each send up to `per_conn` bytes without reading until the server stops
/// taking them, while a well-behaved client sends a line every 50 ms.
fn flood(limit: usize, n: usize, per_conn: usize) -> Flood {
    // One flood at a time: two at once share the CPUs and the test's RSS
    // readings, and the "no progress for 500 ms" end of the flood.
    let fds = raise_nofile();
    assert!(
        fds as usize > 2 * n + 100,
        "RLIMIT_NOFILE {fds} is too low for {n} flooders"
    );
    let limit_arg = limit.to_string();
    let server = Server::start_n(
        1,
        &[
            "--max-buffered",
            &limit_arg,
            "--idle-timeout",
            "0",
            "--line-timeout",
            "0",
        ],
    );
    let port = server.port();
    let mut flooders: Vec<Flooder> = (0..n).map(|i| Flooder::new(port, i)).collect();
    let mut good = connect(port);
    let mut max_rss = 0;
    let mut slowest = Duration::ZERO;
    let mut last_progress = Instant::now();
    let started = Instant::now();
    let mut next_probe = Instant::now();
    let mut probe = 0;
    // Until the server has taken no byte for 500 ms (or 20 s at most).
    while last_progress.elapsed() < Duration::from_millis(500)
        && started.elapsed() < Duration::from_secs(20)
    {
        let mut moved = 0;
        for f in flooders.iter_mut() {
            moved += f.push(per_conn);
        }
        if moved > 0 {
            last_progress = Instant::now();
        }
        if Instant::now() >= next_probe {
            let t = Instant::now();
            assert_served(&mut good, &format!("well-behaved client, probe {probe}"));
            slowest = slowest.max(t.elapsed());
            probe += 1;
            max_rss = max_rss.max(server.rss_kib());
            next_probe = Instant::now() + Duration::from_millis(50);
        } else if moved == 0 {
            thread::sleep(Duration::from_millis(2));
        }
    }
    max_rss = max_rss.max(server.rss_kib());
    Flood {
        server,
        flooders,
        max_rss_kib: max_rss,
        slowest_reply: slowest,
    }
}

/// The flood tests run one at a time.
static FLOODS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_thousand_flooders_stay_under_max_buffered_and_all_get_their_replies() {
    let _one = FLOODS.lock().unwrap_or_else(|e| e.into_inner());
    bounded_flood(64 << 20, 1000, 2 << 20);
}

fn bounded_flood(limit: usize, n: usize, per: usize) {
    #![allow(non_snake_case)]
    let (LIMIT, N, PER) = (limit, n, per);
    let mut f = flood(LIMIT, N, PER);
    let bound_kib = ((LIMIT + (64 << 20)) >> 10) as u64;
    eprintln!(
        "bounded flood: max RSS {} MiB, slowest well-behaved reply {:?}",
        f.max_rss_kib >> 10,
        f.slowest_reply
    );
    assert!(
        f.max_rss_kib < bound_kib,
        "RSS {} KiB ≥ {bound_kib} KiB",
        f.max_rss_kib
    );
    assert!(
        f.slowest_reply < Duration::from_secs(1),
        "{:?}",
        f.slowest_reply
    );
    // Now every flooder reads: each must get exactly its replies.
    for fl in &f.flooders {
        fl.widen();
    }
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut open: Vec<usize> = (0..N).collect();
    let mut max_rss = f.max_rss_kib;
    let mut turns = 0u64;
    while !open.is_empty() {
        if Instant::now() >= deadline {
            let stuck: Vec<(usize, usize, usize)> = open
                .iter()
                .take(10)
                .map(|&i| (i, f.flooders[i].sent, f.flooders[i].got))
                .collect();
            for &(i, _, _) in &stuck {
                let cport = f.flooders[i].s.local_addr().unwrap().port();
                let sport = f.server.port();
                eprintln!(
                    "flooder {i} (port {cport}): server rx queue {:?}",
                    server_rx_queue(sport, cport)
                );
                let _ = std::process::Command::new("ss")
                    .args([
                        "-tnoi",
                        &format!("( sport = :{cport} or dport = :{cport} )"),
                    ])
                    .status();
            }
            panic!(
                "{} flooders unfinished, e.g. (i, sent, got): {stuck:?}",
                open.len()
            );
        }
        let mut moved = 0;
        open.retain(|&i| {
            let fl = &mut f.flooders[i];
            moved += fl.push(PER);
            if fl.sent == PER && !fl.shut {
                fl.shut = true;
                fl.s.shutdown(Shutdown::Write).unwrap();
            }
            match fl.pull(&mut buf) {
                Some(k) => {
                    moved += k;
                    assert!(fl.got <= PER, "flooder {i} got more than it sent");
                    true
                }
                None => {
                    assert_eq!(fl.got, PER, "flooder {i}: replies at EOF");
                    false
                }
            }
        });
        turns += 1;
        if turns.is_multiple_of(64) {
            max_rss = max_rss.max(f.server.rss_kib());
        }
        if moved == 0 {
            thread::sleep(Duration::from_millis(1));
        }
    }
    eprintln!("drained: max RSS {} MiB", max_rss >> 10);
    assert!(
        max_rss < bound_kib,
        "RSS {max_rss} KiB ≥ {bound_kib} KiB while draining"
    );
}

#[test]
fn the_same_flood_exceeds_the_bound_with_max_buffered_0() {
    const LIMIT: usize = 64 << 20;
    let _one = FLOODS.lock().unwrap_or_else(|e| e.into_inner());
    let f = flood(0, 1000, 2 << 20);
    eprintln!(
        "unbounded flood: max RSS {} MiB (the bound would be {} MiB)",
        f.max_rss_kib >> 10,
        (LIMIT + (64 << 20)) >> 20
    );
    assert!(
        f.max_rss_kib > ((LIMIT + (64 << 20)) >> 10) as u64,
        "with the bound off RSS stayed at {} KiB: the flood test proves nothing",
        f.max_rss_kib
    );
}
