mod common;
use common::*;

// Limits and lifecycle (SPEC §3 and §4): the connection cap, running out of
// file descriptors, the idle timeout, graceful shutdown and the second
// signal, several workers, and clients that reset, vanish or stop reading.
//
// The machine these run on is small and shared, so every liveness check has
// a generous deadline and nothing measures throughput.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// Sends `line` + LF and checks that exactly its reversal + LF comes back.
fn round_trip(s: &mut TcpStream, line: &str) {
    s.write_all(format!("{line}\n").as_bytes())
        .unwrap_or_else(|e| panic!("send {line:?}: {e}"));
    let mut buf = vec![0; line.len() + 1];
    s.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("reply to {line:?}: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&buf),
        format!("{}\n", rev(line)),
        "reply to {line:?}"
    );
}

/// Whether a read on `s` times out within `wait` without any byte.
fn silent_for(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 64];
    let r = read_once(s, &mut b);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match r {
        Err(e) => matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        Ok(_) => false,
    }
}

/// Bytes the peer has not acknowledged yet in `s`'s send queue (SIOCOUTQ).
fn unacked(s: &TcpStream) -> i32 {
    let mut n: libc::c_int = 0;
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    assert_eq!(rc, 0, "ioctl(SIOCOUTQ)");
    n
}

/// Waits until the server's kernel has taken everything `s` sent.
fn wait_acked(s: &TcpStream, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while unacked(s) > 0 {
        assert!(Instant::now() < deadline, "server never took our data");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Connects, or says why not.
fn try_connect(port: u16) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
}

/// Reads until EOF or an error; returns the bytes and whether it ended in an
/// error (a reset) rather than EOF. A read timeout panics: the connection
/// was expected to end.
fn read_until_end(s: &mut TcpStream) -> (usize, Option<std::io::Error>) {
    let mut total = 0;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match read_once(s, &mut buf) {
            Ok(0) => return (total, None),
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("connection still open after reading {total} bytes: {e}")
            }
            Err(e) => return (total, Some(e)),
        }
    }
}

fn assert_alive(server: &mut Server) {
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "server died; log: {:?}",
        server.drain_log()
    );
}

// 1 ─────────────────────────────────────────────────────────────────────────

#[test]
fn connection_cap_queues_the_extra_client_until_a_slot_frees() {
    let mut server = Server::start_n(1, &["--max-connections", "5"]);
    let mut clients: Vec<TcpStream> = (0..5).map(|_| server.connect(0)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        round_trip(c, &format!("client {i} first"));
    }

    // The sixth completes the handshake in the backlog but is not served.
    let mut sixth = server.connect(0);
    sixth.write_all(b"sixth waits\n").unwrap();
    assert!(
        silent_for(&mut sixth, Duration::from_millis(500)),
        "a 6th client was served past --max-connections 5"
    );
    // The five are still served meanwhile.
    round_trip(&mut clients[1], "client 1 while capped");

    // Freeing a slot lets the sixth in; its queued line is answered.
    drop(clients.remove(0));
    sixth
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let reply = read_exact_n(&mut sixth, "sixth waits\n".len());
    assert_eq!(reply, b"stiaw htxis\n");
    round_trip(&mut sixth, "sixth again");
    for (i, c) in clients.iter_mut().enumerate() {
        round_trip(c, &format!("client {} after", i + 1));
    }
    assert_alive(&mut server);
}

// 2 ─────────────────────────────────────────────────────────────────────────

#[test]
fn running_out_of_fds_neither_spins_nor_stops_the_server() {
    let mut cmd = Command::new(XPS);
    cmd.args(["--listen", "127.0.0.1:0"]);
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 32,
                rlim_max: 32,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut server = Server::start_with(&mut cmd, 1);
    let port = server.port();

    // 200 clients: the first ~20 fit in the descriptor table, the rest wait
    // in the backlog while accept() fails with EMFILE.
    let mut clients: Vec<TcpStream> = (0..200).map(|_| connect(port)).collect();
    assert!(
        server.wait_log("Too many open files", Duration::from_secs(10)),
        "no EMFILE warning; log: {:?}",
        server.drain_log()
    );

    // Saturated: the server must sleep between accept attempts.
    let before = server.cpu_ticks();
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(2));
    let used = server.cpu_ticks() - before;
    let elapsed = t0.elapsed();
    assert!(
        used < 50,
        "server burnt {used} CPU ticks in {elapsed:?} while out of descriptors (busy accept loop?)"
    );

    // Early clients were accepted and are served while saturated.
    for (i, c) in clients.iter_mut().take(5).enumerate() {
        round_trip(c, &format!("early client {i} while saturated"));
    }
    assert_alive(&mut server);

    // The warning is rate-limited.
    let warnings = server
        .drain_log()
        .iter()
        .filter(|l| l.contains("Too many open files"))
        .count();
    assert!(
        (1..10).contains(&warnings),
        "{warnings} EMFILE warnings: not rate-limited; log: {:?}",
        server.log
    );

    // Recovery: once the clients go, new ones are served again.
    clients.clear();
    let mut fresh = connect(port);
    fresh
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    round_trip(&mut fresh, "served after recovery");
    let mut another = connect(port);
    round_trip(&mut another, "and another");
    assert_alive(&mut server);
}

// 3 ─────────────────────────────────────────────────────────────────────────

#[test]
fn idle_timeout_closes_silent_clients_only() {
    let server = Server::start_n(1, &["--idle-timeout", "1"]);
    let never = Server::start_n(1, &["--idle-timeout", "0"]);
    let port = server.port();

    // An active client: one line every 300 ms for 3 s, served throughout.
    let active = thread::spawn(move || {
        let mut c = connect(port);
        let start = Instant::now();
        let mut i = 0;
        while start.elapsed() < Duration::from_secs(3) {
            round_trip(&mut c, &format!("still here {i}"));
            i += 1;
            thread::sleep(Duration::from_millis(300));
        }
        round_trip(&mut c, "last words");
        i
    });
    // A silent client on the never-timing-out server.
    let mut patient = never.connect(0);

    // A silent client is closed after about a second.
    let mut silent = server.connect(0);
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let t0 = Instant::now();
    let mut b = [0u8; 16];
    let r = read_once(&mut silent, &mut b);
    let waited = t0.elapsed();
    match r {
        Ok(0) => {}
        Ok(n) => panic!("silent client got {n} unexpected bytes"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("silent client still open after {waited:?} with --idle-timeout 1")
        }
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("silent client: unexpected error {e}"),
    }
    assert!(
        waited >= Duration::from_millis(500),
        "closed after {waited:?}, before the 1 s timeout"
    );
    assert!(
        waited < Duration::from_millis(4000),
        "closed only after {waited:?}"
    );

    let rounds = active.join().expect("active client");
    // It talked for 3 s, three idle timeouts, and its last words were
    // answered: it was never cut. (How many rounds fit depends on the load.)
    assert!(rounds >= 2, "active client managed only {rounds} rounds");

    // --idle-timeout 0: never closed.
    let left = Duration::from_millis(2500).saturating_sub(t0.elapsed());
    assert!(
        silent_for(&mut patient, left.max(Duration::from_millis(100))),
        "--idle-timeout 0 closed (or wrote to) a silent client"
    );
    round_trip(&mut patient, "idle but not forgotten");
}

// 4 ─────────────────────────────────────────────────────────────────────────

#[test]
fn sigterm_answers_every_received_line_then_exits_zero() {
    let mut server = Server::start_n(1, &[]);
    let port = server.port();
    let (input, output) = numbered_lines("drain", 20_000);
    let mut c = connect(port);
    c.write_all(&input).unwrap();
    // Every byte is in the server's kernel (acknowledged), not in flight.
    wait_acked(&c, Duration::from_secs(10));
    thread::sleep(Duration::from_millis(100));

    server.signal(libc::SIGTERM);
    assert!(
        server.wait_log("SIGTERM received", Duration::from_secs(5)),
        "no shutdown log; log: {:?}",
        server.drain_log()
    );

    // Listeners close: new connections are refused (or reset) soon.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match try_connect(port) {
            Err(_) => break,
            // Connected before the worker noticed the stop flag: it may
            // still be accepted and answered; just try again.
            Ok(late) => drop(late),
        }
        assert!(
            Instant::now() < deadline,
            "still accepting connections after SIGTERM"
        );
        thread::sleep(Duration::from_millis(20));
    }

    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("read replies to EOF");
    assert_eq!(got.len(), output.len(), "reply length after SIGTERM");
    assert!(got == output, "replies after SIGTERM differ");

    let status = server
        .wait_exit(Duration::from_secs(5))
        .expect("server did not exit within 5 s of SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        try_connect(port).is_err(),
        "port still accepts after the server exited"
    );
}

// 5 ─────────────────────────────────────────────────────────────────────────

#[test]
fn second_sigterm_exits_at_once() {
    let mut server = Server::start_n(1, &[]);
    let c = server.connect(0);
    // Sends without ever reading: replies back up, shutdown cannot finish.
    let mut w = c.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let sent2 = sent.clone();
    let writer = thread::spawn(move || {
        let (chunk, _) = numbered_lines("flood", 2_000);
        while w.write_all(&chunk).is_ok() {
            sent2.fetch_add(chunk.len(), Ordering::Relaxed);
        }
    });
    // Wait until the writes stall: the server holds replies the client
    // will never take, and has stopped reading.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = 0;
    let mut still_since = Instant::now();
    loop {
        thread::sleep(Duration::from_millis(50));
        let now = sent.load(Ordering::Relaxed);
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if now > 0 && still_since.elapsed() > Duration::from_millis(400) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes never stalled ({now} bytes sent)"
        );
    }
    assert!(last > 1 << 20, "stalled after only {last} bytes");

    server.signal(libc::SIGTERM);
    assert!(
        server.wait_log("SIGTERM received", Duration::from_secs(5)),
        "no log of the first SIGTERM; log: {:?}",
        server.drain_log()
    );
    // The first signal waits for the replies (up to the grace period).
    thread::sleep(Duration::from_millis(300));
    assert_alive(&mut server);

    let t0 = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server
        .wait_exit(Duration::from_secs(3))
        .expect("no exit after a second SIGTERM");
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "second SIGTERM took {took:?}"
    );
    assert!(!status.success(), "second signal exited with {status:?}");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    drop(c);
    writer.join().unwrap();
}

// 6 ─────────────────────────────────────────────────────────────────────────

#[test]
fn two_workers_serve_200_concurrent_clients() {
    let mut server = Server::start_n(1, &["--workers", "2", "--log-level", "debug"]);
    let port = server.port();
    let n = 200;
    let barrier = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut c = connect(port);
                c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                barrier.wait(); // all 200 are connected at once
                for j in 0..5 {
                    round_trip(&mut c, &format!("client {i:03} line {j} {}", "x".repeat(i)));
                }
                // And a pipelined batch.
                let (input, output) = numbered_lines(&format!("c{i}"), 50);
                c.write_all(&input).unwrap();
                assert_eq!(read_exact_n(&mut c, output.len()), output, "client {i}");
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        t.join().unwrap_or_else(|_| panic!("client {i} failed"));
    }
    assert_alive(&mut server);
    // Both workers took connections (SO_REUSEPORT spread them).
    thread::sleep(Duration::from_millis(100));
    let log = server.drain_log();
    for w in ["[worker 0]", "[worker 1]"] {
        assert!(
            log.iter()
                .any(|l| l.contains(w) && l.contains("new connection")),
            "no connection logged by {w}; {} log lines",
            log.len()
        );
    }
}

// 7 ─────────────────────────────────────────────────────────────────────────

#[test]
fn resetting_clients_do_not_disturb_others() {
    let mut server = Server::start_n(1, &[]);
    let port = server.port();
    let stop = Arc::new(AtomicBool::new(false));

    let good: Vec<_> = (0..5)
        .map(|g| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut c = connect(port);
                let mut rounds = 0usize;
                while !stop.load(Ordering::Relaxed) || rounds < 3 {
                    round_trip(&mut c, &format!("good {g} round {rounds} abcdefghijklmnop"));
                    rounds += 1;
                    thread::sleep(Duration::from_millis(5));
                }
                rounds
            })
        })
        .collect();

    let bad: Vec<_> = (0..50)
        .map(|b| {
            thread::spawn(move || {
                let (burst, _) = numbered_lines(&format!("bad {b}"), 8_000); // ~300 KB
                let mut c = connect(port);
                c.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = c.write_all(&burst);
                match b % 3 {
                    0 => {
                        // Take a little of the replies first.
                        let mut buf = [0u8; 4096];
                        let _ = read_once(&mut c, &mut buf);
                    }
                    1 => thread::sleep(Duration::from_millis(10)),
                    _ => {} // reset while the server still has input to read
                }
                socket2::SockRef::from(&c)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(c); // RST
            })
        })
        .collect();
    for (b, t) in bad.into_iter().enumerate() {
        t.join()
            .unwrap_or_else(|_| panic!("resetting client {b} panicked"));
    }
    stop.store(true, Ordering::Relaxed);
    for (g, t) in good.into_iter().enumerate() {
        let rounds = t
            .join()
            .unwrap_or_else(|_| panic!("well-behaved client {g} was disturbed"));
        assert!(rounds >= 3);
    }
    assert_alive(&mut server);
    let mut after = connect(port);
    round_trip(&mut after, "after the resets");
}

// 8 ─────────────────────────────────────────────────────────────────────────

#[test]
fn clients_closing_without_reading_do_not_kill_the_server() {
    let mut server = Server::start_n(1, &[]);
    let port = server.port();
    let (burst, _) = numbered_lines("unread", 100_000); // ~3.7 MB
    for round in 0..6 {
        let mut c = connect(port);
        c.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        // The server may already be writing into a closed socket (EPIPE)
        // while we still send: a failed write is fine.
        let _ = c.write_all(&burst);
        if round % 2 == 1 {
            let _ = c.shutdown(Shutdown::Write);
            thread::sleep(Duration::from_millis(20));
        }
        drop(c); // normal close(), replies unread
        thread::sleep(Duration::from_millis(50));
        assert_alive(&mut server);
        let mut next = connect(port);
        let line = format!("next client {round}");
        next.write_all(format!("{line}\n").as_bytes()).unwrap();
        let got = read_exact_n(&mut next, line.len() + 1);
        assert!(
            got == format!("{}\n", rev(&line)).as_bytes(),
            "round {round}: a fresh client sent {line:?} and got {:?}: bytes of the \
             closed client's replies leaked into another connection",
            String::from_utf8_lossy(&got)
        );
    }
    thread::sleep(Duration::from_millis(200));
    assert_alive(&mut server);
    round_trip(&mut connect(port), "still here");
}

// 9 ─────────────────────────────────────────────────────────────────────────

#[test]
fn idle_timeout_closes_a_client_that_stopped_reading() {
    let mut server = Server::start_n(1, &["--idle-timeout", "1", "--log-level", "debug"]);
    let mut c = server.connect(0);
    // Send up to 50 MB without reading; the server's flow control and the
    // kernel buffers fill up and the writes stall.
    c.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let (chunk, _) = numbered_lines("stall", 10_000); // ~370 KB
    let mut sent = 0usize;
    let t0 = Instant::now();
    while sent < 50 << 20 {
        match c.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            // The server may already have given up on us.
            Err(_) => break,
        }
    }
    assert!(
        sent < 50 << 20,
        "sent 50 MB without reading in {:?}: no flow control?",
        t0.elapsed()
    );

    // Nothing moves either way now: the server closes us.
    assert!(
        server.wait_log("client read nothing for 1 s", Duration::from_secs(8)),
        "stalled reader not closed by --idle-timeout 1; log: {:?}",
        server.drain_log()
    );
    thread::sleep(Duration::from_millis(200));

    // Reading now ends early: EOF or a reset before every reply came back.
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (got, err) = read_until_end(&mut c);
    assert!(
        got < sent,
        "got all {got} reply bytes of {sent} sent (ended with {err:?}): connection was not closed"
    );
    assert_alive(&mut server);
    round_trip(&mut connect(server.port()), "others still served");
}

// 10 ────────────────────────────────────────────────────────────────────────

#[test]
fn sigterm_answers_lines_held_back_by_flow_control() {
    // A client pipelines far past the 1 MiB high-water mark without reading
    // (then half-closes), so the server stops reading it (flow control) and
    // its further lines sit unread in the server's receive queue: received
    // and acknowledged. SIGTERM comes, then the client reads: every line the
    // server had received must be answered within the 5 s grace.
    let mut server = Server::start_n(1, &["--log-level", "debug"]);
    let port = server.port();
    let (input, output) = numbered_lines("held", 400_000); // 12.8 MB
    let c = connect(port);
    let client_port = c.local_addr().unwrap().port();
    let mut w = c.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let sent2 = sent.clone();
    let writer = thread::spawn(move || {
        let mut pos = 0;
        while pos < input.len() {
            let end = (pos + 64 * 1024).min(input.len());
            match w.write(&input[pos..end]) {
                Ok(n) => pos += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
            sent2.store(pos, Ordering::SeqCst);
        }
        let _ = w.shutdown(Shutdown::Write);
    });
    // Wait until the writes stall (or end) with input held back unread.
    // Stalled means: nothing moves for 400 ms — the writer is blocked or
    // done, the client's send queue is not shrinking, and the server is not
    // reading the input it holds (not merely that a thread was not
    // scheduled). Whether the client still has unacknowledged bytes depends
    // on how far the kernel grew the server's receive buffer (under load it
    // once took all 12.8 MB): either way the server holds input unread.
    let deadline = Instant::now() + Duration::from_secs(15);
    let sample = || {
        (
            sent.load(Ordering::SeqCst),
            unacked(&c),
            server_rx_queue(port, client_port).expect("server socket in /proc/net/tcp"),
        )
    };
    let mut last = sample();
    let mut still_since = Instant::now();
    loop {
        thread::sleep(Duration::from_millis(50));
        let now = sample();
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if still_since.elapsed() > Duration::from_millis(400) && now.2 > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no stall with input held back (sent, unacked, unread by the server: {now:?})"
        );
    }
    let (last, outq, held) = last;
    let acked = last - outq as usize;
    let owed = acked / 32 * 32; // numbered_lines' lines are 32 bytes
    assert_eq!(output.len() % 32, 0);

    server.signal(libc::SIGTERM);
    // Read only once the worker itself has begun the shutdown, so that
    // nothing drains before it.
    assert!(
        server.wait_log("draining", Duration::from_secs(5)),
        "no shutdown log; log: {:?}",
        server.drain_log()
    );
    let mut c = c;
    let mut got = Vec::new();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = c.read_to_end(&mut got);
    assert!(
        output.starts_with(&got),
        "replies after SIGTERM are not an exact prefix"
    );
    assert!(
        got.len() >= owed,
        "after SIGTERM the client got {} reply bytes (ended with {:?}) but is owed {owed}: \
         the server had acknowledged {acked} bytes, {held} of them held unread by flow \
         control at SIGTERM",
        got.len(),
        r.err(),
    );
    drop(c);
    let _ = writer.join();
    let status = server
        .wait_exit(Duration::from_secs(8))
        .expect("no exit after SIGTERM");
    assert!(status.success(), "{status:?}");
}
