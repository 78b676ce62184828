//! Start-up behaviour (SPEC §1) and the log's shape (SPEC §4): exit statuses,
//! one-line errors that name the address or file, options, the eXpServer
//! tester's config file, IPv6, colours, DEBUG lines and SIGTERM.
//!
//! Every test here runs the real binary; none assumes a fixed port is free.

mod common;
use common::*;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const EXIT_WAIT: Duration = Duration::from_secs(60);

/// Runs `xps args…` to completion; returns (exit code, stdout + stderr).
fn run(args: &[&str]) -> (i32, String) {
    let (st, out) = run_to_exit(args, EXIT_WAIT);
    (code(st), out)
}

fn code(st: ExitStatus) -> i32 {
    st.code()
        .unwrap_or_else(|| panic!("xps was killed by a signal: {st}"))
}

/// No panic message and no backtrace in the output.
#[track_caller]
fn assert_no_panic(out: &str) {
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(!out.contains(bad), "output contains {bad:?}:\n{out}");
    }
}

/// Exit status `want`, the output names each of `needles`, no panic.
#[track_caller]
fn assert_fails(args: &[&str], want: i32, needles: &[&str]) -> String {
    let (got, out) = run(args);
    assert_eq!(got, want, "exit status of xps {args:?}; output:\n{out}");
    for n in needles {
        assert!(
            out.contains(n),
            "output of xps {args:?} does not name {n:?}:\n{out}"
        );
    }
    assert_no_panic(&out);
    out
}

/// Exit status 2 for a config file with `contents`; the message names the file
/// and each of `needles`, on one `[ERROR]` line.
#[track_caller]
fn assert_bad_config(contents: &str, needles: &[&str]) {
    let path = temp_file("xps_config.json", contents);
    let p = path.to_str().unwrap();
    let out = assert_fails(&[p], 2, needles);
    let line = out
        .lines()
        .find(|l| l.contains(p))
        .unwrap_or_else(|| panic!("no line names {p}:\n{out}"));
    assert!(line.starts_with("[ERROR]"), "not an [ERROR] line: {line}");
    for n in needles {
        assert!(
            line.contains(n),
            "the line naming the file lacks {n:?}: {line}"
        );
    }
}

/// `n` ports nothing listens on (see `common::free_port`).
fn free_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| free_port()).collect()
}

/// The address xps logged for `port`: "Server listening on port P (ADDR)".
fn logged_addr(server: &Server, port: u16) -> String {
    let needle = format!("Server listening on port {port} (");
    let line = server
        .log
        .iter()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no listening line for {port}: {:?}", server.log));
    let rest = &line[line.find(&needle).unwrap() + needle.len()..];
    rest[..rest.find(')').unwrap()].to_string()
}

/// One exact round trip on a connected stream.
fn check_roundtrip(mut s: TcpStream, tag: &str) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let line = format!("{tag} \u{e9}x\r\n");
    let want = format!("x\u{e9} {}\r\n", tag.chars().rev().collect::<String>());
    s.write_all(line.as_bytes()).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(String::from_utf8_lossy(&got), want, "reply on {tag}");
}

/// A `Command` for xps with the log-related environment cleared.
fn xps_cmd() -> Command {
    let mut c = Command::new(XPS);
    c.env_remove("XPS_DEBUG")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR");
    c
}

// ---------------------------------------------------------------------------
// Listeners that cannot be opened: exit 1
// ---------------------------------------------------------------------------

#[test]
fn port_in_use_exits_1_naming_the_address() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("127.0.0.1:{}", busy.local_addr().unwrap().port());
    let out = assert_fails(&["--listen", &addr], 1, &[&addr, "Address already in use"]);
    // One line, an error.
    let errors: Vec<&str> = out.lines().filter(|l| l.contains(&addr)).collect();
    assert_eq!(errors.len(), 1, "{out}");
    assert!(errors[0].starts_with("[ERROR]"), "{out}");
    // A good listener before the busy one does not get served either: the
    // failure stops start-up before anything runs.
    let out = assert_fails(
        &["--listen", "127.0.0.1:0", "--listen", &addr],
        1,
        &[&addr, "Address already in use"],
    );
    assert!(!out.contains("all connections closed"), "{out}");
    drop(busy);
}

#[test]
fn unresolvable_host_exits_1_naming_it() {
    assert_fails(
        &["--listen", "no-such-host.invalid:8080"],
        1,
        &["no-such-host.invalid:8080"],
    );
}

/// Defect 9 (issue 8): text from the config reaches the log escaped. A host
/// with a LF cannot forge a "Server listening" line, and an ESC in an ignored
/// key name or a host does not reach the terminal raw.
#[test]
fn config_text_cannot_forge_log_lines() {
    let listener = |host: &str| {
        format!(
            r#"{{ "servers": [ {{ "listeners": [ {{ "host": "{host}", "port": 1 }} ],
                                "evil\u001b[2Jkey": true }} ] }}"#
        )
    };
    // The forged line. (The config parser now also refuses the host for
    // its brackets, exit 2; before that it failed to resolve, exit 1.)
    let forged = "no-such-host.invalid\\n[INFO] main() : Server listening on port 1";
    // ESC c (a terminal reset) in a host that gets as far as resolving.
    let escape = "no-such-host\\u001bc.invalid";
    for (host, shown) in [
        (
            forged,
            "no-such-host.invalid\\n[INFO] main() : Server listening on port 1",
        ),
        (escape, "no-such-host\\x1bc.invalid"),
    ] {
        let path = temp_file("xps_config.json", &listener(host));
        let (got, out) = run(&[path.to_str().unwrap()]);
        assert_ne!(got, 0, "a bad host must stop start-up:\n{out}");
        assert_no_panic(&out);
        for line in out.lines() {
            assert!(
                !line.starts_with("[INFO] main() : Server listening"),
                "forged line {line:?} in:\n{out}"
            );
        }
        assert!(!out.contains('\x1b'), "raw ESC in the log:\n{out:?}");
        assert!(
            out.lines()
                .any(|l| l.starts_with("[ERROR]") && l.contains(shown)),
            "the host is not named escaped on an [ERROR] line:\n{out}"
        );
        if host == escape {
            assert!(
                out.lines()
                    .any(|l| l.starts_with("[WARNING]") && l.contains("evil\\x1b[2Jkey")),
                "the key is not named escaped on a [WARNING] line:\n{out}"
            );
        }
    }
}

#[test]
fn address_not_on_this_machine_exits_1_naming_it() {
    // 192.0.2.0/24 is TEST-NET-1: never assigned here, so bind() fails with
    // EADDRNOTAVAIL. Nothing is ever sent to it.
    assert_fails(
        &["--listen", "192.0.2.1:0"],
        1,
        &["192.0.2.1:0", "Cannot assign requested address"],
    );
}

// ---------------------------------------------------------------------------
// Bad config files: exit 2, naming the file
// ---------------------------------------------------------------------------

#[test]
fn missing_config_file_exits_2() {
    let dir = temp_file("placeholder", "");
    let missing = dir.with_file_name("does-not-exist.json");
    let p = missing.to_str().unwrap();
    assert_fails(&[p], 2, &[p, "No such file or directory"]);
}

#[test]
fn config_that_is_not_json_exits_2_with_line_and_column() {
    // Line 3, column 6 is the stray comma.
    assert_bad_config("{\n  \"servers\": [\n    {,}\n  ]\n}\n", &["line 3:6"]);
    assert_bad_config("listeners = 8001\n", &["line 1:"]);
    assert_bad_config("", &["EOF"]);
}

#[test]
fn config_with_wrong_types_exits_2() {
    // The port as a string: line 5, column 45 is the end of "8001".
    let text = "{\n  \"servers\": [\n    {\n      \"listeners\": [\n        \
                { \"host\": \"127.0.0.1\", \"port\": \"8001\" }\n      ]\n    }\n  ]\n}\n";
    assert_bad_config(text, &["line 5:45", "invalid type", "\"8001\""]);
    // workers as a string.
    assert_bad_config(
        "{\"workers\": \"four\", \"servers\": [{\"listeners\": [{\"host\": \"127.0.0.1\", \"port\": 1}]}]}",
        &["line 1:", "\"four\""],
    );
    // servers as an object.
    assert_bad_config("{\"servers\": {}}", &["line 1:", "invalid type"]);
}

#[test]
fn config_port_out_of_range_exits_2() {
    for port in ["0", "70000", "-1"] {
        let text = format!(
            "{{\"servers\": [{{\"listeners\": [{{\"host\": \"127.0.0.1\", \"port\": {port}}}]}}]}}"
        );
        assert_bad_config(&text, &["servers[0].listeners[0].port", port]);
    }
}

#[test]
fn config_without_listeners_exits_2() {
    assert_bad_config("{\"servers\": []}", &["no listeners"]);
    assert_bad_config("{\"servers\": [{\"listeners\": []}]}", &["no listeners"]);
    assert_bad_config(
        "{\"servers\": [{\"listeners\": []}, {\"listeners\": []}]}",
        &["no listeners"],
    );
}

#[test]
fn config_with_zero_workers_exits_2() {
    assert_bad_config(
        "{\"workers\": 0, \"servers\": [{\"listeners\": [{\"host\": \"127.0.0.1\", \"port\": 1}]}]}",
        &["workers"],
    );
}

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

#[test]
fn bad_options_exit_2() {
    assert_fails(&["--bogus"], 2, &["--bogus"]);
    assert_fails(&["--workers", "0"], 2, &["--workers"]);
    assert_fails(&["-w", "0"], 2, &["--workers"]);
    assert_fails(&["--max-line", "0"], 2, &["--max-line"]);
    assert_fails(&["--listen", "localhost"], 2, &["--listen", "localhost"]);
    assert_fails(&["--listen", "127.0.0.1"], 2, &["--listen", "127.0.0.1"]);
    assert_fails(&["--listen", "127.0.0.1:70000"], 2, &["70000"]);
    assert_fails(&["--log-level", "bogus"], 2, &["--log-level", "bogus"]);
    assert_fails(&["--workers", "many"], 2, &["--workers", "many"]);
}

/// Defect 10 (issue 8): `--listen '[]:0'` bound 0.0.0.0; now it is refused
/// with the config's words for the same host, and `:PORT` still means all
/// interfaces (checked by the unit tests; binding 0.0.0.0 here would not be
/// loopback-only).
#[test]
fn listen_with_an_empty_bracketed_host_exits_2() {
    for arg in ["[]:0", "[ ]:0"] {
        let out = assert_fails(&["--listen", arg], 2, &["--listen", arg, "host is empty"]);
        assert!(!out.contains("Server listening"), "{out}");
    }
}

#[test]
fn help_and_version_exit_0() {
    for flag in ["--help", "-h"] {
        let (c, out) = run(&[flag]);
        assert_eq!(c, 0, "{flag}: {out}");
        assert!(out.contains("Usage: xps"), "{flag}: {out}");
        for opt in ["--listen", "--workers", "--max-line", "--idle-timeout"] {
            assert!(out.contains(opt), "{flag} does not mention {opt}: {out}");
        }
        assert_no_panic(&out);
    }
    for flag in ["--version", "-V"] {
        let (c, out) = run(&[flag]);
        assert_eq!(c, 0, "{flag}: {out}");
        assert_eq!(
            out.trim(),
            format!("xps {}", env!("CARGO_PKG_VERSION")),
            "{flag}"
        );
    }
}

// ---------------------------------------------------------------------------
// The official tester's config shape
// ---------------------------------------------------------------------------

fn tester_config(host: &str, ports: &[u16]) -> String {
    let listeners: Vec<String> = ports
        .iter()
        .map(|p| format!("{{ \"host\": \"{host}\", \"port\": {p} }}"))
        .collect();
    format!(
        r#"{{
  "server_name": "eXpServer",
  "workers": 4,
  "servers": [
    {{
      "listeners": [
        {}
      ],
      "routes": [
        {{ "req_path": "/", "type": "file_serve", "dir_path": "../public" }}
      ],
      "gzip_enable": true,
      "gzip_level": 8
    }}
  ]
}}
"#,
        listeners.join(",\n        ")
    )
}

/// Starts xps with the tester-shaped config; every port serves, and the
/// ignored keys are named in exactly one warning.
fn check_tester_config(host: &str) {
    let ports = free_ports(4);
    let path = temp_file("xps_config.json", &tester_config(host, &ports));
    let mut server = Server::start(&[path.to_str().unwrap()], 4);
    let mut logged = server.ports.clone();
    logged.sort_unstable();
    let mut want = ports.clone();
    want.sort_unstable();
    assert_eq!(logged, want, "listening ports; log: {:?}", server.log);
    // Several connections per port, so that all 4 workers take some.
    for &port in &ports {
        let addr = logged_addr(&server, port);
        for i in 0..8 {
            let s =
                TcpStream::connect(addr.as_str()).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
            check_roundtrip(s, &format!("port {port} conn {i}"));
        }
    }
    // Concurrent clients on all ports at once.
    let threads: Vec<_> = ports
        .iter()
        .flat_map(|&port| {
            let addr = logged_addr(&server, port);
            (0..4).map(move |i| {
                let addr = addr.clone();
                thread::spawn(move || {
                    let mut s = TcpStream::connect(addr.as_str()).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    for n in 0..50 {
                        let line = format!("{port}/{i}/{n}\n");
                        s.write_all(line.as_bytes()).unwrap();
                        let mut got = vec![0; line.len()];
                        s.read_exact(&mut got).unwrap();
                        let mut want: Vec<u8> = line.trim_end().bytes().rev().collect();
                        want.push(b'\n');
                        assert_eq!(got, want);
                    }
                })
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "xps exited: {:?}",
        server.drain_log()
    );
    let log = server.drain_log().to_vec();
    let warnings: Vec<&String> = log.iter().filter(|l| l.contains("ignored")).collect();
    assert_eq!(warnings.len(), 1, "one warning for ignored keys: {log:?}");
    let w = warnings[0];
    assert!(w.starts_with("[WARNING]"), "{w}");
    for key in ["routes", "gzip_enable", "gzip_level"] {
        assert!(w.contains(key), "the warning does not name {key}: {w}");
    }
    for key in ["server_name", "workers", "listeners"] {
        assert!(!w.contains(key), "{key} is served, not ignored: {w}");
    }
    assert!(!log.iter().any(|l| l.contains("[ERROR]")), "{log:?}");
    assert_no_panic(&log.join("\n"));
}

#[test]
fn tester_shaped_config_serves_every_port() {
    check_tester_config("127.0.0.1");
}

#[test]
fn tester_shaped_config_with_localhost() {
    check_tester_config("localhost");
}

// ---------------------------------------------------------------------------
// IPv6
// ---------------------------------------------------------------------------

#[test]
fn ipv6_loopback_listener() {
    if let Err(e) = TcpListener::bind("[::1]:0") {
        eprintln!("SKIPPED: this machine cannot bind [::1]:0 ({e})");
        return;
    }
    let server = Server::start(&["--listen", "[::1]:0"], 1);
    assert_eq!(
        logged_addr(&server, server.port()),
        format!("[::1]:{}", server.port())
    );
    let s = TcpStream::connect(("::1", server.port())).expect("connect [::1]");
    check_roundtrip(s, "six");
    // And next to an IPv4 listener.
    let server = Server::start(&["--listen", "[::1]:0", "--listen", "127.0.0.1:0"], 2);
    check_roundtrip(
        TcpStream::connect(("::1", server.ports[0])).unwrap(),
        "six again",
    );
    check_roundtrip(connect(server.ports[1]), "four");
}

// ---------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------

/// Stops `server` with SIGTERM and returns its whole log.
fn stop_and_collect_log(mut server: Server) -> Vec<String> {
    server.signal(libc::SIGTERM);
    let st = server
        .wait_exit(Duration::from_secs(10))
        .expect("xps did not exit after SIGTERM");
    assert!(st.success(), "exit status after SIGTERM: {st}");
    assert!(
        server.wait_log("all connections closed", Duration::from_secs(5)),
        "{:?}",
        server.log
    );
    server.drain_log().to_vec()
}

#[test]
fn default_log_shape_without_colour_or_debug() {
    let server = Server::start_with(xps_cmd().args(["--listen", "127.0.0.1:0"]), 1);
    let port = server.port();
    let want = format!("[INFO] main() : Server listening on port {port}");
    assert!(
        server.log.iter().any(|l| l.starts_with(&want)),
        "{:?}",
        server.log
    );
    assert_eq!(roundtrip_half_close(port, b"quiet\n"), b"teiuq\n");
    let log = stop_and_collect_log(server);
    for l in &log {
        assert!(!l.contains('\x1b'), "ANSI escape on a pipe: {l:?}");
        assert!(
            !l.contains("[DEBUG]"),
            "DEBUG line without XPS_DEBUG: {l:?}"
        );
        assert!(
            l.starts_with('[') && l.contains("] ") && l.contains(" : "),
            "not [LEVEL] source : message: {l:?}"
        );
    }
}

#[test]
fn debug_lines_with_xps_debug_log_level_or_rust_log() {
    type Variant<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let variants: [Variant; 3] = [
        (&[("XPS_DEBUG", "1")], &[]),
        (&[], &["--log-level", "debug"]),
        (&[("RUST_LOG", "debug")], &[]),
    ];
    for (env, args) in variants {
        let mut cmd = xps_cmd();
        cmd.envs(env.iter().copied())
            .args(["--listen", "127.0.0.1:0"])
            .args(args);
        let mut server = Server::start_with(&mut cmd, 1);
        assert_eq!(roundtrip_half_close(server.port(), b"loud\n"), b"duol\n");
        assert!(
            server.wait_log("[DEBUG]", Duration::from_secs(5)),
            "no [DEBUG] line for a connection with {env:?} {args:?}: {:?}",
            server.log
        );
        let log = stop_and_collect_log(server);
        let debug: Vec<&String> = log.iter().filter(|l| l.starts_with("[DEBUG]")).collect();
        assert!(
            debug.iter().any(|l| l.contains("connection")),
            "no DEBUG line about the connection with {env:?} {args:?}: {log:?}"
        );
        for l in &log {
            assert!(!l.contains('\x1b'), "ANSI escape on a pipe: {l:?}");
        }
    }
}

/// A pseudo-terminal (master, slave), or `None` if this machine has none.
fn open_pty() -> Option<(File, File)> {
    use std::ffi::CStr;
    use std::os::fd::FromRawFd;
    // SAFETY: plain libc calls on descriptors we own; each is checked.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        if m < 0 {
            return None;
        }
        let master = File::from_raw_fd(m);
        if libc::grantpt(m) != 0 || libc::unlockpt(m) != 0 {
            return None;
        }
        let mut name = [0 as libc::c_char; 256];
        if libc::ptsname_r(m, name.as_mut_ptr(), name.len()) != 0 {
            return None;
        }
        let s = libc::open(
            CStr::from_ptr(name.as_ptr()).as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY,
        );
        if s < 0 {
            return None;
        }
        Some((master, File::from_raw_fd(s)))
    }
}

/// Runs `xps --listen 127.0.0.1:0` with stderr on a terminal, stops it with
/// SIGTERM once it listens, and returns everything it wrote there.
fn run_on_tty(no_color: Option<&str>) -> Option<String> {
    let Some((mut master, slave)) = open_pty() else {
        eprintln!("SKIPPED: no pseudo-terminal on this machine");
        return None;
    };
    let mut cmd = xps_cmd();
    cmd.args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(slave));
    if let Some(v) = no_color {
        cmd.env("NO_COLOR", v);
    }
    let mut child = cmd.spawn().expect("spawn xps");
    drop(cmd); // our copy of the slave: the master sees EOF once xps exits
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // Ends with EIO (or 0) when the last slave descriptor closes.
        while let Ok(n) = read_once(&mut master, &mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&out).contains("Server listening on port") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => out.extend(chunk),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "xps did not start on a tty: {:?}",
                    String::from_utf8_lossy(&out)
                );
            }
        }
    }
    // Served once, so start-up is over (signal handlers included) before
    // the SIGTERM: the race at the very start has a test of its own.
    let text = strip_ansi(&String::from_utf8_lossy(&out));
    let port: u16 = text
        .split("Server listening on port ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {text:?}"));
    assert_eq!(roundtrip_half_close(port, b"tty\n"), b"ytt\n");
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let st = child.wait().unwrap();
    assert!(st.success(), "exit status after SIGTERM: {st}");
    while let Ok(chunk) = rx.recv_timeout(Duration::from_secs(10)) {
        out.extend(chunk);
    }
    reader.join().unwrap();
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Removes `ESC [ … m` sequences.
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    // On a terminal: coloured level tags (this proves the pty reaches xps).
    let Some(out) = run_on_tty(None) else { return };
    assert!(out.contains("\x1b["), "no colour on a terminal: {out:?}");
    assert!(
        strip_ansi(&out).contains("[INFO] main() : Server listening on port"),
        "{out:?}"
    );
    // NO_COLOR set (to anything non-empty): no escape codes at all.
    for v in ["1", "yes"] {
        let out = run_on_tty(Some(v)).unwrap();
        assert!(!out.contains('\x1b'), "colour with NO_COLOR={v}: {out:?}");
        assert!(
            out.contains("[INFO] main() : Server listening on port"),
            "{out:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------

#[test]
fn sigterm_on_an_idle_server_exits_0() {
    let mut server = Server::start_n(1, &[]);
    assert_eq!(roundtrip_half_close(server.port(), b"once\n"), b"ecno\n");
    server.signal(libc::SIGTERM);
    let st = server
        .wait_exit(Duration::from_secs(5))
        .expect("xps did not exit within 5 s of SIGTERM");
    assert_eq!(st.code(), Some(0), "exit status after SIGTERM: {st}");
    assert!(
        server.wait_log("SIGTERM", Duration::from_secs(5)),
        "{:?}",
        server.log
    );
    assert_no_panic(&server.drain_log().join("\n"));
}

#[test]
fn sigterm_with_an_idle_client_closes_it_and_exits_0() {
    let mut server = Server::start_n(1, &[]);
    let mut s = connect(server.port());
    s.write_all(b"abc\n").unwrap();
    assert_eq!(read_exact_n(&mut s, 4), b"cba\n");
    server.signal(libc::SIGTERM);
    // The server closes the idle connection: EOF, not a timeout.
    let rest = read_to_end(&mut s);
    assert!(rest.is_empty(), "{rest:?}");
    let st = server
        .wait_exit(Duration::from_secs(5))
        .expect("xps did not exit within 5 s of SIGTERM");
    assert_eq!(st.code(), Some(0), "exit status after SIGTERM: {st}");
}

#[test]
fn sigterm_right_after_the_listening_line_exits_0() {
    // Once xps has said "Server listening on port N" the port accepts
    // connections; a SIGTERM from then on must be a clean shutdown (exit 0),
    // not death by the signal's default action.
    for round in 0..20 {
        let mut server = Server::start_with(xps_cmd().args(["--listen", "127.0.0.1:0"]), 1);
        server.signal(libc::SIGTERM);
        let st = server
            .wait_exit(Duration::from_secs(5))
            .expect("xps did not exit within 5 s of SIGTERM");
        assert_eq!(
            st.code(),
            Some(0),
            "round {round}: exit status after SIGTERM sent right after {:?}: {st}",
            server.log
        );
    }
}
