mod common;
use common::*;

// Issue 13: defects where two features meet (access log × shutdown, access
// log × full disk × reopen, …), each on the real binary.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

fn dropped_total(metrics_port: u16) -> usize {
    sample(&scrape(metrics_port), "xps_access_log_dropped_total") as usize
}

/// `n` connections, one after another: each sends a line, half-closes and
/// reads the reply up to the server's close. When this returns, the server
/// has ended all `n`.
fn churn(port: u16, n: usize) {
    for _ in 0..n {
        let mut s = connect(port);
        s.write_all(b"ab\n").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_end(&mut s), b"ba\n");
    }
}

/// The number of access-log lines in `text`, after checking that each is
/// one whole JSON object and that the text does not end in a torn line.
fn whole_records(text: &str, what: &str) -> usize {
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{what} ends in a torn line: {:?}",
        &text[text.rfind('\n').map_or(0, |i| i + 1)..]
    );
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{what}: not one JSON object ({e}): {line:?}"));
        assert!(v["end"].is_string(), "{what}: {line}");
    }
    text.lines().count()
}

/// Whole lines in the file at `path` now (none if it does not exist).
fn lines_now(path: &Path) -> usize {
    std::fs::read(path)
        .unwrap_or_default()
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

/// The N of the exit line `access log: N record(s) not written, dropped`.
fn dropped_at_exit(server: &mut Server) -> usize {
    let needle = "record(s) not written, dropped";
    assert!(
        server.wait_log(needle, Duration::from_secs(5)),
        "no exit line saying how many access-log records were dropped: {:?}",
        server.drain_log()
    );
    let line = server.log.iter().find(|l| l.contains(needle)).unwrap();
    line.split("access log: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line:?}"))
}

/// `xps --access-log -` with its stdout a pipe that nobody reads (a stalled
/// log collector), shrunk to one page so the writer stalls early.
fn stalled_pipe_server() -> (Server, ChildStdout) {
    let mut cmd = Command::new(XPS);
    cmd.args(["--listen", "127.0.0.1:0", "--access-log", "-"]);
    let mut server = Server::start_with_stdout(&mut cmd, Stdio::piped(), 1);
    let out = server.child.stdout.take().unwrap();
    // SAFETY: fcntl on a pipe descriptor this process owns.
    let size = unsafe { libc::fcntl(out.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(
        size > 0,
        "F_SETPIPE_SZ: {}",
        std::io::Error::last_os_error()
    );
    (server, out)
}

/// Defect 1: the writer is blocked for good on a pipe nobody reads; SIGTERM
/// still ends the server within a few seconds, status 0, and every record
/// is either in the pipe (whole) or counted as dropped in the exit line.
#[test]
fn access_log_stalled_pipe_shutdown_exits_and_counts_the_dropped_records() {
    let (mut server, mut out) = stalled_pipe_server();
    churn(server.port(), 1000);
    let start = Instant::now();
    server.signal(libc::SIGTERM);
    let Some(status) = server.wait_exit(Duration::from_secs(10)) else {
        panic!(
            "still running {:?} after SIGTERM behind a stalled access log: {:?}",
            start.elapsed(),
            server.drain_log()
        );
    };
    assert_eq!(status.code(), Some(0), "{:?}", server.drain_log());
    let dropped = dropped_at_exit(&mut server);
    // xps has exited: the pipe holds what it wrote, then EOF.
    let mut text = String::new();
    out.read_to_string(&mut text).unwrap();
    let written = whole_records(&text, "stdout");
    assert!(written < 1000 && dropped > 0, "{written} {dropped}");
    assert_eq!(written + dropped, 1000, "records written + dropped");
}

/// Defect 1: while the shutdown waits for a stalled writer, a second
/// SIGTERM exits at once with 128 + 15.
#[test]
fn access_log_stalled_pipe_second_signal_exits_at_once_with_143() {
    let (mut server, _out) = stalled_pipe_server();
    churn(server.port(), 1000);
    server.signal(libc::SIGTERM);
    assert!(server.wait_log("SIGTERM received", Duration::from_secs(5)));
    // The server says when it starts waiting for the writer (bounded);
    // the second signal must work then, and at any other time.
    let waiting = server.wait_log("waiting up to", Duration::from_secs(5));
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(5));
    let log = server.drain_log().to_vec();
    let status = status.unwrap_or_else(|| panic!("a second SIGTERM did not end it: {log:?}"));
    assert_eq!(status.code(), Some(143), "{log:?}");
    assert!(waiting, "no 'waiting up to' line: {log:?}");
}

/// A directory whose writes fail past 64 KiB: a 64 KiB tmpfs (ENOSPC) when
/// this process may mount one; otherwise the server runs with
/// RLIMIT_FSIZE = 64 KiB and SIGXFSZ ignored, so that a write past 64 KiB
/// is cut short and the next fails with EFBIG — the same short write, then
/// an error.
struct FullFs {
    dir: PathBuf,
    mounted: bool,
}

impl FullFs {
    const BYTES: u64 = 64 * 1024;

    fn new(name: &str) -> FullFs {
        let dir = temp_file(name, "")
            .parent()
            .unwrap()
            .join(format!("{name}.d"));
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&dir)
            .output();
        let mounted = matches!(&out, Ok(o) if o.status.success());
        if !mounted {
            eprintln!(
                "seams: no tmpfs ({}): the log's disk is made full with RLIMIT_FSIZE (EFBIG) instead",
                match &out {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Err(e) => e.to_string(),
                }
            );
        }
        FullFs { dir, mounted }
    }

    /// `xps` with a listener, metrics, and its access log at `log`.
    fn server(&self, log: &Path) -> Server {
        let mut cmd = Command::new(XPS);
        cmd.args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
            .arg("--access-log")
            .arg(log);
        if !self.mounted {
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    let lim = libc::rlimit {
                        rlim_cur: FullFs::BYTES,
                        rlim_max: FullFs::BYTES,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
        Server::start_with(&mut cmd, 1)
    }
}

impl Drop for FullFs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        // The directory `temp_file` made for it, with it.
        let _ = std::fs::remove_dir_all(self.dir.parent().unwrap());
    }
}

/// Waits until every connection ended is accounted for: whole lines in
/// `files` + `xps_access_log_dropped_total` = `ended` (the writer flushes
/// within a second). Returns the dropped count.
fn wait_accounted(files: &[&Path], metrics_port: u16, ended: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lines: usize = files.iter().map(|f| lines_now(f)).sum();
        let dropped = dropped_total(metrics_port);
        assert!(
            lines + dropped <= ended,
            "{lines} line(s) + {dropped} dropped > {ended} connections"
        );
        if lines + dropped == ended {
            return dropped;
        }
        assert!(
            Instant::now() < deadline,
            "access-log records lost uncounted: {lines} line(s) in the file(s) + {dropped} dropped \
             != {ended} connections ended"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Defect 3: the log's disk fills up. Every record is written whole or
/// counted as dropped, and the file never ends in half a line.
#[test]
fn access_log_full_disk_counts_every_record_and_tears_no_line() {
    let fs = FullFs::new("full");
    let log = fs.dir.join("access.log");
    let mut server = fs.server(&log);
    let metrics = server.metrics_port();
    churn(server.port(), 500);
    let dropped = wait_accounted(&[&log], metrics, 500);
    assert!(dropped > 0, "the disk never filled up");
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    let written = whole_records(&std::fs::read_to_string(&log).unwrap(), "access.log");
    assert_eq!(written + dropped, 500);
    assert_eq!(dropped_at_exit(&mut server), dropped);
}

/// Defect 3 across a rotation: the disk is full when the file is renamed
/// and SIGUSR1 reopens it. Old file + new file + dropped = connections
/// ended, and neither file ends in half a line.
#[test]
fn access_log_full_disk_rename_and_reopen_count_every_record() {
    let fs = FullFs::new("rotate");
    let log = fs.dir.join("access.log");
    let rotated = fs.dir.join("access.log.1");
    let mut server = fs.server(&log);
    let metrics = server.metrics_port();
    churn(server.port(), 500);
    // At once, while the writer still holds lines it could not write.
    std::fs::rename(&log, &rotated).unwrap();
    server.signal(libc::SIGUSR1);
    churn(server.port(), 100);
    let dropped = wait_accounted(&[&rotated, &log], metrics, 600);
    assert!(dropped > 0, "the disk never filled up");
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    let old = whole_records(&std::fs::read_to_string(&rotated).unwrap(), "access.log.1");
    let new = whole_records(
        &std::fs::read_to_string(&log).unwrap_or_default(),
        "access.log",
    );
    assert_eq!(old + new + dropped, 600, "{old} + {new} + {dropped}");
    assert_eq!(dropped_at_exit(&mut server), dropped);
}
