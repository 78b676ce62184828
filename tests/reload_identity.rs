//! A listener's identity across SIGHUP reloads (SPEC §5, §6): a listener is
//! the same listener when it resolves to the same socket address, so a new
//! spelling of its host or a flipped `proxy_protocol` keeps its sockets and
//! changes it in place, for connections accepted from then on. And the bytes
//! of a PROXY header are not the client's: `received` and
//! `xps_received_bytes_total` count only what follows it.

mod common;

use std::io::{ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use common::*;

/// A config with one listener on `host:port`.
fn config(host: &str, port: u16, proxy: bool, extra: &str) -> String {
    format!(
        r#"{{{extra}"servers":[{{"listeners":[{{"host":"{host}","port":{port},"proxy_protocol":{proxy}}}]}}]}}"#
    )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn connect_to(at: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(at).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Sends `line` and checks its reversal comes back.
fn assert_served(s: &mut TcpStream, line: &str) {
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    assert_eq!(
        read_exact_n(s, line.len() + 1),
        format!("{}\n", rev(line)).as_bytes()
    );
}

/// Whether the server closed `s` without sending anything (EOF or reset).
fn closed_unanswered(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    match read_once(s, &mut b) {
        Ok(0) => true,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Ok(n) => panic!("a refused connection got {:?}", &b[..n]),
        Err(e) => panic!("the connection was not closed within 5 s: {e}"),
    }
}

/// The access log's records once at least `n` are written (flushed ≤ 1 s).
fn records(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    wait_for(
        || {
            out = std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            out.len() >= n
        },
        "access-log records",
    );
    out
}

fn reloads(text: &str, result: &str) -> f64 {
    sample(text, &format!("xps_reloads_total{{result=\"{result}\"}}"))
}

/// A connection to a PROXY listener on 127.0.0.1:`port` that sends a v1
/// header naming 192.0.2.`n` as the client.
fn proxied(port: u16, n: u8) -> TcpStream {
    let mut s = connect(port);
    let src = SocketAddr::from(([192, 0, 2, n], 40000 + u16::from(n)));
    let dst = SocketAddr::from(([127, 0, 0, 1], port));
    s.write_all(&proxy_v1(src, dst)).unwrap();
    s
}

#[test]
fn flipping_proxy_protocol_on_a_kept_listener_applies_to_new_connections_only() {
    let p = free_port();
    let log = temp_file("access.log", "");
    let extra = format!(r#""access_log":"{}","#, log.display());
    let path = temp_file("xps.json", &config("127.0.0.1", p, false, &extra));
    // Two workers: every worker's socket must change, not just one.
    let mut server = Server::start(
        &[
            path.to_str().unwrap(),
            "-w",
            "2",
            "--metrics",
            "127.0.0.1:0",
        ],
        1,
    );
    let mut plain_before = connect(p);
    assert_served(&mut plain_before, "accepted plain");

    write(&path, &config("127.0.0.1", p, true, &extra));
    let line = server.reload();
    assert!(
        line.ends_with(&format!(
            "configuration reloaded: listeners +0 -0 ~1 (127.0.0.1:{p}: proxy_protocol off -> on)"
        )),
        "{line}"
    );
    // Every new connection must start with a header: a plain line is
    // refused (several, so both workers' sockets are tried).
    for i in 0..10 {
        let mut c = connect(p);
        let _ = c.write_all(format!("plain {i}\n").as_bytes());
        assert!(closed_unanswered(&mut c), "plain connection {i} was served");
    }
    let mport = server.metrics_port();
    wait_for(
        || refused(&scrape(mport), "proxy_header") == 10.0,
        "10 proxy_header refusals",
    );
    // ...and one with a header is served.
    let mut proxy_before = Vec::new();
    for i in 0..10u8 {
        let mut c = proxied(p, i + 1);
        assert_served(&mut c, &format!("behind a balancer {i}"));
        proxy_before.push(c);
    }
    // The connection accepted before the reload keeps its plain mode.
    assert_served(&mut plain_before, "still plain");

    // And back off: new connections are plain again, the PROXY ones
    // accepted before go on as they were.
    write(&path, &config("127.0.0.1", p, false, &extra));
    let line = server.reload();
    assert!(
        line.ends_with(&format!(
            "configuration reloaded: listeners +0 -0 ~1 (127.0.0.1:{p}: proxy_protocol on -> off)"
        )),
        "{line}"
    );
    for i in 0..10 {
        assert_served(&mut connect(p), &format!("plain again {i}"));
    }
    for (i, c) in proxy_before.iter_mut().enumerate() {
        assert_served(c, &format!("still behind a balancer {i}"));
    }
    assert_served(&mut plain_before, "plain to the end");

    let text = scrape(mport);
    assert_eq!(reloads(&text, "ok"), 2.0, "{text}");
    assert_eq!(reloads(&text, "failed"), 0.0, "{text}");
    assert_eq!(refused(&text, "proxy_header"), 10.0, "{text}");
    // The refusals are in the access log with the balancer's address.
    let mut refusals = Vec::new();
    wait_for(
        || {
            refusals = records(&log, 0)
                .into_iter()
                .filter(|r| r["end"] == "proxy_header")
                .collect();
            refusals.len() == 10
        },
        "10 proxy_header records",
    );
    assert!(
        refusals
            .iter()
            .all(|r| r["proxy"].is_string() && r["received"] == 0),
        "{refusals:?}"
    );
    assert!(
        !server
            .drain_log()
            .iter()
            .any(|l| l.contains("reload failed"))
    );
}

#[test]
fn a_new_spelling_of_the_same_address_keeps_the_listener() {
    let p = free_port();
    // `localhost` and the address it resolves to first (what xps uses).
    let at = ("localhost", p)
        .to_socket_addrs()
        .unwrap()
        .next()
        .expect("localhost resolves");
    let numeric = at.ip().to_string();
    let path = temp_file("xps.json", &config(&numeric, p, false, ""));
    let mut server = Server::start(
        &[
            path.to_str().unwrap(),
            "-w",
            "2",
            "--metrics",
            "127.0.0.1:0",
        ],
        1,
    );
    let mut before = connect_to(at);
    assert_served(&mut before, "before");

    // Clients connect without pause during every reload: none is refused.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..3)
        .map(|t| {
            let (stop, done) = (stop.clone(), done.clone());
            thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let mut c = TcpStream::connect(at)
                        .unwrap_or_else(|e| panic!("connection {n} of client {t} refused: {e}"));
                    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    assert_served(&mut c, &format!("client {t} line {n}"));
                    n += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for i in 0..6 {
        let (from, to) = if i % 2 == 0 {
            (numeric.as_str(), "localhost")
        } else {
            ("localhost", numeric.as_str())
        };
        write(&path, &config(to, p, false, ""));
        let line = server.reload();
        assert!(
            line.ends_with(&format!(
                "configuration reloaded: listeners +0 -0 ~1 ({at}: host {from} -> {to})"
            )),
            "{line}"
        );
        assert_served(&mut before, &format!("after reload {i}"));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert!(
        done.load(Ordering::Relaxed) > 6,
        "too little load to mean anything"
    );
    // Never re-bound: no second "listening" line.
    let listening = server
        .drain_log()
        .iter()
        .filter(|l| l.contains("Server listening on port"))
        .count();
    assert_eq!(listening, 1, "{:?}", server.log);
    let text = scrape(server.metrics_port());
    assert_eq!(reloads(&text, "ok"), 6.0, "{text}");
    assert_eq!(reloads(&text, "failed"), 0.0, "{text}");
    // And the same address twice, written two ways, is refused as at
    // start-up, naming both; the running listener is untouched.
    let both = format!(
        r#"{{"servers":[{{"listeners":[{{"host":"{numeric}","port":{p}}},{{"host":"localhost","port":{p}}}]}}]}}"#
    );
    write(&path, &both);
    let line = server.reload();
    assert!(
        line.ends_with(&format!(
            "reload failed, still serving the previous configuration: \
             cannot listen on localhost:{p}: the same address ({at}) as {at}"
        )),
        "{line}"
    );
    assert_served(&mut before, "after a failed reload");
    assert_served(&mut connect_to(at), "new after a failed reload");
    let (status, out) = run_to_exit(&[path.to_str().unwrap()], Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "cannot listen on localhost:{p}: the same address ({at}) as {at}"
        )),
        "{out}"
    );
}

/// Sends `first` (a header and the client's first bytes) in one write,
/// then `more`, half-closes, and returns all the server sent until it closed.
fn proxied_session(port: u16, first: &[u8], more: &[u8]) -> Vec<u8> {
    let mut s = connect(port);
    s.write_all(first).unwrap();
    // A separate segment: the bytes after the header are counted whether
    // they came with it or after it.
    thread::sleep(Duration::from_millis(50));
    s.write_all(more).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    read_to_end(&mut s)
}

#[test]
fn the_bytes_of_a_proxy_header_are_not_counted_as_received() {
    let log = temp_file("access.log", "");
    let mut server = Server::start(
        &[
            "--listen-proxy",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--access-log",
            log.to_str().unwrap(),
        ],
        1,
    );
    let p = server.port();
    let dst = SocketAddr::from(([127, 0, 0, 1], p));
    let c1 = SocketAddr::from(([192, 0, 2, 1], 1111));
    let c2 = SocketAddr::from(([192, 0, 2, 2], 2222));
    let v1 = proxy_v1(c1, dst);
    let v2 = proxy_v2(c2, dst);
    assert_eq!(v2.len(), 16 + 12 + 6, "a v2 header with one TLV");
    // 9 bytes after the v1 header (4 in its segment), 15 after the v2
    // header (3 in its segment): 24 bytes of the clients', 4 replies.
    let mut first = v1.clone();
    first.extend_from_slice(b"abcd");
    assert_eq!(proxied_session(p, &first, b"efg\n\n"), b"gfedcba\n\n");
    let mut first = v2.clone();
    first.extend_from_slice(b"hi\n");
    assert_eq!(
        proxied_session(p, &first, b"twelve bytes"),
        b"ih\nsetyb evlewt"
    );

    let mport = server.metrics_port();
    wait_for(
        || {
            let t = scrape(mport);
            sample(&t, "xps_connections_closed_total{reason=\"finished\"}") == 2.0
                && sample(&t, "xps_sent_bytes_total") == 24.0
        },
        "two finished connections",
    );
    let text = scrape(mport);
    assert_eq!(sample(&text, "xps_received_bytes_total"), 24.0, "{text}");
    assert_eq!(sample(&text, "xps_sent_bytes_total"), 24.0, "{text}");
    assert_eq!(sample(&text, "xps_lines_total"), 4.0, "{text}");

    let recs = records(&log, 2);
    assert_eq!(recs.len(), 2, "{recs:?}");
    let by_client = |c: SocketAddr| {
        recs.iter()
            .find(|r| r["client"] == c.to_string())
            .unwrap_or_else(|| panic!("no record for {c}: {recs:?}"))
    };
    for (client, received, lines) in [(c1, 9, 2), (c2, 15, 2)] {
        let r = by_client(client);
        assert_eq!(r["end"], "finished", "{r}");
        assert_eq!(r["received"], received, "{r}");
        assert_eq!(r["sent"], received, "{r}");
        assert_eq!(r["lines"], lines, "{r}");
        assert!(
            r["proxy"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{r}"
        );
    }
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
}
