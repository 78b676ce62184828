//! SIGUSR2 upgrades the binary (SPEC §7), on the real binary: a copy of
//! `xps` in a temp dir is started by its path; an upgrade writes a new file
//! beside it and renames it over it, sends SIGUSR2 to the pid in the pid
//! file, and waits until the pid file names another pid and the old
//! process has exited 0. The test process is a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`), so each new xps, orphaned when the old one
//! exits, becomes its child: it is stopped and reaped by pid.
//!
//! Every process writes to the same stderr pipe (the new one inherits it),
//! so the first process's log reader sees them all.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// An xps started from a copy of the binary that tests may replace.
struct Up {
    /// The first process (its stderr pipe carries every process's log).
    server: Server,
    /// Where the binary, the pid file and the rest live.
    dir: PathBuf,
    pid_file: PathBuf,
    /// The pid serving now.
    current: u32,
}

impl Up {
    /// Starts `DIR/xps --pid-file DIR/xps.pid ARGS`, waiting for `ports`
    /// listening lines; `env` is added to its environment.
    fn start(args: &[&str], ports: usize, env: &[(&str, &str)]) -> Up {
        // SAFETY: prctl with these arguments only marks this process.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let dir = temp_file("unused", "").parent().unwrap().to_path_buf();
        let exe = dir.join("xps");
        copy_executable(Path::new(XPS), &exe);
        let pid_file = dir.join("xps.pid");
        let mut cmd = Command::new(&exe);
        cmd.arg("--pid-file").arg(&pid_file).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let server = Server::start_with(&mut cmd, ports);
        let current = server.pid();
        wait_for(|| read_pid(&pid_file) == Some(current), "the pid file");
        Up {
            server,
            dir,
            pid_file,
            current,
        }
    }

    fn port(&self, i: usize) -> u16 {
        self.server.ports[i]
    }

    /// Puts `contents` where the binary is, as a package manager does:
    /// written beside it, renamed over it.
    fn install(&self, contents: &[u8]) {
        let src = self.dir.join("xps.src");
        std::fs::write(&src, contents).unwrap();
        self.install_file(&src);
    }

    /// Installs a fresh copy of the real binary.
    fn install_real(&self) {
        self.install_file(Path::new(XPS));
    }

    fn install_file(&self, src: &Path) {
        let tmp = self.dir.join("xps.new");
        copy_executable(src, &tmp);
        std::fs::rename(&tmp, self.dir.join("xps")).unwrap();
    }

    fn sigusr2(&self) {
        // SAFETY: kill(2) on a pid this test started.
        unsafe { libc::kill(self.current as i32, libc::SIGUSR2) };
    }

    /// A full upgrade to a fresh copy of the real binary; returns the new pid.
    fn upgrade(&mut self) -> u32 {
        let old = self.current;
        assert_eq!(read_pid(&self.pid_file), Some(old));
        self.install_real();
        self.sigusr2();
        self.wait_upgraded(old)
    }

    /// Waits until the pid file names a pid other than `old` and `old` has
    /// exited 0; returns the new pid.
    fn wait_upgraded(&mut self, old: u32) -> u32 {
        let deadline = Instant::now() + WAIT;
        let new = loop {
            match read_pid(&self.pid_file) {
                Some(p) if p != old => break p,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "no upgrade of pid {old}; log: {:#?}",
                self.server.drain_log()
            );
            thread::sleep(Duration::from_millis(10));
        };
        let status = self.wait_exit(old);
        assert_eq!(status, 0, "pid {old} exited with {status}");
        self.current = new;
        // The new process runs the file now at the path.
        let exe = std::fs::metadata(format!("/proc/{new}/exe")).unwrap();
        let file = std::fs::metadata(self.dir.join("xps")).unwrap();
        assert_eq!((exe.dev(), exe.ino()), (file.dev(), file.ino()));
        new
    }

    /// Waits for `pid` (the first process, or an orphan we reap as
    /// subreaper) to exit; its exit status.
    fn wait_exit(&mut self, pid: u32) -> i32 {
        if pid == self.server.pid() {
            let st = self
                .server
                .wait_exit(WAIT)
                .unwrap_or_else(|| panic!("pid {pid} did not exit"));
            return st.code().unwrap_or(-1);
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let mut status = 0;
            // SAFETY: waitpid on a pid that is our child (subreaper).
            let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
            if r == pid as i32 {
                return if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    -1
                };
            }
            assert!(
                r == 0,
                "waitpid({pid}): {}",
                std::io::Error::last_os_error()
            );
            assert!(Instant::now() < deadline, "pid {pid} did not exit");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for a log line containing `needle` (from any process).
    fn wait_log(&mut self, needle: &str) {
        if !self.server.wait_log(needle, WAIT) {
            panic!("no {needle:?} in the log: {:#?}", self.server.drain_log());
        }
    }

    /// Log lines so far containing `needle`.
    fn count_log(&mut self, needle: &str) -> usize {
        self.server
            .drain_log()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    fn metrics_port(&self) -> u16 {
        self.server.metrics_port()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.current != self.server.pid() {
            // SAFETY: kill/waitpid on a pid we reaped as subreaper.
            unsafe {
                libc::kill(self.current as i32, libc::SIGKILL);
                libc::waitpid(self.current as i32, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// Copies `src` to `dst` as an executable, by a `cp` child process: a file
/// this multi-threaded test process opened for writing could be inherited
/// by a child another test forks at that moment, and executing it would
/// then fail with ETXTBSY.
fn copy_executable(src: &Path, dst: &Path) {
    let ok = Command::new("cp").arg(src).arg(dst).status().unwrap();
    assert!(ok.success(), "cp {} {}", src.display(), dst.display());
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Sends `line\n` and reads its exact reply.
#[track_caller]
fn ping(s: &mut TcpStream, line: &str) {
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    assert_eq!(
        read_exact_n(s, line.len() + 1),
        format!("{}\n", rev(line)).as_bytes()
    );
}

/// A client whose receive buffer is 64 KiB (set before connecting, so the
/// window stays small).
fn small_receive_buffer(port: u16) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(64 << 10).unwrap();
    s.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
        .unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn proc_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks the pid.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

#[test]
fn established_clients_keep_their_connection_and_everything_owed_arrives_once() {
    let mut up = Up::start(
        &[
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--listen-proxy",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ],
        2,
        &[],
    );
    let (plain, proxy) = (up.port(0), up.port(1));
    // 20 idle, 15 mid-line, 12 with replies read, 1 that never reads,
    // 1 past its PROXY header, 1 mid-header: 50.
    let mut idle: Vec<TcpStream> = (0..20).map(|_| connect(plain)).collect();
    let mut mid: Vec<TcpStream> = (0..15)
        .map(|i| {
            let mut s = connect(plain);
            s.write_all(format!("{i:02}-hel").as_bytes()).unwrap();
            s
        })
        .collect();
    let mut talked: Vec<TcpStream> = (0..12)
        .map(|i| {
            let mut s = connect(plain);
            ping(&mut s, &format!("before {i}"));
            s
        })
        .collect();
    // 13.2 MB: more than loopback's socket buffers take (4 MiB of send
    // buffer, the client's receive buffer kept small), so replies wait in
    // the server too.
    let mut bulk = small_receive_buffer(plain);
    let (input, output) = numbered_lines("bulk", 400_000);
    let writer = {
        let mut w = bulk.try_clone().unwrap();
        thread::spawn(move || w.write_all(&input).unwrap())
    };
    let mut past = connect(proxy);
    past.write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 8001\r\n")
        .unwrap();
    ping(&mut past, "behind a balancer");
    let mut header = connect(proxy);
    header.write_all(b"PROXY TCP4 203.0").unwrap();
    // Every one of them is open in the old process, and the bulk client's
    // replies have filled what the server holds for it (reading paused).
    let m = up.metrics_port();
    wait_for(
        || sample(&scrape(m), "xps_connections_open") == 50.0,
        "50 open connections",
    );
    wait_for(
        || sample(&scrape(m), "xps_flow_control_pauses_total") >= 1.0,
        "the bulk client's reading paused",
    );
    let old = up.current;

    let new = up.upgrade();
    up.wait_log(&format!("handed over 50 connection(s) to pid {new}"));
    up.wait_log(&format!(
        "took over 2 listener(s) and 50 connection(s) from pid {old}"
    ));

    // The same TCP connections, served by the new process.
    for (i, s) in mid.iter_mut().enumerate() {
        s.write_all(b"lo\n").unwrap();
        let want = format!("{}\n", rev(&format!("{i:02}-hello")));
        assert_eq!(
            read_exact_n(s, want.len()),
            want.as_bytes(),
            "mid-line client {i}"
        );
    }
    for (i, s) in talked.iter_mut().enumerate() {
        ping(s, &format!("after {i}"));
    }
    for s in idle.iter_mut() {
        ping(s, "still here");
    }
    header
        .write_all(b".113.7 127.0.0.1 51234 8001\r\nhey\n")
        .unwrap();
    assert_eq!(read_exact_n(&mut header, 4), b"yeh\n");
    ping(&mut past, "after the upgrade");
    // Every reply to the 13.2 MB, exactly once, in order.
    let got = read_exact_n(&mut bulk, output.len());
    assert!(got == output, "the bulk client's replies differ");
    writer.join().unwrap();
    bulk.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut extra = [0u8; 1];
    assert!(bulk.read(&mut extra).is_err(), "a byte more than owed");
    // Counted once: 50 open in the new process, none closed in between.
    let text = scrape(m);
    assert_eq!(sample(&text, "xps_connections_open"), 50.0);
    assert_eq!(closed(&text, "reset") + closed(&text, "error"), 0.0);
    assert!(!proc_alive(old));
}

#[test]
fn ten_upgrades_under_churn_drop_no_one() {
    let mut up = Up::start(&["--workers", "2", "--listen", "127.0.0.1:0"], 1, &[]);
    let port = up.port(0);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let exchanges = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    // Churn: connect, three lines, read, close.
    for t in 0..4 {
        let (stop, failures, exchanges) = (stop.clone(), failures.clone(), exchanges.clone());
        threads.push(thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = (|| -> std::io::Result<()> {
                    let mut s = TcpStream::connect(("127.0.0.1", port))?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    let lines = format!("c{t} {n} a\nc{t} {n} bb\nc{t} {n} ccc\n");
                    s.write_all(lines.as_bytes())?;
                    let mut got = vec![0; lines.len()];
                    s.read_exact(&mut got)?;
                    let want: String = lines.lines().map(|l| format!("{}\n", rev(l))).collect();
                    if got != want.as_bytes() {
                        return Err(std::io::Error::other(format!("wrong reply {got:?}")));
                    }
                    Ok(())
                })();
                match r {
                    Ok(()) => {
                        exchanges.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().unwrap().push(format!("churn {t}: {e}")),
                }
                n += 1;
            }
        }));
    }
    // Long-lived clients pinging.
    for p in 0..8 {
        let (stop, failures, exchanges) = (stop.clone(), failures.clone(), exchanges.clone());
        threads.push(thread::spawn(move || {
            let mut s = connect(port);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let line = format!("pinger {p} says {n}");
                let r = s.write_all(format!("{line}\n").as_bytes()).and_then(|()| {
                    let mut got = vec![0; line.len() + 1];
                    s.read_exact(&mut got).map(|()| got)
                });
                match r {
                    Ok(got) if got == format!("{}\n", rev(&line)).as_bytes() => {
                        exchanges.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(got) => {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("pinger {p}: {got:?}"));
                        return;
                    }
                    Err(e) => {
                        failures.lock().unwrap().push(format!("pinger {p}: {e}"));
                        return;
                    }
                }
                n += 1;
                thread::sleep(Duration::from_millis(5));
            }
        }));
    }
    let mut pids = vec![up.current];
    for _ in 0..10 {
        let before = exchanges.load(Ordering::Relaxed);
        wait_for(
            || exchanges.load(Ordering::Relaxed) > before + 20,
            "traffic between upgrades",
        );
        pids.push(up.upgrade());
    }
    let before = exchanges.load(Ordering::Relaxed);
    wait_for(
        || exchanges.load(Ordering::Relaxed) > before + 20,
        "traffic after the last upgrade",
    );
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failure(s): {failures:#?}",
        failures.len()
    );
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 11, "eleven processes, one after the other");
    assert_eq!(up.count_log("handed over"), 10);
}

#[test]
fn a_new_binary_that_fails_is_rolled_back_and_a_good_one_then_upgrades() {
    let mut up = Up::start(&["--listen", "127.0.0.1:0"], 1, &[]);
    let first = up.current;
    let mut client = connect(up.port(0));
    ping(&mut client, "before");

    // A binary that exits 1 at once.
    up.install(b"#!/bin/sh\nexit 1\n");
    up.sigusr2();
    up.wait_log("exited before it was ready (exit status: 1); still serving");
    assert_eq!(
        read_pid(&up.pid_file),
        Some(first),
        "the pid file is unchanged"
    );
    ping(&mut client, "after a binary that exits 1");
    ping(&mut connect(up.port(0)), "a new client");

    // A binary that never says it is ready: ended after 10 s.
    up.install(b"#!/bin/sh\nexec sleep 60\n");
    up.sigusr2();
    up.wait_log("started pid");
    let started = up.server.drain_log().iter().rev().find_map(|l| {
        l.split("started pid ")
            .nth(1)?
            .split(';')
            .next()?
            .parse::<u32>()
            .ok()
    });
    let sleeper = started.expect("the started pid is logged");
    let began = Instant::now();
    up.wait_log("was not ready within 10 s; ended it (");
    assert!(
        began.elapsed() >= Duration::from_secs(8),
        "{:?}",
        began.elapsed()
    );
    assert!(
        !proc_alive(sleeper),
        "pid {sleeper} is still there (or a zombie)"
    );
    assert_eq!(read_pid(&up.pid_file), Some(first));
    ping(&mut client, "after a binary that never got ready");

    // A good binary: upgrades, and the same client is served by it.
    let new = up.upgrade();
    assert_ne!(new, first);
    ping(&mut client, "after the good one");
    assert_eq!(up.count_log("still serving"), 2);
}

#[test]
fn a_changed_config_takes_effect_and_counters_do_not_reset() {
    let (p1, p2) = (free_port(), free_port());
    let config = |ports: &[u16], max_line: usize| {
        let listeners: Vec<String> = ports
            .iter()
            .map(|p| format!(r#"{{"host":"127.0.0.1","port":{p}}}"#))
            .collect();
        format!(
            r#"{{"max_line":{max_line},"servers":[{{"listeners":[{}]}}]}}"#,
            listeners.join(",")
        )
    };
    let file = temp_file("xps_config.json", &config(&[p1], 100));
    let mut up = Up::start(
        &[file.to_str().unwrap(), "--metrics", "127.0.0.1:0"],
        1,
        &[],
    );
    let m = up.metrics_port();
    let mut kept = connect(p1);
    ping(&mut kept, "0123456789");
    for i in 0..5 {
        ping(&mut connect(p1), &format!("closed {i}"));
    }
    let accepted = format!("xps_connections_accepted_total{{listener=\"127.0.0.1:{p1}\"}}");
    wait_for(
        || closed(&scrape(m), "finished") == 5.0,
        "five closes counted",
    );
    let before = scrape(m);
    assert_eq!(sample(&before, &accepted), 6.0);

    // A second listener, and a shorter max_line, then the upgrade.
    std::fs::write(&file, config(&[p1, p2], 5)).unwrap();
    up.upgrade();
    up.wait_log("took over 1 listener(s) and 1 connection(s)");

    // The added listener answers; a new connection gets the new max_line,
    // the kept one the one it was accepted with.
    ping(&mut connect(p2), "new");
    let mut fresh = connect(p1);
    fresh.write_all(b"0123456789\n").unwrap();
    // Cut into a segment at 5 bytes: 43210, then 98765 and its LF.
    assert_eq!(read_exact_n(&mut fresh, 11), b"4321098765\n");
    assert_eq!(expected(b"0123456789\n", 5), b"4321098765\n");
    ping(&mut kept, "0123456789");
    drop(fresh);
    // Counters went on from where they were: one reply on the new
    // listener, two (a segment and a line) on the fresh connection, one on
    // the kept one.
    let lines = sample(&before, "xps_lines_total") + 1.0 + 2.0 + 1.0;
    wait_for(
        || sample(&scrape(m), "xps_lines_total") == lines,
        "xps_lines_total to go on from the old process's",
    );
    let after = scrape(m);
    assert_eq!(sample(&after, &accepted), 7.0, "6 before + 1 after");
    assert!(
        sample(&after, "xps_received_bytes_total") > sample(&before, "xps_received_bytes_total")
    );
    assert!(closed(&after, "finished") >= 5.0);
    // The dashboard's /api sums carry over as well.
    let api: serde_json::Value = serde_json::from_str(&get_body(m, "/api")).unwrap();
    assert_eq!(api["req_total"], lines as u64, "{api}");
    assert_eq!(
        api["conn_accepted"], 8,
        "7 on the first listener, 1 on the added one"
    );

    // Reload × upgrade: the new process reloads the same file on SIGHUP,
    // comparing with the listeners it took over and opened.
    let p3 = free_port();
    std::fs::write(&file, config(&[p1, p3], 5)).unwrap();
    // SAFETY: kill(2) on the pid the pid file names, started by this test.
    unsafe { libc::kill(up.current as i32, libc::SIGHUP) };
    up.wait_log("configuration reloaded: listeners +1 -1");
    ping(&mut connect(p3), "new"); // under max_line 5
    ping(&mut kept, "still the same connection");
    assert!(
        TcpStream::connect(("127.0.0.1", p2)).is_err(),
        "the removed listener still accepts"
    );
}

#[test]
fn a_bad_config_on_disk_is_rolled_back() {
    let port = free_port();
    let good = format!(r#"{{"servers":[{{"listeners":[{{"host":"127.0.0.1","port":{port}}}]}}]}}"#);
    let file = temp_file("xps_config.json", &good);
    let mut up = Up::start(&[file.to_str().unwrap()], 1, &[]);
    let first = up.current;
    let mut client = connect(port);
    ping(&mut client, "before");
    std::fs::write(&file, "{ not json").unwrap();
    up.install_real();
    up.sigusr2();
    // The new process says why on the shared stderr and exits 2.
    up.wait_log("exited before it was ready (exit status: 2); still serving");
    up.wait_log("line 1:3");
    assert_eq!(read_pid(&up.pid_file), Some(first));
    ping(&mut client, "after");
    // Fixed: the next SIGUSR2 upgrades.
    std::fs::write(&file, good).unwrap();
    up.upgrade();
    ping(&mut client, "upgraded");
}

#[test]
fn max_connections_bounds_the_moved_and_the_new_together() {
    let mut up = Up::start(
        &["--listen", "127.0.0.1:0", "--max-connections", "3"],
        1,
        &[],
    );
    let mut served: Vec<TcpStream> = (0..3).map(|_| connect(up.port(0))).collect();
    for (i, s) in served.iter_mut().enumerate() {
        ping(s, &format!("served {i}"));
    }
    // At the cap: these wait in the backlog.
    let mut waiting: Vec<TcpStream> = (0..2).map(|_| connect(up.port(0))).collect();
    for s in waiting.iter_mut() {
        s.write_all(b"waiting\n").unwrap();
    }
    up.upgrade();
    up.wait_log("took over 1 listener(s) and 3 connection(s)");
    // Still at the cap in the new process: no reply for the waiting ones.
    for s in waiting.iter_mut() {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 1];
        assert!(s.read(&mut b).is_err(), "served past --max-connections");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    // A moved client leaves: one waiting client gets its slot.
    drop(served.pop());
    let got = thread::scope(|t| {
        let handles: Vec<_> = waiting
            .iter_mut()
            .map(|s| {
                t.spawn(move || {
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut b = [0u8; 8];
                    s.read_exact(&mut b).is_ok_and(|()| &b == b"gnitiaw\n")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count()
    });
    assert_eq!(got, 1, "one slot freed, one client served");
}

#[test]
fn two_sigusr2_50ms_apart_make_one_new_process() {
    let mut up = Up::start(&["--listen", "127.0.0.1:0"], 1, &[]);
    let old = up.current;
    let mut client = connect(up.port(0));
    up.install_real();
    up.sigusr2();
    thread::sleep(Duration::from_millis(50));
    up.sigusr2(); // ESRCH if it is done already: also one new process
    up.wait_upgraded(old);
    ping(&mut client, "one upgrade");
    assert_eq!(up.count_log("SIGUSR2: starting"), 1);
    assert_eq!(up.count_log("took over"), 1);
    let ignored = up.count_log("SIGUSR2 ignored: an upgrade is running");
    assert!(ignored <= 1, "{ignored}");
}

#[test]
fn sigusr2_during_a_shutdown_is_ignored() {
    let mut up = Up::start(&["--listen", "127.0.0.1:0"], 1, &[]);
    // A client that never reads keeps the shutdown going (its grace).
    let stuck = connect(up.port(0));
    let (input, _) = numbered_lines("stuck", 100_000);
    let writer = {
        let mut w = stuck.try_clone().unwrap();
        thread::spawn(move || {
            let _ = w.write_all(&input);
        })
    };
    thread::sleep(Duration::from_millis(300));
    up.server.signal(libc::SIGTERM);
    up.wait_log("SIGTERM received");
    up.install_real();
    up.sigusr2();
    up.wait_log("SIGUSR2 ignored: shutting down");
    let _ = stuck.shutdown(std::net::Shutdown::Both);
    drop(writer);
    let status = up.wait_exit(up.current);
    assert_eq!(status, 0);
    assert_eq!(up.count_log("SIGUSR2: starting"), 0);
}

#[test]
fn a_new_binary_that_cannot_read_the_format_gets_the_listeners_and_the_old_finishes() {
    // The first process's environment is the new one's: it claims to read
    // no state version.
    let mut up = Up::start(
        &["--listen", "127.0.0.1:0"],
        1,
        &[("XPS_UPGRADE_READS", "")],
    );
    let mut client = connect(up.port(0));
    ping(&mut client, "before");
    client.write_all(b"unanswered line without LF").unwrap();
    let old = up.current;
    let new = up.upgrade();
    up.wait_log("cannot read hand-over format v1");
    up.wait_log(&format!(
        "took over 1 listener(s) and 0 connection(s) from pid {old}"
    ));
    // The old process finished it as at shutdown: no more replies, EOF.
    assert_eq!(read_to_end(&mut client), b"");
    // New clients are the new process's.
    ping(&mut connect(up.port(0)), "served by the new one");
    assert!(proc_alive(new));
}

#[test]
fn a_moved_connection_keeps_its_time_left_and_gets_one_access_log_record() {
    let log = temp_file("access.log", "");
    let mut up = Up::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--idle-timeout",
            "3",
            "--access-log",
            log.to_str().unwrap(),
        ],
        1,
        &[],
    );
    let mut idle = connect(up.port(0));
    ping(&mut idle, "abc");
    let last_active = Instant::now();
    let mut talker = connect(up.port(0));
    ping(&mut talker, "before");
    let talker_port = talker.local_addr().unwrap().port();
    let idle_port = idle.local_addr().unwrap().port();
    thread::sleep(Duration::from_millis(1500));
    up.upgrade();
    ping(&mut talker, "after");
    talker.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut talker), b"");
    // Idle since before the upgrade: closed 3 s after its last byte, not 3
    // s after it moved.
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(read_to_end(&mut idle), b"");
    let idle_for = last_active.elapsed();
    assert!(
        idle_for >= Duration::from_millis(2500) && idle_for < Duration::from_millis(4500),
        "closed after {idle_for:?} of idleness"
    );
    // One record each, from the new process, with the totals of both.
    let mut records = Vec::new();
    wait_for(
        || {
            let text = std::fs::read_to_string(&log).unwrap();
            records = text.lines().map(str::to_string).collect();
            records.len() >= 2
        },
        "two access-log records",
    );
    thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&log).unwrap();
    let of = |port: u16| -> Vec<&str> {
        text.lines()
            .filter(|l| l.contains(&format!("\"client\":\"127.0.0.1:{port}\"")))
            .collect()
    };
    let t = of(talker_port);
    assert_eq!(t.len(), 1, "{text}");
    assert!(
        t[0].contains("\"received\":13,\"sent\":13,\"lines\":2,\"end\":\"finished\""),
        "{}",
        t[0]
    );
    let i = of(idle_port);
    assert_eq!(i.len(), 1, "{text}");
    assert!(
        i[0].contains("\"received\":4,\"sent\":4,\"lines\":1,\"end\":\"idle_timeout\""),
        "{}",
        i[0]
    );
    let duration: f64 = i[0]
        .split("\"duration_ms\":")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        duration >= 2500.0,
        "duration from the first accept: {duration}"
    );
}

/// A "new binary" that speaks the envelope and, on `Commit`, shuts its
/// read side before it says `Accepting`: the old process's first batch
/// then fails (EPIPE) with every connection still its own.
const DIES_AFTER_COMMIT: &str = r#"#!/usr/bin/env python3
import os, socket, struct, time
s = socket.socket(fileno=int(os.environ["XPS_UPGRADE_FD"]))
def frame():
    size, kind = struct.unpack("<IH", s.recv(8, socket.MSG_WAITALL)[:6])
    if size:
        s.recvmsg(size, socket.CMSG_SPACE(253 * 4), socket.MSG_WAITALL)
    return kind
assert frame() == 1                                      # Hello
s.sendall(struct.pack("<IHHIHH", 8, 2, 0, os.getpid(), 1, 1))  # Ready, reads v1
assert frame() == 4                                      # Commit
s.shutdown(socket.SHUT_RD)
s.sendall(struct.pack("<IHH", 0, 8, 0))                  # Accepting
time.sleep(60)
"#;

#[test]
fn a_new_process_that_fails_during_the_hand_over_leaves_the_old_one_serving() {
    if Command::new("python3").arg("-c").arg("").status().is_err() {
        eprintln!("SKIPPED: no python3 for the fake new binary");
        return;
    }
    let mut up = Up::start(&["--workers", "2", "--listen", "127.0.0.1:0"], 1, &[]);
    let first = up.current;
    let mut clients: Vec<TcpStream> = (0..6).map(|_| connect(up.port(0))).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        ping(c, &format!("client {i}"));
        c.write_all(b"half a li").unwrap();
    }
    thread::sleep(Duration::from_millis(100));
    up.install(DIES_AFTER_COMMIT.as_bytes());
    up.sigusr2();
    up.wait_log("failed during the hand-over (writing to it failed: Broken pipe");
    up.wait_log("0 connection(s) written to it went with it, the others are served here again; still serving");
    assert_eq!(read_pid(&up.pid_file), Some(first));
    // Every client is served by the old process, its line intact.
    for c in clients.iter_mut() {
        c.write_all(b"ne\n").unwrap();
        assert_eq!(read_exact_n(c, 12), b"enil a flah\n");
    }
    ping(&mut connect(up.port(0)), "a new client");
    // And a later SIGUSR2 upgrades, with those clients.
    up.upgrade();
    for (i, c) in clients.iter_mut().enumerate() {
        ping(c, &format!("client {i} after"));
    }
}

/// The notify socket this test owns.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn new() -> Notify {
        let path = temp_file("unused", "").parent().unwrap().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        Notify { sock, path }
    }

    /// The next datagram (a plain recv: a passed descriptor is closed).
    fn next(&self) -> String {
        self.sock.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).expect("a notification");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    /// Datagrams until one has the line `want`; returns that one.
    fn until(&self, want: &str) -> String {
        loop {
            let m = self.next();
            if m.lines().any(|l| l == want) {
                return m;
            }
            assert!(!m.contains("MAINPID="), "unexpected {m:?} before {want:?}");
        }
    }
}

#[test]
fn systemd_hears_mainpid_after_an_upgrade_and_ready_after_a_rollback() {
    let notify = Notify::new();
    let mut up = Up::start(
        &["--listen", "127.0.0.1:0"],
        1,
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())],
    );
    notify.until("READY=1");
    // Rollback: RELOADING=1, then READY=1 with a status, and no MAINPID=.
    up.install(b"#!/bin/sh\nexit 1\n");
    up.sigusr2();
    assert!(notify.until("RELOADING=1").contains("MONOTONIC_USEC="));
    let back = notify.until("READY=1");
    assert!(
        back.contains("STATUS=upgrade failed; still serving"),
        "{back:?}"
    );
    // Upgrade: RELOADING=1, then MAINPID=<new> with READY=1, then the
    // barrier, all from the old process.
    let old = up.current;
    up.install_real();
    up.sigusr2();
    notify.until("RELOADING=1");
    let handed = notify.until("READY=1");
    let new = up.wait_upgraded(old);
    assert!(
        handed.starts_with(&format!("MAINPID={new}\nREADY=1\nSTATUS=")),
        "{handed:?}"
    );
    assert_eq!(notify.next(), "BARRIER=1");
    // The new process speaks for the unit from now on: SIGTERM.
    // SAFETY: kill(2) on the pid we reaped as subreaper.
    unsafe { libc::kill(new as i32, libc::SIGTERM) };
    notify.until("STOPPING=1");
    assert_eq!(up.wait_exit(new), 0);
    assert_eq!(read_pid(&up.pid_file), None, "removed at exit");
    up.current = up.server.pid(); // nothing left to stop
}

/// Whether some row of `/api/connections` on `mport` is in `state`.
fn some_row_in(mport: u16, state: &str) -> bool {
    let v: serde_json::Value = serde_json::from_str(&get_body(mport, "/api/connections")).unwrap();
    v["connections"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["state"] == state)
}

#[test]
fn held_connections_move_and_the_memory_bound_holds_in_the_new_process() {
    let mut up = Up::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--max-buffered",
            "300000",
            "--metrics",
            "127.0.0.1:0",
        ],
        1,
        &[],
    );
    let (port, m) = (up.port(0), up.metrics_port());
    // Two clients send 7.6 MB each and read nothing yet: past the bound,
    // xps stops reading from them (held), long before their replies fill.
    let floods: Vec<_> = (0..2)
        .map(|i| {
            let s = small_receive_buffer(port);
            let (input, output) = numbered_lines(&format!("flood{i}"), 200_000);
            let mut w = s.try_clone().unwrap();
            (
                s,
                output,
                thread::spawn(move || w.write_all(&input).unwrap()),
            )
        })
        .collect();
    wait_for(|| some_row_in(m, "held"), "a connection held by the bound");
    let old = up.current;
    up.upgrade();
    up.wait_log(&format!(
        "took over 1 listener(s) and 2 connection(s) from pid {old}"
    ));
    // The new process counts what they hold: held again, not read past
    // the bound, while a client that reads is answered.
    wait_for(
        || some_row_in(m, "held"),
        "a moved connection held by the new process's bound",
    );
    let mut reader = connect(port);
    ping(&mut reader, "small lines still answered");
    // Both read now: every reply, once, in order.
    for (mut s, output, writer) in floods {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let got = read_exact_n(&mut s, output.len());
        assert!(got == output, "a flooder's replies differ");
        writer.join().unwrap();
    }
    ping(&mut reader, "and after");
    // Nothing is held any more, and the count of connections holding
    // bytes (`/api`'s req_current) says so: moved connections are counted
    // in and out like accepted ones (it wrapped below 0 before).
    wait_for(
        || {
            let api: serde_json::Value = serde_json::from_str(&get_body(m, "/api")).unwrap();
            api["req_current"] == 0
        },
        "req_current back to 0",
    );
}

/// A PROXY client connected to `port` as 203.0.113.`host`:51234, answered
/// once.
fn proxied(port: u16, host: u8) -> TcpStream {
    let mut s = connect(port);
    s.write_all(format!("PROXY TCP4 203.0.113.{host} 127.0.0.1 51234 8001\r\n").as_bytes())
        .unwrap();
    ping(&mut s, "hello");
    s
}

#[test]
fn a_proxy_client_is_shown_with_its_address_listener_and_totals_after_the_move() {
    // Metrics on, no access log: the moved connection's row is whole.
    let mut up = Up::start(
        &["--listen-proxy", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
        1,
        &[],
    );
    let (port, m) = (up.port(0), up.metrics_port());
    let mut c = proxied(port, 7);
    let old = up.current;
    up.upgrade();
    up.wait_log(&format!(
        "took over 1 listener(s) and 1 connection(s) from pid {old}"
    ));
    let v: serde_json::Value = serde_json::from_str(&get_body(m, "/api/connections")).unwrap();
    let row = &v["connections"][0];
    assert_eq!(row["client"], "203.0.113.7:51234", "{v}");
    assert_eq!(row["listener"], format!("127.0.0.1:{port}"), "{v}");
    assert_eq!(row["proxy"], format!("{}", c.local_addr().unwrap()), "{v}");
    // "hello\n" both ways, one reply.
    assert_eq!(
        (row["received"].clone(), row["sent"].clone()),
        (6.into(), 6.into())
    );
    assert_eq!(row["lines"], 1, "{v}");
    ping(&mut c, "after");
}

#[test]
fn the_per_source_limit_counts_a_moved_proxy_client_by_its_own_address() {
    // No metrics, no access log: nothing reports the client, and yet the
    // new process must count it under 203.0.113.7, not the balancer.
    let mut up = Up::start(
        &[
            "--listen-proxy",
            "127.0.0.1:0",
            "--max-connections-per-source",
            "1",
        ],
        1,
        &[],
    );
    let port = up.port(0);
    let mut first = proxied(port, 7);
    up.upgrade();
    // A second connection from the same client is past the limit: closed
    // at once, nothing answered.
    let mut again = connect(port);
    again
        .write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 51235 8001\r\nhi\n")
        .unwrap();
    let mut b = [0u8; 8];
    assert!(
        match read_once(&mut again, &mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        },
        "a second connection of 203.0.113.7 was served"
    );
    // Another client behind the same balancer is served.
    let mut other = proxied(port, 8);
    ping(&mut other, "other");
    ping(&mut first, "first");
}

#[test]
fn a_pid_file_that_cannot_be_written_stops_start_up_before_any_listening_line() {
    let (status, log) = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--pid-file",
            "/nonexistent-xps-dir/xps.pid",
        ],
        WAIT,
    );
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("cannot write the pid file /nonexistent-xps-dir/xps.pid"),
        "{log}"
    );
    assert!(!log.contains("listening"), "{log}");
}

#[test]
fn a_new_process_that_cannot_write_the_pid_file_is_rolled_back() {
    let mut up = Up::start(&["--listen", "127.0.0.1:0"], 1, &[]);
    let first = up.current;
    let mut client = connect(up.port(0));
    // Where the new process writes its pid first is a directory now.
    let tmp = up.dir.join("xps.pid.tmp");
    std::fs::create_dir(&tmp).unwrap();
    up.install_real();
    up.sigusr2();
    up.wait_log("cannot write the pid file");
    up.wait_log("still serving");
    assert_eq!(read_pid(&up.pid_file), Some(first));
    ping(&mut client, "still served by the old process");
    std::fs::remove_dir(&tmp).unwrap();
    up.upgrade();
    ping(&mut client, "moved");
}

/// Waits until the file at `log` has a line containing `needle`.
fn wait_file_log(log: &Path, needle: &str) {
    wait_for(
        || std::fs::read_to_string(log).is_ok_and(|t| t.contains(needle)),
        needle,
    );
}

#[test]
fn socket_activated_listeners_move_with_their_connections() {
    // systemd × upgrade: the sockets systemd passed (LISTEN_FDS, for the
    // first process only: LISTEN_PID names it) reach the new process
    // through the hand-over, and no worker binds anything.
    let Some(tool) = socket_activate_tool() else {
        eprintln!(
            "*** SKIPPED: systemd-socket-activate is not installed (scripts/test.sh installs it: apt-get install systemd)"
        );
        return;
    };
    // SAFETY: prctl with these arguments only marks this process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let dir = temp_file("unused", "").parent().unwrap().to_path_buf();
    let exe = dir.join("xps");
    copy_executable(Path::new(XPS), &exe);
    let (pid_file, log) = (dir.join("xps.pid"), dir.join("stderr.log"));
    let port = free_port();
    let mut first = Command::new(tool)
        .arg("-l")
        .arg(format!("127.0.0.1:{port}"))
        .arg(&exe)
        .args(["--workers", "2", "--pid-file"])
        .arg(&pid_file)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Once it listens, the first connection makes it exec xps.
    wait_file_log(&log, "Listening on");
    let mut client = connect(port);
    ping(&mut client, "activated");
    let old = first.id();
    wait_for(|| read_pid(&pid_file) == Some(old), "the pid file");

    let tmp = dir.join("xps.new");
    copy_executable(Path::new(XPS), &tmp);
    std::fs::rename(&tmp, &exe).unwrap();
    // SAFETY: kill(2) on the process this test started.
    unsafe { libc::kill(old as i32, libc::SIGUSR2) };
    wait_for(
        || read_pid(&pid_file).is_some_and(|p| p != old),
        "the new pid in the pid file",
    );
    let new = read_pid(&pid_file).unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = first.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "pid {old} did not exit");
        thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
    wait_file_log(
        &log,
        &format!("took over 1 listener(s) and 1 connection(s) from pid {old}"),
    );
    // The same connection, and new ones on the same socket, served by the
    // new process; nothing was bound again.
    ping(&mut client, "moved");
    for i in 0..4 {
        ping(&mut connect(port), &format!("after {i}"));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("bind()"), "{text}");
    // SAFETY: kill/waitpid on the new process, our child as subreaper.
    unsafe {
        libc::kill(new as i32, libc::SIGTERM);
        libc::waitpid(new as i32, std::ptr::null_mut(), 0);
    }
}
