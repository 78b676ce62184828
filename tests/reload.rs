mod common;
use common::*;

// SIGHUP reload (SPEC §5) on the real binary: all or nothing, unchanged
// listeners keep their sockets, removed ones close while their connections
// go on, new limits for new connections, bad reloads change nothing.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

fn config(ports: &[u16], extra: &str) -> String {
    let listeners: Vec<String> = ports
        .iter()
        .map(|p| format!(r#"{{"host":"127.0.0.1","port":{p}}}"#))
        .collect();
    format!(
        r#"{{{extra}"servers":[{{"listeners":[{}]}}]}}"#,
        listeners.join(",")
    )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn round_trip(port: u16, line: &str) {
    let mut c = connect(port);
    c.write_all(format!("{line}\n").as_bytes()).unwrap();
    assert_eq!(
        read_exact_n(&mut c, line.len() + 1),
        format!("{}\n", rev(line)).as_bytes()
    );
}

#[test]
fn a_reload_adds_and_removes_listeners_and_keeps_open_connections() {
    let (p1, p2) = (free_port(), free_port());
    let path = temp_file("xps.json", &config(&[p1], ""));
    let mut server = Server::start(&[path.to_str().unwrap()], 1);
    round_trip(p1, "before");

    write(&path, &config(&[p1, p2], ""));
    let line = server.reload();
    assert!(
        line.ends_with("configuration reloaded: listeners +1 -0"),
        "{line}"
    );
    assert!(server.wait_log(
        &format!("Server listening on port {p2}"),
        Duration::from_secs(2)
    ));
    round_trip(p2, "added");
    round_trip(p1, "kept");

    // A client of p2 stays connected across the reload that removes p2.
    let mut stays = connect(p2);
    stays.write_all(b"one\n").unwrap();
    assert_eq!(read_exact_n(&mut stays, 4), b"eno\n");
    write(&path, &config(&[p1], ""));
    let line = server.reload();
    assert!(
        line.ends_with("configuration reloaded: listeners +0 -1"),
        "{line}"
    );
    stays.write_all(b"two\n").unwrap();
    assert_eq!(
        read_exact_n(&mut stays, 4),
        b"owt\n",
        "served after its listener closed"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", p2)).is_ok() {
        assert!(Instant::now() < deadline, "removed listener still accepts");
        thread::sleep(Duration::from_millis(20));
    }
    round_trip(p1, "still");
}

#[test]
fn a_reload_changes_the_idle_timeout_for_new_connections() {
    let p = free_port();
    let path = temp_file("xps.json", &config(&[p], r#""idle_timeout":0,"#));
    let mut server = Server::start(&[path.to_str().unwrap()], 1);
    let mut old = connect(p);
    old.write_all(b"first\n").unwrap(); // accepted (and served) before the reload
    assert_eq!(read_exact_n(&mut old, 6), b"tsrif\n");
    write(&path, &config(&[p], r#""idle_timeout":1,"#));
    let line = server.reload();
    assert!(line.ends_with("listeners +0 -0"), "{line}");
    let mut new = connect(p);
    let t = Instant::now();
    let mut b = [0u8; 1];
    assert_eq!(
        read_once(&mut new, &mut b).unwrap(),
        0,
        "new connection closed by the new timeout"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    // The connection accepted before the reload keeps the old (no) timeout.
    old.set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    assert!(
        read_once(&mut old, &mut b).is_err(),
        "the old connection was closed"
    );
    old.write_all(b"old\n").unwrap();
    old.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(read_exact_n(&mut old, 4), b"dlo\n");
}

#[test]
fn a_bad_reload_changes_nothing() {
    let p = free_port();
    let path = temp_file("xps.json", &config(&[p], ""));
    let mut server = Server::start(&[path.to_str().unwrap(), "--metrics", "127.0.0.1:0"], 1);
    // Not JSON: the error names the file and the position.
    write(&path, "{\n  \"servers\": [\n");
    let line = server.reload();
    assert!(line.contains("reload failed"), "{line}");
    assert!(
        line.contains(&format!("config file {}: line 3:0", path.display())),
        "{line}"
    );
    round_trip(p, "still serving");
    // A new port that is taken: the error names it, nothing changes, and
    // the old listener still serves.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = busy.local_addr().unwrap().port();
    let other = free_port();
    write(&path, &config(&[p, other, taken], ""));
    let line = server.reload();
    assert!(
        line.contains(&format!(
            "cannot listen on 127.0.0.1:{taken}: bind(): Address already in use"
        )),
        "{line}"
    );
    round_trip(p, "still serving");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", other)).is_err(),
        "a listener of the failed reload was left open"
    );
    // And a good one after them works.
    write(&path, &config(&[p, other], ""));
    assert!(server.reload().ends_with("listeners +1 -0"));
    round_trip(other, "now");
    let mport = server.metrics_port();
    let mut s = connect(mport);
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(
        body.contains("xps_reloads_total{result=\"ok\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("xps_reloads_total{result=\"failed\"} 2"),
        "{body}"
    );
}

#[test]
fn no_connection_is_refused_on_an_unchanged_listener_during_20_reloads() {
    let (p, q) = (free_port(), free_port());
    let path = temp_file("xps.json", &config(&[p], ""));
    let mut server = Server::start(&[path.to_str().unwrap(), "-w", "2"], 1);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for t in 0..4 {
        let (stop, done) = (stop.clone(), done.clone());
        clients.push(thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let mut c = std::net::TcpStream::connect(("127.0.0.1", p))
                    .unwrap_or_else(|e| panic!("connection {n} of client {t} refused: {e}"));
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let line = format!("client {t} line {n}");
                c.write_all(format!("{line}\n").as_bytes()).unwrap();
                let mut got = vec![0; line.len() + 1];
                c.read_exact(&mut got).unwrap();
                assert_eq!(got, format!("{}\n", rev(&line)).as_bytes());
                n += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for i in 0..20 {
        let ports: &[u16] = if i % 2 == 0 { &[p, q] } else { &[p] };
        write(&path, &config(ports, ""));
        let line = server.reload();
        assert!(line.contains("configuration reloaded"), "{line}");
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert!(
        done.load(Ordering::Relaxed) > 20,
        "too little load to mean anything"
    );
}

#[test]
fn sighup_without_a_config_only_reopens_the_access_log() {
    let mut server = Server::start_n(1, &[]);
    server.signal(libc::SIGHUP);
    assert!(server.wait_log(
        "SIGHUP: access log reopened (no CONFIG file",
        Duration::from_secs(5)
    ));
    round_trip(server.port(), "alive");
}

#[test]
fn a_reload_changes_the_access_rules_for_new_connections() {
    let p = free_port();
    let path = temp_file("xps.json", &config(&[p], ""));
    let mut server = Server::start(&[path.to_str().unwrap()], 1);
    let mut old = connect(p);
    old.write_all(b"first\n").unwrap(); // accepted (and served) before the reload
    assert_eq!(read_exact_n(&mut old, 6), b"tsrif\n");
    write(&path, &config(&[p], r#""access":[{"deny":"all"}],"#));
    assert!(server.reload().ends_with("listeners +0 -0"));
    // A new connection is refused: closed before anything is read.
    let mut new = connect(p);
    let _ = new.write_all(b"hello\n");
    let mut b = [0u8; 8];
    assert!(
        matches!(read_once(&mut new, &mut b), Ok(0) | Err(_)),
        "a connection accepted after the reload to deny all was served"
    );
    // The one accepted before the reload is still served.
    old.write_all(b"old\n").unwrap();
    assert_eq!(read_exact_n(&mut old, 4), b"dlo\n");
    write(&path, &config(&[p], ""));
    assert!(server.reload().ends_with("listeners +0 -0"));
    round_trip(p, "allowed again");
}

#[test]
fn a_change_of_workers_is_named_and_waits_for_a_restart() {
    let p = free_port();
    let path = temp_file("xps.json", &config(&[p], r#""workers":1,"#));
    let mut server = Server::start(&[path.to_str().unwrap()], 1);
    write(&path, &config(&[p], r#""workers":2,"#));
    assert!(server.reload().ends_with("listeners +0 -0"));
    assert!(
        server.wait_log(
            "workers (1 -> 2) changed: takes effect at the next restart or upgrade (SIGUSR2)",
            Duration::from_secs(2)
        ),
        "{:?}",
        server.drain_log()
    );
    round_trip(p, "one worker still");
}
