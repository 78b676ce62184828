//! systemd integration (SPEC §5, last bullet), end to end on the real binary:
//!
//! * readiness: with `NOTIFY_SOCKET` aimed at a datagram socket this test
//!   owns, xps must send `READY=1` (and a `STATUS=`) once it listens,
//!   `RELOADING=1` + `MONOTONIC_USEC=` then `READY=1` on SIGHUP, and
//!   `STOPPING=1` on SIGTERM;
//! * socket activation: started by systemd's own `systemd-socket-activate`
//!   (which binds, waits for the first connection, then execs xps with
//!   `LISTEN_FDS`/`LISTEN_PID`), xps must answer on the passed sockets with
//!   every worker and bind nothing of its own.
//!
//! Socket activation needs `systemd-socket-activate` (Debian package
//! `systemd`, which `scripts/test.sh` installs); without it those tests say
//! SKIPPED loudly.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use xps::control::systemd::monotonic_usec;

const WAIT: Duration = Duration::from_secs(20);

/// The notify socket a test owns, in a fresh temp dir.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    /// Every datagram received so far, in order.
    seen: Vec<String>,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = temp_file("unused", "").parent().unwrap().to_path_buf();
        let path = dir.join("notify");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        NotifySocket {
            sock,
            path,
            seen: Vec::new(),
        }
    }

    /// Waits (up to [`WAIT`]) for a datagram with the assignment `want`
    /// (e.g. `READY=1`) and returns it; the datagrams before it are kept in
    /// `seen` too.
    fn expect(&mut self, want: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {want:?} from xps within {WAIT:?}; got {:?}",
                self.seen
            );
            self.sock.set_read_timeout(Some(left)).unwrap();
            let mut buf = [0u8; 4096];
            let n = match self.sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e) => panic!("no {want:?} from xps ({e}); got {:?}", self.seen),
            };
            let msg = String::from_utf8(buf[..n].to_vec()).expect("UTF-8 datagram");
            assert_well_formed(&msg);
            self.seen.push(msg.clone());
            if msg.lines().any(|l| l == want) {
                return msg;
            }
        }
    }

    /// Waits for any datagram with a `STATUS=`.
    fn expect_status(&mut self) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(m) = self
                .seen
                .iter()
                .find(|m| value(m, "STATUS").is_some())
                .cloned()
            {
                return m;
            }
            assert!(Instant::now() < deadline, "no STATUS= in {:?}", self.seen);
            self.sock
                .set_read_timeout(Some(deadline.saturating_duration_since(Instant::now())))
                .unwrap();
            let mut buf = [0u8; 4096];
            let n = self
                .sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no STATUS= ({e}) in {:?}", self.seen));
            let msg = String::from_utf8(buf[..n].to_vec()).expect("UTF-8 datagram");
            assert_well_formed(&msg);
            self.seen.push(msg);
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Every line of a notification is `KEY=VALUE` with an upper-case key.
#[track_caller]
fn assert_well_formed(msg: &str) {
    assert!(!msg.is_empty(), "empty datagram");
    for line in msg.split('\n') {
        let (k, _) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not KEY=VALUE: {line:?} in {msg:?}"));
        assert!(
            !k.is_empty() && k.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
            "bad key {k:?} in {msg:?}"
        );
    }
}

/// The value of `key` in a notification.
fn value<'a>(msg: &'a str, key: &str) -> Option<&'a str> {
    msg.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

fn reverse_roundtrip(port: u16, line: &str) {
    let mut s = connect(port);
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let got = read_exact_n(&mut s, line.len() + 1);
    let want: String = line.chars().rev().collect();
    assert_eq!(String::from_utf8_lossy(&got), format!("{want}\n"));
}

/// A config file (a reload needs one) listening on a port that was free a
/// moment ago (config files cannot say port 0).
fn config_file() -> PathBuf {
    let port = free_port();
    temp_file(
        "xps_config.json",
        &format!(
            r#"{{ "servers": [ {{ "listeners": [ {{ "host": "127.0.0.1", "port": {port} }} ] }} ] }}"#
        ),
    )
}

#[test]
fn notify_ready_reloading_stopping() {
    let mut notify = NotifySocket::new();
    let config = config_file();
    let mut server = Server::start_with(
        Command::new(XPS)
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify.path),
        1,
    );

    // Ready once listening, with a status (in the same datagram or its own).
    let ready = notify.expect("READY=1");
    if value(&ready, "STATUS").is_none() {
        notify.expect_status();
    }
    reverse_roundtrip(server.port(), "ready means listening");

    // A reload is bracketed by RELOADING=1 (stamped with the monotonic clock
    // when it started) and READY=1.
    let before = monotonic_usec();
    server.signal(libc::SIGHUP);
    let reloading = notify.expect("RELOADING=1");
    let usec: u64 = value(&reloading, "MONOTONIC_USEC")
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC=: {reloading:?}"))
        .parse()
        .expect("MONOTONIC_USEC= a number");
    let after = monotonic_usec();
    assert!(
        before <= usec && usec <= after,
        "MONOTONIC_USEC={usec} not within [{before}, {after}]"
    );
    notify.expect("READY=1");
    reverse_roundtrip(server.port(), "still serving after the reload");

    // Shutdown starts with STOPPING=1, and then xps exits 0.
    server.signal(libc::SIGTERM);
    notify.expect("STOPPING=1");
    let st = server.wait_exit(WAIT).expect("xps exits after SIGTERM");
    assert_eq!(st.code(), Some(0), "log: {:?}", server.drain_log());
}

/// `systemd-socket-activate`, then xps in its place; killed on drop.
struct Activated {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Activated {
    fn start(tool: &Path, ports: &[u16], workers: usize) -> Activated {
        let mut cmd = Command::new(tool);
        for p in ports {
            cmd.arg("-l").arg(format!("127.0.0.1:{p}"));
        }
        let mut child = cmd
            .arg(XPS)
            .arg("--workers")
            .arg(workers.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn systemd-socket-activate");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut a = Activated {
            child,
            lines,
            log: Vec::new(),
        };
        // The tool says "Listening on 127.0.0.1:P as 3." per socket, then waits
        // for the first connection before it execs xps.
        for p in ports {
            a.wait_line(&format!("Listening on 127.0.0.1:{p} "));
        }
        a
    }

    fn wait_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        if let Some(l) = self.log.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.log.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!("no line with {needle:?}; log: {:?}", self.log),
            }
        }
    }

    fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn socket_activation(ports: usize, workers: usize) {
    let Some(tool) = socket_activate_tool() else {
        eprintln!(
            "\n!!!!! SKIPPED: systemd-socket-activate is not installed \
             (apt-get install systemd); socket activation is NOT tested !!!!!\n"
        );
        return;
    };
    let ports: Vec<u16> = (0..ports).map(|_| free_port()).collect();
    let mut xps = Activated::start(&tool, &ports, workers);

    // The first connection makes the tool exec xps; the kernel has already
    // completed it on the passed socket, so xps must accept and answer it.
    let mut first = connect(ports[0]);
    first.write_all(b"activated\n").unwrap();
    assert_eq!(read_exact_n(&mut first, 10), b"detavitca\n");

    // Each passed socket is logged like any listener, and nothing else is
    // bound (not the default ports either).
    for p in &ports {
        xps.wait_line(&format!("Server listening on port {p}"));
    }
    // Many connections on every port, open at once, so every worker takes some.
    let mut conns = Vec::new();
    for p in &ports {
        for i in 0..8 {
            let mut s = connect(*p);
            s.write_all(format!("port {p} conn {i}\n").as_bytes())
                .unwrap();
            conns.push((s, format!("port {p} conn {i}")));
        }
    }
    for (mut s, line) in conns {
        let got = read_exact_n(&mut s, line.len() + 1);
        let want: String = line.chars().rev().collect();
        assert_eq!(String::from_utf8_lossy(&got), format!("{want}\n"));
    }
    for p in &ports {
        reverse_roundtrip(*p, "one more");
    }
    while let Ok(l) = xps.lines.try_recv() {
        xps.log.push(l);
    }
    let listening: Vec<&String> = xps
        .log
        .iter()
        .filter(|l| l.contains("Server listening on port"))
        .collect();
    assert_eq!(
        listening.len(),
        ports.len(),
        "one listening line per passed socket, nothing bound besides: {listening:?}"
    );
    drop(first);

    // SIGTERM drains and exits 0, as when xps binds its own sockets.
    // SAFETY: kill(2) on the pid of the child this test started.
    unsafe {
        libc::kill(xps.child.id() as i32, libc::SIGTERM);
    }
    assert_eq!(xps.wait_exit(), Some(0), "log: {:?}", xps.log);
}

#[test]
fn socket_activation_one_worker() {
    socket_activation(1, 1);
}

#[test]
fn socket_activation_two_workers_two_sockets() {
    socket_activation(2, 2);
}
