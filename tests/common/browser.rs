//! Headless Chromium driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: commands are written to the browser's fd 3,
//! answers and events read from its fd 4, each message one JSON object
//! followed by a NUL byte). No websocket, no crate beyond libc and
//! serde_json, no browser download: Debian's `chromium` package.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Where Debian puts it (`apt-get install chromium`).
pub const CHROMIUM: &str = "/usr/bin/chromium";

pub struct Browser {
    child: Child,
    to_browser: File,
    from_browser: Receiver<Value>,
    next_id: u64,
    profile: PathBuf,
}

/// One tab, attached in flat mode: commands to it carry its session id.
pub struct Page {
    session: String,
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds` on success.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are new and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A copy of `fd` numbered 64 or above (close-on-exec), so that the child's
/// dup2 onto 3 and 4 cannot clobber the other end.
fn high(fd: OwnedFd) -> OwnedFd {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor or -1.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 64) };
    assert!(n >= 64);
    // SAFETY: `n` is a new descriptor owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(n) }
}

impl Browser {
    /// Starts headless Chromium, or `None` when it is not installed.
    pub fn launch() -> Option<Browser> {
        if !Path::new(CHROMIUM).exists() {
            return None;
        }
        let profile = std::env::temp_dir().join(format!("cdp-{}-{}", std::process::id(), nanos()));
        std::fs::create_dir_all(&profile).unwrap();
        let (cmd_r, cmd_w) = pipe(); // we write commands, the browser reads fd 3
        let (ev_r, ev_w) = pipe(); // the browser writes fd 4, we read
        let (cmd_r, ev_w) = (high(cmd_r), high(ev_w));
        let (cr, ew) = (cmd_r.as_raw_fd(), ev_w.as_raw_fd());
        let mut cmd = Command::new(CHROMIUM);
        cmd.args([
            "--headless",
            "--no-sandbox", // as root; a sandbox needs user namespaces we may not have
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (dup2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(cr, 3) < 0 || libc::dup2(ew, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().ok()?;
        drop((cmd_r, ev_w)); // the child has its copies
        let (tx, rx) = mpsc::channel();
        let ev = File::from(ev_r);
        std::thread::spawn(move || {
            let mut r = BufReader::new(ev);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        buf.pop();
                        if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                            && tx.send(v).is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Some(Browser {
            child,
            to_browser: File::from(cmd_w),
            from_browser: rx,
            next_id: 0,
            profile,
        })
    }

    /// Sends one command and waits (at most 30 s) for its answer; events
    /// received meanwhile are dropped.
    pub fn call(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to_browser
            .write_all(&bytes)
            .map_err(|e| format!("{method}: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from_browser.recv_timeout(left) {
                Ok(v) if v["id"].as_u64() == Some(id) => {
                    return match v.get("error") {
                        Some(e) => Err(format!("{method}: {e}")),
                        None => Ok(v["result"].clone()),
                    };
                }
                Ok(_) => {} // an event, or the answer to nothing we wait for
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("{method}: no answer in 30 s"));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("{method}: browser gone"));
                }
            }
        }
    }

    /// Opens `url` in a new tab of `width` x `height` CSS pixels.
    pub fn open(
        &mut self,
        url: &str,
        width: u32,
        height: u32,
        mobile: bool,
    ) -> Result<Page, String> {
        let t = self.call(None, "Target.createTarget", json!({"url": "about:blank"}))?;
        let target = t["targetId"].as_str().ok_or("no targetId")?.to_string();
        let a = self.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        )?;
        let page = Page {
            session: a["sessionId"].as_str().ok_or("no sessionId")?.to_string(),
        };
        let s = Some(page.session.as_str());
        self.call(
            s,
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": if mobile { 2 } else { 1 }, "mobile": mobile}),
        )?;
        let nav = self.call(s, "Page.navigate", json!({"url": url}))?;
        if let Some(e) = nav.get("errorText") {
            return Err(format!("navigate {url}: {e}"));
        }
        // Page.navigate answers before the new document exists: until it
        // has loaded, expressions would run in about:blank or see no body.
        let loaded = format!(
            "location.href === {} && document.readyState === 'complete'",
            serde_json::to_string(url).unwrap()
        );
        self.wait_for(&page, &loaded, Duration::from_secs(10))?;
        Ok(page)
    }

    /// Evaluates a JavaScript expression in the page, returning its value.
    pub fn eval(&mut self, page: &Page, expr: &str) -> Result<Value, String> {
        let r = self.call(
            Some(&page.session),
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            return Err(format!("{expr}: {e}"));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Polls `expr` every 100 ms until it is truthy (returns it) or `timeout`.
    pub fn wait_for(
        &mut self,
        page: &Page,
        expr: &str,
        timeout: Duration,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            // A throw (say, the element is not there yet) counts as "not yet".
            let v = self.eval(page, expr).unwrap_or(Value::Null);
            let truthy =
                !matches!(v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(format!("waited {timeout:?} for {expr}: last {v}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The rendered DOM, as the page's script left it.
    pub fn html(&mut self, page: &Page) -> Result<String, String> {
        Ok(self
            .eval(page, "document.documentElement.outerHTML")?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    /// A PNG of the whole page (not just the viewport).
    pub fn screenshot(&mut self, page: &Page, path: &Path) -> Result<(), String> {
        let r = self.call(
            Some(&page.session),
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        )?;
        let png = base64_decode(r["data"].as_str().ok_or("no data")?)?;
        std::fs::write(path, png).map_err(|e| e.to_string())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.call(None, "Browser.close", json!({}));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill(); // by its own pid, only if still there
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Standard base64 (RFC 4648 §4, with padding), enough for a screenshot.
pub fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    let val = |c: u8| -> Result<u32, String> {
        Ok(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("bad base64 byte {c}")),
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Ok(out)
}
