//! A real HAProxy in front of two xps instances (SPEC §6): `send-proxy-v2`
//! with `check` and a `tcp-check` that speaks the line protocol; 20 clients
//! through it answered exactly; the access logs name the clients' own
//! addresses and HAProxy's as `proxy`; one instance drained with SIGTERM
//! while the other takes the new connections. Skipped, loudly, where the
//! Debian package `haproxy` is not installed (scripts/test.sh installs it).

mod common;

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn haproxy_bin() -> Option<PathBuf> {
    for p in [
        "/usr/sbin/haproxy",
        "/usr/bin/haproxy",
        "/usr/local/sbin/haproxy",
    ] {
        if Path::new(p).exists() {
            return Some(PathBuf::from(p));
        }
    }
    None
}

/// HAProxy in the foreground (`-db`), killed by PID when dropped.
struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

fn config(front: u16, a: u16, b: u16) -> String {
    format!(
        r#"global
    maxconn 2000
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch
frontend fe
    bind 127.0.0.1:{front}
    default_backend xps
backend xps
    balance roundrobin
    option tcp-check
    tcp-check send "ping\n"
    tcp-check expect string gnip
    server a 127.0.0.1:{a} send-proxy-v2 check inter 200ms fall 1 rise 1
    server b 127.0.0.1:{b} send-proxy-v2 check inter 200ms fall 1 rise 1
"#
    )
}

fn records(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A client through HAProxy: `n` pipelined lines, every reply checked;
/// returns its own local port.
fn exact_client(front: u16, tag: &str, n: usize) -> u16 {
    let mut s = connect(front);
    let port = s.local_addr().unwrap().port();
    let (input, output) = numbered_lines(tag, n);
    s.write_all(&input).unwrap();
    assert_eq!(read_exact_n(&mut s, output.len()), output, "{tag}");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut s), b"", "{tag}: nothing after the replies");
    port
}

/// A client in request/response for `run`: each reply must be exactly the
/// reversal of its line; the server may close between two (a drain).
/// Returns (local port, lines answered).
fn steady_client(front: u16, tag: String, run: Duration) -> (u16, usize) {
    let mut s = connect(front);
    let port = s.local_addr().unwrap().port();
    let started = Instant::now();
    let mut answered = 0;
    while started.elapsed() < run {
        let line = format!("{tag} line {answered:05}");
        if s.write_all(format!("{line}\n").as_bytes()).is_err() {
            break;
        }
        let want = format!("{}\n", rev(&line)).into_bytes();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while got.len() < want.len() {
            match read_once(&mut s, &mut buf) {
                Ok(0) => break,
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => panic!("{tag}: {e}"),
            }
        }
        if got.is_empty() {
            break; // closed between two lines: the instance drained
        }
        assert_eq!(got, want, "{tag}: a wrong or partial reply");
        answered += 1;
        thread::sleep(Duration::from_millis(10));
    }
    (port, answered)
}

#[test]
fn two_instances_behind_haproxy_with_proxy_v2_and_a_drain() {
    let Some(haproxy) = haproxy_bin() else {
        eprintln!(
            "SKIPPED two_instances_behind_haproxy_with_proxy_v2_and_a_drain: haproxy is not installed (apt-get install haproxy; scripts/test.sh does)"
        );
        return;
    };
    let log_a = temp_file("a.log", "");
    let log_b = temp_file("b.log", "");
    let start = |log: &Path| {
        Server::start(
            &[
                "--listen-proxy",
                "127.0.0.1:0",
                "--access-log",
                log.to_str().unwrap(),
                "--idle-timeout",
                "0",
            ],
            1,
        )
    };
    let mut a = start(&log_a);
    let b = start(&log_b);
    let front = free_port();
    let cfg = temp_file("haproxy.cfg", &config(front, a.port(), b.port()));
    let mut hp = Haproxy(
        Command::new(&haproxy)
            .args(["-db", "-f", cfg.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy"),
    );
    // Both instances pass the health check (ping → gnip) before traffic.
    wait_for(
        || {
            records(&log_a).iter().any(|r| r.contains("\"lines\":1"))
                && records(&log_b).iter().any(|r| r.contains("\"lines\":1"))
        },
        "haproxy's tcp-check to reach both instances",
    );
    wait_for(
        || TcpStream::connect(("127.0.0.1", front)).is_ok(),
        "haproxy's frontend",
    );
    assert!(hp.0.try_wait().unwrap().is_none(), "haproxy exited");

    // 20 clients, all answered exactly.
    let clients: Vec<thread::JoinHandle<u16>> = (0..20)
        .map(|i| thread::spawn(move || exact_client(front, &format!("c{i:02}"), 200)))
        .collect();
    let ports: Vec<u16> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    // The access logs name each client by its own address, HAProxy as proxy.
    let mut served = (0, 0);
    wait_for(
        || {
            let all: Vec<String> = records(&log_a).into_iter().chain(records(&log_b)).collect();
            ports.iter().all(|p| {
                all.iter().any(|r| {
                    r.contains(&format!(
                        "\"client\":\"127.0.0.1:{p}\",\"proxy\":\"127.0.0.1:"
                    )) && !r.contains(&format!("\"proxy\":\"127.0.0.1:{p}\""))
                })
            })
        },
        "a record per client with its own address",
    );
    for p in &ports {
        // A health check's own connection (v2 LOCAL: client = proxy) may
        // have taken the same source port on the HAProxy-to-xps leg.
        let needle = format!("\"client\":\"127.0.0.1:{p}\",\"proxy\":\"127.0.0.1:");
        let ours = |r: &&String| !r.contains(&format!("\"proxy\":\"127.0.0.1:{p}\""));
        let in_a = records(&log_a)
            .iter()
            .filter(ours)
            .find(|r| r.contains(&needle))
            .cloned();
        let rec = in_a.clone().or_else(|| {
            records(&log_b)
                .iter()
                .filter(ours)
                .find(|r| r.contains(&needle))
                .cloned()
        });
        let rec = rec.unwrap();
        assert!(rec.contains("\"lines\":200,\"end\":\"finished\""), "{rec}");
        let proxy = rec.split("\"proxy\":\"127.0.0.1:").nth(1).unwrap();
        let proxy_port: u16 = proxy.split('"').next().unwrap().parse().unwrap();
        assert_ne!(
            proxy_port, *p,
            "proxy is HAProxy's address, not the client's"
        );
        if in_a.is_some() {
            served.0 += 1;
        } else {
            served.1 += 1;
        }
    }
    eprintln!("20 clients: {} on a, {} on b", served.0, served.1);
    assert!(
        served.0 > 0 && served.1 > 0,
        "roundrobin used both: {served:?}"
    );

    // Mid-load, drain instance a: its clients finish with exact replies,
    // new connections go to b.
    let steady: Vec<thread::JoinHandle<(u16, usize)>> = (0..10)
        .map(|i| {
            thread::spawn(move || steady_client(front, format!("s{i}"), Duration::from_secs(3)))
        })
        .collect();
    thread::sleep(Duration::from_millis(800));
    a.signal(libc::SIGTERM);
    let status = a
        .wait_exit(Duration::from_secs(10))
        .expect("a exits after its drain");
    assert!(status.success(), "{status:?}");
    // a is down: the next clients are all served (by b).
    let after: Vec<thread::JoinHandle<u16>> = (0..10)
        .map(|i| thread::spawn(move || exact_client(front, &format!("n{i:02}"), 100)))
        .collect();
    let after_ports: Vec<u16> = after.into_iter().map(|c| c.join().unwrap()).collect();
    let steady: Vec<(u16, usize)> = steady.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(steady.iter().all(|&(_, n)| n > 0), "{steady:?}");
    wait_for(
        || {
            let rb = records(&log_b);
            after_ports.iter().all(|p| {
                rb.iter()
                    .any(|r| r.contains(&format!("\"client\":\"127.0.0.1:{p}\"")))
            })
        },
        "the new clients in b's log",
    );
    let drained = records(&log_a)
        .iter()
        .filter(|r| {
            steady
                .iter()
                .any(|(p, _)| r.contains(&format!("\"client\":\"127.0.0.1:{p}\"")))
        })
        .count();
    eprintln!("drain: {drained} steady client(s) were on a; steady replies {steady:?}");
    drop(hp);
}
