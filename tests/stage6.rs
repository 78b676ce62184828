//! `examples/stage6.rs` — the tutorial's server on xps's own event loop,
//! listener and connection code, with no feature of SPEC §5–§8 — and `xps`
//! itself, put through what the official eXpServer tester checks in its
//! stages 6–9: the tester's config shape (ports 8001–8004 there, free ports
//! here), random strings reversed on every port, ten clients at once, a
//! client that disconnects by force, a client that streams without reading
//! while another is served (non-blocking), no CPU used while idle, and a
//! clean SIGTERM. The last test proves the example links none of the
//! features' code.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{Server, XPS, connect, free_port, read_exact_n, temp_file};

/// The example binary, built by `cargo test` beside the test binaries.
fn stage6_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join("examples").join("stage6");
    assert!(
        path.exists(),
        "{} is missing: `cargo test` (without a target filter) builds the examples",
        path.display()
    );
    // A filtered `cargo test --test stage6` does not rebuild the examples:
    // run `cargo build --release --examples` first, or `cargo test` whole.
    path
}

/// The official tester's `xps_config.json` shape: four listeners, four
/// workers, keys this release does not serve.
fn tester_config(ports: &[u16]) -> PathBuf {
    let listeners: Vec<String> = ports
        .iter()
        .map(|p| format!(r#"{{ "host": "127.0.0.1", "port": {p} }}"#))
        .collect();
    temp_file(
        "xps_config.json",
        &format!(
            r#"{{
  "server_name": "eXpServer",
  "workers": 4,
  "servers": [{{
    "listeners": [{}],
    "routes": [{{ "req_path": "/", "type": "file_serve", "dir_path": "public" }}]
  }}]
}}"#,
            listeners.join(", ")
        ),
    )
}

/// Starts `binary CONFIG` with the tester's config on four free ports.
fn start(binary: &std::path::Path) -> Server {
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let config = tester_config(&ports);
    let server = Server::start_with(Command::new(binary).arg(&config), 4);
    assert_eq!(server.ports, ports, "every listener of the config");
    server
}

/// A few pseudo-random strings of [A-Za-z0-9], each under 100 bytes and
/// ended by LF, as the tester's `generateRandomStrings` makes them.
fn random_lines(count: usize, mut seed: u64) -> Vec<String> {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..count)
        .map(|_| {
            let len = (next() % 100) as usize;
            let mut s: String = (0..len)
                .map(|_| CHARS[(next() % CHARS.len() as u64) as usize] as char)
                .collect();
            s.push('\n');
            s
        })
        .collect()
}

/// The line reversed, its LF kept at the end (the tester's `reverseString`).
fn reversed(line: &str) -> String {
    let body = line.strip_suffix('\n').unwrap_or(line);
    let mut r: String = body.chars().rev().collect();
    r.push('\n');
    r
}

/// Every check, against one server binary.
fn tester_stages_6_to_9(binary: &std::path::Path) {
    let mut server = start(binary);

    // Single client, input/output, on each of the four ports: one string
    // at a time, each answered before the next is sent.
    for (i, &port) in server.ports.iter().enumerate() {
        let mut c = connect(port);
        for line in random_lines(200, 0x9e37_79b9 + i as u64) {
            c.write_all(line.as_bytes()).unwrap();
            let want = reversed(&line);
            assert_eq!(
                String::from_utf8(read_exact_n(&mut c, want.len())).unwrap(),
                want,
                "port {port}"
            );
        }
    }

    // Ten clients on the same port at once.
    let port = server.port();
    let clients: Vec<_> = (0..10)
        .map(|i| {
            thread::spawn(move || {
                let mut c = connect(port);
                let line = format!("string-{i}\n");
                c.write_all(line.as_bytes()).unwrap();
                let want = reversed(&line);
                assert_eq!(read_exact_n(&mut c, want.len()), want.as_bytes());
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }

    // Error handling: a client that disconnects by force (a reset) changes
    // nothing for an existing client or a new one.
    let mut existing = connect(port);
    let gone = connect(port);
    gone.write_all_then_reset(b"half a line");
    existing.write_all(b"still here\n").unwrap();
    assert_eq!(read_exact_n(&mut existing, 11), b"ereh llits\n");
    let mut new = connect(port);
    new.write_all(b"new\n").unwrap();
    assert_eq!(read_exact_n(&mut new, 4), b"wen\n");

    // Non-blocking: a client streams without reading (the tester sends a
    // 4 GB file); a second client, a second later, is answered at once.
    let streamer = thread::spawn(move || {
        let mut c = connect(port);
        // The server stops reading it (flow control): a write then blocks.
        c.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let chunk = vec![b'x'; 1 << 16];
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let _ = c.write_all(&chunk); // a timeout: try again until the deadline
        }
    });
    thread::sleep(Duration::from_secs(1));
    let mut second = connect(port);
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    second.write_all(b"hello world\n").unwrap();
    assert_eq!(read_exact_n(&mut second, 12), b"dlrow olleh\n");
    streamer.join().unwrap();

    // CPU usage: with an idle client connected, the process sleeps.
    let _idle = connect(port);
    thread::sleep(Duration::from_millis(200));
    let before = server.cpu_ticks();
    thread::sleep(Duration::from_secs(2));
    let used = server.cpu_ticks() - before;
    assert!(used <= 5, "{used} clock ticks of CPU in 2 s of idleness");

    // A clean stop.
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10)).expect("exit");
    assert_eq!(status.code(), Some(0), "log: {:?}", server.drain_log());
}

/// A client that sends a few bytes and then resets the connection.
trait ResetAfter {
    fn write_all_then_reset(self, bytes: &[u8]);
}

impl ResetAfter for TcpStream {
    fn write_all_then_reset(mut self, bytes: &[u8]) {
        self.write_all(bytes).unwrap();
        // SO_LINGER with a zero timeout: close() sends a reset.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and a valid, live option value.
        unsafe {
            use std::os::fd::AsRawFd;
            libc::setsockopt(
                self.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
        drop(self);
    }
}

#[test]
fn the_stage6_example_passes_the_tester_stages_6_to_9() {
    tester_stages_6_to_9(&stage6_binary());
}

#[test]
fn xps_passes_the_tester_stages_6_to_9() {
    tester_stages_6_to_9(std::path::Path::new(XPS));
}

#[test]
fn the_stage6_example_narrates_its_loop_at_trace_level() {
    let mut server = Server::start_with(
        Command::new(stage6_binary()).args(["--listen", "127.0.0.1:0", "--log-level", "trace"]),
        1,
    );
    let mut c = connect(server.port());
    c.write_all(b"abc\n").unwrap();
    assert_eq!(read_exact_n(&mut c, 4), b"cba\n");
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server
        .drain_log()
        .iter()
        .any(|l| l.contains("closed: peer closed"))
    {
        assert!(Instant::now() < deadline, "no close line: {:?}", server.log);
        thread::sleep(Duration::from_millis(20));
    }
    let log = server.drain_log().join("\n");
    for want in [
        ": accept: a connection from 127.0.0.1:",
        ": accept: WouldBlock, backlog empty",
        "[TRACE] xps_connection_create() : #0: created, from 127.0.0.1:",
        "[TRACE] xps_loop_run() : #0: epoll event IN|OUT",
        "[TRACE] xps_connection_read_handler() : #0: read 4 byte(s), 1 line(s) answered",
        "[TRACE] xps_connection_write_handler() : #0: wrote 4 byte(s), 0 left for the next writable edge",
        "[TRACE] xps_connection_read_handler() : #0: read: end of input (the client half-closed)",
        "[TRACE] xps_connection_destroy() : #0: closed: peer closed, all replies sent",
    ] {
        assert!(log.contains(want), "no {want:?} in:\n{log}");
    }
}

#[test]
fn the_trace_shows_flow_control_pausing_and_resuming_a_connection() {
    let mut server = Server::start_with(
        Command::new(stage6_binary()).args(["--listen", "127.0.0.1:0", "--log-level", "trace"]),
        1,
    );
    // 8 MiB of lines from a client with a small receive buffer that reads
    // nothing for a while: the replies fill the kernel's buffers, then pass
    // the 1 MiB high-water mark; reading pauses, and resumes as they drain.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    let at: std::net::SocketAddr = format!("127.0.0.1:{}", server.port()).parse().unwrap();
    sock.connect(&at.into()).unwrap();
    let mut c: TcpStream = sock.into();
    let line = [b"y".repeat(1023), b"\n".to_vec()].concat();
    let lines = 8192;
    let writer = {
        let mut c = c.try_clone().unwrap();
        let line = line.clone();
        thread::spawn(move || {
            for _ in 0..lines {
                c.write_all(&line).unwrap();
            }
        })
    };
    thread::sleep(Duration::from_secs(1));
    let got = read_exact_n(&mut c, lines * 1024);
    assert!(got.chunks(1024).all(|l| l == line.as_slice()));
    writer.join().unwrap();
    let log = server.drain_log().join("\n");
    for want in [
        "[TRACE] xps_connection_read_handler() : #0: flow control: 1 MiB of replies wait, reading paused",
        "[TRACE] xps_connection_write_handler() : #0: flow control: replies drained, reading again",
    ] {
        assert!(log.contains(want), "no {want:?} in the trace");
    }
    // And writes the socket refused in part, the rest left for its edge.
    assert!(
        log.lines()
            .any(|l| l.contains("xps_connection_write_handler() : #0: wrote")
                && !l.contains(", 0 left")),
        "no partial write in the trace"
    );
}

#[test]
fn the_stage6_example_links_no_feature() {
    // The features reach the core only through its hooks; with `()` as the
    // hooks, none of their code is in the binary.
    let out = match Command::new("nm").arg("-C").arg(stage6_binary()).output() {
        Ok(out) if out.status.success() => out,
        _ => {
            eprintln!("SKIPPED: nm (binutils) is not available");
            return;
        }
    };
    let symbols = String::from_utf8_lossy(&out.stdout);
    assert!(
        symbols.contains("xps::core::"),
        "the example runs the core (is this the right binary?)"
    );
    // A symbol's own path: `core::ptr::drop_in_place<…>` of a type with the
    // same layout as a feature's may carry its name after function merging.
    let defined = |line: &str, path: &str| {
        line.splitn(3, ' ')
            .nth(2)
            .is_some_and(|name| name.starts_with(path) || name.starts_with(&format!("<{path}")))
    };
    for feature in [
        "xps::features::",
        "xps::observe::",
        "xps::control::reload::",
        "xps::control::systemd::",
        "xps::policy::proxy_protocol::",
        "xps::policy::budget::",
        "xps::policy::source_limit::",
    ] {
        let found: Vec<&str> = symbols
            .lines()
            .filter(|l| defined(l, feature))
            .take(3)
            .collect();
        assert!(
            found.is_empty(),
            "{feature} is linked into stage6: {found:?}"
        );
    }
}

#[test]
fn stage6_reads_what_it_was_sent_byte_by_byte() {
    // The protocol does not depend on how TCP split the bytes.
    let server = Server::start_with(
        Command::new(stage6_binary()).args(["--listen", "127.0.0.1:0"]),
        1,
    );
    let mut c = connect(server.port());
    for b in "héllo wörld\r\nxyz\n".bytes() {
        c.write_all(&[b]).unwrap();
        c.flush().unwrap();
    }
    let want = "dlröw olléh\r\nzyx\n".as_bytes();
    assert_eq!(read_exact_n(&mut c, want.len()), want);
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}
