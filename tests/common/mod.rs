//! Shared helpers for the integration tests: start the real `xps` binary on
//! ephemeral loopback ports, find the ports it bound from its start-up log,
//! talk to it, and stop it.
#![allow(dead_code)] // each test file uses a different subset

pub mod browser;
pub mod http;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Path of the binary under test.
pub const XPS: &str = env!("CARGO_BIN_EXE_xps");

/// A running server; killed (SIGKILL) on drop if still running.
pub struct Server {
    pub child: Child,
    /// Ports it logged as listening, in order.
    pub ports: Vec<u16>,
    /// Every stderr line so far is forwarded here by a reader thread.
    stderr_rx: mpsc::Receiver<String>,
    /// Lines already received from `stderr_rx`.
    pub log: Vec<String>,
}

impl Server {
    /// Starts `xps` with `args` and waits until it has logged `expect_ports`
    /// "Server listening on port N" lines.
    pub fn start(args: &[&str], expect_ports: usize) -> Server {
        Self::start_with(Command::new(XPS).args(args), expect_ports)
    }

    /// Starts `xps --listen 127.0.0.1:0` (× `n` listeners) plus `extra` args.
    pub fn start_n(n: usize, extra: &[&str]) -> Server {
        let mut args: Vec<&str> = Vec::new();
        for _ in 0..n {
            args.push("--listen");
            args.push("127.0.0.1:0");
        }
        args.extend_from_slice(extra);
        Self::start(&args, n)
    }

    /// Starts a prepared command (for env vars, rlimits …).
    pub fn start_with(cmd: &mut Command, expect_ports: usize) -> Server {
        Self::start_with_stdout(cmd, Stdio::null(), expect_ports)
    }

    /// [`Server::start_with`] with the server's stdout given (`--access-log -`
    /// into a pipe: `Stdio::piped()`, then take `child.stdout`).
    pub fn start_with_stdout(cmd: &mut Command, stdout: Stdio, expect_ports: usize) -> Server {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn xps");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Server {
            child,
            ports: Vec::new(),
            stderr_rx: rx,
            log: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.ports.len() < expect_ports {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = server
                .stderr_rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("xps did not start; log so far: {:?}", server.log));
            if let Some(rest) = line.split("Server listening on port ").nth(1) {
                let port: u16 = rest.split_whitespace().next().unwrap().parse().unwrap();
                server.ports.push(port);
            }
            server.log.push(line);
        }
        server
    }

    pub fn port(&self) -> u16 {
        self.ports[0]
    }

    /// The port of the metrics endpoint it logged (`--metrics 127.0.0.1:0`).
    pub fn metrics_port(&self) -> u16 {
        self.log
            .iter()
            .find_map(|l| l.split("metrics on http://127.0.0.1:").nth(1))
            .and_then(|rest| rest.split('/').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no metrics line in {:?}", self.log))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A connected client on port index `i`.
    pub fn connect(&self, i: usize) -> TcpStream {
        connect(self.ports[i])
    }

    /// Sends a signal (libc) to the server.
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Collects log lines received so far (non-blocking) and returns them all.
    pub fn drain_log(&mut self) -> &[String] {
        while let Ok(l) = self.stderr_rx.try_recv() {
            self.log.push(l);
        }
        &self.log
    }

    /// Waits up to `timeout` for a log line containing `needle`.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        if self.drain_log().iter().any(|l| l.contains(needle)) {
            return true;
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_rx.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.contains(needle);
                    self.log.push(l);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// SIGHUP, then waits (up to 10 s) for the reload's outcome line
    /// ("configuration reloaded" or "reload failed") and returns it.
    pub fn reload(&mut self) -> String {
        let before = self.drain_log().len();
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.drain_log();
            if let Some(l) = log[before..]
                .iter()
                .find(|l| l.contains("configuration reloaded") || l.contains("reload failed"))
            {
                return l.clone();
            }
            assert!(Instant::now() < deadline, "no reload outcome: {log:?}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Resident set size of the server in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS:")
    }

    /// Server CPU time (user + system) in clock ticks, from /proc/PID/stat.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        // fields 14 and 15 of stat (utime, stime) are 11 and 12 after the comm.
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

/// Connects to 127.0.0.1:`port` with a 10 s read timeout.
pub fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads exactly `n` bytes (panics on timeout or EOF).
pub fn read_exact_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).expect("read reply");
    buf
}

/// Reads until EOF.
pub fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read to EOF");
    buf
}

/// Sends `input`, half-closes, and returns everything the server sends
/// back until it closes.
pub fn roundtrip_half_close(port: u16, input: &[u8]) -> Vec<u8> {
    let mut s = connect(port);
    let mut w = s.try_clone().unwrap();
    let input = input.to_vec();
    let writer = thread::spawn(move || {
        w.write_all(&input).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let out = read_to_end(&mut s);
    writer.join().unwrap();
    out
}

/// Runs `xps` with `args` to completion (for start-up errors) with a timeout.
pub fn run_to_exit(args: &[&str], timeout: Duration) -> (ExitStatus, String) {
    run_cmd_to_exit(Command::new(XPS).args(args), timeout)
}

pub fn run_cmd_to_exit(cmd: &mut Command, timeout: Duration) -> (ExitStatus, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn xps");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut out = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            return (st, out);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("xps {:?} did not exit within {:?}", cmd, timeout);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Writes a temp file with `contents` and returns its path (unique per call).
pub fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("xps-test-{}-{}", std::process::id(), n));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

/// A reference implementation of the reply to `input` (whole stream, then
/// half-close), from the library's pure protocol module.
pub fn expected(input: &[u8], max_line: usize) -> Vec<u8> {
    xps::protocol::reverse_stream(input, max_line)
}

/// `line` reversed byte by byte (the tests only send ASCII).
pub fn rev(line: &str) -> String {
    line.chars().rev().collect()
}

/// Pipelined lines `"{tag} {i:06} …"` (32 bytes each) and the exact replies
/// they must get.
pub fn numbered_lines(tag: &str, n: usize) -> (Vec<u8>, Vec<u8>) {
    let mut input = Vec::new();
    let mut output = Vec::new();
    for i in 0..n {
        let line = format!("{tag} {i:06} the quick brown fox");
        input.extend_from_slice(line.as_bytes());
        input.push(b'\n');
        output.extend_from_slice(rev(&line).as_bytes());
        output.push(b'\n');
    }
    (input, output)
}

/// Bytes waiting unread in the receive queue of the server's end of the
/// connection `server_port` ↔ `client_port` (from /proc/net/tcp).
pub fn server_rx_queue(server_port: u16, client_port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let port = |a: &str| u16::from_str_radix(a.rsplit(':').next()?, 16).ok();
        if port(f[1])? != server_port || port(f[2])? != client_port {
            return None;
        }
        u64::from_str_radix(f[4].split(':').nth(1)?, 16).ok()
    })
}

/// A loopback port nothing listens on right now, for a server that must be
/// told its port (a config file). Taken below the kernel's ephemeral range
/// (32768–60999 by default): a port from `bind(":0")`, once released, could
/// be taken by any client connection or `:0` listener of a test running
/// meanwhile before the server binds it ("Address already in use", seen
/// in CI). Each call of this process takes the next port of a sequence
/// that starts at an offset from the pid, and checks it can be bound.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN);
}

/// The value of one sample line of a Prometheus exposition (`name{labels}`
/// exactly as written).
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
        .parse()
        .unwrap()
}

/// The body of `GET /metrics` from the endpoint on 127.0.0.1:`port`
/// (asserting a 200).
pub fn scrape(port: u16) -> String {
    get_body(port, "/metrics")
}

/// The body of `GET PATH` from the endpoint on 127.0.0.1:`port`
/// (asserting a 200).
pub fn get_body(port: u16, path: &str) -> String {
    let mut s = connect(port);
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap()
}

/// `xps_connections_refused_total{reason="REASON"}` in an exposition.
pub fn refused(text: &str, reason: &str) -> f64 {
    sample(
        text,
        &format!("xps_connections_refused_total{{reason=\"{reason}\"}}"),
    )
}

/// `xps_connections_closed_total{reason="REASON"}` in an exposition.
pub fn closed(text: &str, reason: &str) -> f64 {
    sample(
        text,
        &format!("xps_connections_closed_total{{reason=\"{reason}\"}}"),
    )
}

/// Waits up to 10 s for `ok`, polling every 20 ms; `what` names it in the
/// failure.
pub fn wait_for(mut ok: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A PROXY protocol v1 header for `src` → `dst` (same family).
pub fn proxy_v1(src: std::net::SocketAddr, dst: std::net::SocketAddr) -> Vec<u8> {
    let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {fam} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// A PROXY protocol v2 `PROXY` header over TCP for `src` → `dst` (both
/// IPv4 or both IPv6), with one TLV (PP2_TYPE_NOOP, skipped by the server).
pub fn proxy_v2(src: std::net::SocketAddr, dst: std::net::SocketAddr) -> Vec<u8> {
    use std::net::SocketAddr::{V4, V6};
    let mut block = Vec::new();
    let fam = match (src, dst) {
        (V4(s), V4(d)) => {
            block.extend_from_slice(&s.ip().octets());
            block.extend_from_slice(&d.ip().octets());
            0x11
        }
        (V6(s), V6(d)) => {
            block.extend_from_slice(&s.ip().octets());
            block.extend_from_slice(&d.ip().octets());
            0x21
        }
        _ => panic!("mixed families"),
    };
    block.extend_from_slice(&src.port().to_be_bytes());
    block.extend_from_slice(&dst.port().to_be_bytes());
    block.extend_from_slice(&[0x04, 0x00, 0x03, b'a', b'b', b'c']);
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(fam);
    h.extend_from_slice(&(block.len() as u16).to_be_bytes());
    h.extend_from_slice(&block);
    h
}

/// One `read()`, retried when a signal interrupts it. A socket with a read
/// timeout (`connect` sets one) makes `recv()` fail with EINTR, even
/// without a signal handler, when the process is stopped and continued
/// (signal(7)); `read_exact` and `read_to_end` retry by themselves, a bare
/// `read` does not.
pub fn read_once(s: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// The scripted session of the metrics tests: 3 clients that send 2 lines
/// and half-close, one that sends a line, reads it and resets, one that
/// stays silent until a 1 s idle timeout (`--idle-timeout 1`). Returns when
/// all five are closed: 7 lines, 34 bytes each way; 3 finished, 1 reset,
/// 1 idle timeout.
pub fn scripted_session(port: u16) {
    for _ in 0..3 {
        assert_eq!(roundtrip_half_close(port, b"abc\nhello\n"), b"cba\nolleh\n");
    }
    let mut r = connect(port);
    r.write_all(b"abc\n").unwrap();
    assert_eq!(read_exact_n(&mut r, 4), b"cba\n");
    socket2::SockRef::from(&r)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(r); // RST
    let mut idle = connect(port);
    let mut b = [0u8; 1];
    assert_eq!(
        read_once(&mut idle, &mut b).unwrap(),
        0,
        "idle client closed by the timeout"
    );
}

/// `systemd-socket-activate` on `PATH` (or the usual place), if installed.
pub fn socket_activate_tool() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([
            std::path::PathBuf::from("/usr/bin"),
            std::path::PathBuf::from("/bin"),
        ])
        .map(|d| d.join("systemd-socket-activate"))
        .find(|p| p.is_file())
}
