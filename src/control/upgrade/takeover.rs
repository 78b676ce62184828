//! The new process's side of an upgrade (SPEC §7): it finds the channel in
//! its environment ([`TakeOver::from_env`], before any thread starts),
//! loads its configuration exactly as at start-up (`main` already did),
//! takes the listening sockets its configuration names
//! ([`TakeOver::listeners`]), builds its workers, says it is ready, and
//! starts them only on `Commit` ([`TakeOver::wait_commit`]). A thread then
//! takes the moved connections in and, at `Done`, the old process's
//! counters, the metrics endpoint and the pid file ([`TakeOver::finish`]).
//!
//! Which sockets it takes: a configured listener takes the old process's
//! sockets of the listener it is the same as — written the same way, or
//! resolving to the same address, as a reload decides (`reload::plan`) —
//! with its new PROXY flag; one the old process did not have is bound as
//! at start-up; old ones it does not name are closed here (the old process
//! holds them until it exits, as a reload that removes a listener). Each
//! listener has one socket per old worker: with a different `workers`,
//! new worker *w* gets the old sockets *i* with *i* mod W = *w*, and a copy
//! of socket *w* mod W_old if it has none, so no socket is closed or bound
//! again and no connection waiting in any accept queue is lost.

use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::channel::{Channel, Frame};
use super::wire::{self, Hello, Kind};
use super::{ENV_FD, ENV_PID, ENV_READS, READY_WITHIN, SOURCE, State};
use crate::config::Settings;
use crate::control::pidfile;
use crate::control::reload::{self, Running, WorkerLink};
use crate::control::systemd::Notifier;
use crate::core::Control;
use crate::network::listener::{self, Listener, OpenListeners};
use crate::observe::DeferredMetrics;
use crate::observe::metrics::Metrics;
use crate::utils::logger::Level;
use crate::xps_log;

/// How long the new process waits for `Commit` after `Ready` (the old one
/// sends it at once; past this it is stuck).
const COMMIT_WITHIN: Duration = Duration::from_secs(30);

/// This process is an upgrade's new process: the channel, and what the old
/// one sent.
pub struct TakeOver {
    chan: Channel,
    hello: Hello,
    /// Each listener's sockets, one per old worker (taken as used).
    groups: Vec<Vec<Option<OwnedFd>>>,
    /// The metrics endpoint's socket.
    metrics: Option<OwnedFd>,
    /// Listeners whose sockets this process took.
    taken: usize,
}

/// What the old process said after `Ready`.
#[derive(Debug, PartialEq, Eq)]
pub enum Commit {
    /// Start accepting; connections follow (or, `false`, stay there).
    Go {
        /// Connections follow.
        connections: bool,
    },
    /// The old process is gone without a word: serve what we have.
    OldGone,
    /// A stop signal came first: exit 0 (the old one rolls back).
    Stopped,
    /// The old process gave up on us (or is stuck): exit 1.
    RolledBack,
}

/// What the thread that finishes the take-over needs.
pub struct Finisher {
    /// Every worker (moved connections go to old worker *w* mod their
    /// count).
    pub workers: Vec<WorkerLink>,
    /// The counters to carry over into.
    pub metrics: Option<Arc<Metrics>>,
    /// The metrics endpoint, served once the counters are in.
    pub deferred: Option<DeferredMetrics>,
    /// `--pid-file`, written beside its place, renamed into it once the
    /// connections are here.
    pub pid_file: Option<pidfile::Prepared>,
    /// systemd (muted until the old process has handed the unit over).
    pub notifier: Notifier,
    /// Taken over: SIGUSR2 and SIGHUP act again.
    pub state: Arc<State>,
    /// Listeners that took the old process's sockets.
    pub listeners: usize,
    /// The `--max-connections` slots: held for the connections on their
    /// way ([`TakeOver::hold_slots`]), given back as they arrive.
    pub held: Vec<crate::slots::Slot>,
}

impl TakeOver {
    /// The take-over this process was started for, if any: the channel in
    /// `XPS_UPGRADE_FD`, when `XPS_UPGRADE_PID` is our parent. Reads the
    /// old process's `Hello`. Call it before any thread starts.
    pub fn from_env() -> Result<Option<TakeOver>, String> {
        let (Some(fd), Some(pid)) = (std::env::var_os(ENV_FD), std::env::var_os(ENV_PID)) else {
            return Ok(None);
        };
        let fd: Option<RawFd> = fd.to_str().and_then(|s| s.parse().ok());
        let pid: Option<u32> = pid.to_str().and_then(|s| s.parse().ok());
        // SAFETY: getppid cannot fail.
        let parent = unsafe { libc::getppid() } as u32;
        let (Some(fd), Some(pid)) = (fd, pid) else {
            return Err(format!("{ENV_FD} and {ENV_PID} must be numbers"));
        };
        // SAFETY: F_GETFD only reads a descriptor's flags.
        if pid != parent || fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            xps_log!(
                Level::Warning,
                SOURCE,
                "{ENV_FD}={fd} {ENV_PID}={pid} are not for this process (its parent is pid {parent}): starting afresh"
            );
            return Ok(None);
        }
        // SAFETY: our parent (checked above) passed this descriptor for us
        // alone; nothing else in this process has opened it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Close-on-exec from now on, so a later upgrade's child cannot
        // inherit it.
        // SAFETY: F_SETFD on a descriptor we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        let mut chan = Channel::new(UnixStream::from(owned));
        let frame = match chan.recv(Some(Instant::now() + READY_WITHIN)) {
            Ok(Some(f)) if f.kind == Kind::Hello as u16 => f,
            Ok(Some(f)) => return Err(format!("the old process sent frame {} first", f.kind)),
            Ok(None) => return Err(format!("pid {pid} closed the upgrade channel")),
            Err(e) => return Err(format!("the upgrade channel: {}", crate::os_reason(&e))),
        };
        let hello = match wire::read_hello(&frame.payload, frame.fds.len()) {
            Ok(h) => h,
            Err(e) => {
                let why = format!("cannot read pid {pid}'s hand-over: {e}");
                let _ = chan.send(Kind::Fail as u16, &[&wire::fail(&why)], &[]);
                return Err(why);
            }
        };
        let mut fds = frame.fds.into_iter();
        let groups = hello
            .listeners
            .iter()
            .map(|g| (0..g.sockets).map(|_| fds.next()).collect())
            .collect();
        let metrics = fds.next();
        raise_nofile(hello.connections);
        Ok(Some(TakeOver {
            chan,
            hello,
            groups,
            metrics,
            taken: 0,
        }))
    }

    /// The old process's pid.
    pub fn old_pid(&self) -> u32 {
        self.hello.pid
    }

    /// How many listeners took the old process's sockets
    /// ([`listeners`](Self::listeners)).
    pub fn listeners_taken(&self) -> usize {
        self.taken
    }

    /// The listeners came from systemd (socket activation).
    pub fn activated(&self) -> bool {
        self.hello.activated
    }

    /// Tells the old process why this one cannot take over (it rolls
    /// back; it also sees this process exit).
    pub fn fail(&self, why: &str) {
        let _ = self.chan.send(Kind::Fail as u16, &[&wire::fail(why)], &[]);
    }

    /// The listening sockets for `settings` (see the module docs), each
    /// worker's in configuration order, and the listeners as a reload
    /// will compare them.
    pub fn listeners(
        &mut self,
        settings: &Settings,
    ) -> Result<(OpenListeners, Vec<Running>), String> {
        let workers = settings.workers;
        if workers != self.hello.workers as usize {
            xps_log!(
                Level::Warning,
                SOURCE,
                "workers changed ({} -> {workers}): the old sockets are shared out again (each listener keeps {} socket(s)); load may be uneven until a restart",
                self.hello.workers,
                self.hello.workers
            );
        }
        let mut per_worker: Vec<Vec<Listener>> = (0..workers).map(|_| Vec::new()).collect();
        let mut bound = Vec::new();
        if self.hello.activated {
            // systemd's sockets, served as at start-up: the configured
            // listeners are not used.
            for g in 0..self.groups.len() {
                let (addr, at) = {
                    let h = &self.hello.listeners[g];
                    (h.addr.clone(), h.bound)
                };
                for (w, sockets) in self.share_out(g, workers)?.into_iter().enumerate() {
                    per_worker[w].extend(
                        sockets
                            .into_iter()
                            .map(|s| Listener::new(s, addr.clone(), at)),
                    );
                }
                bound.push(at);
            }
            self.taken = bound.len();
            return Ok((OpenListeners { per_worker, bound }, Vec::new()));
        }
        let old: Vec<Running> = self
            .hello
            .listeners
            .iter()
            .map(|g| Running {
                addr: g.addr.clone(),
                at: g.bound,
            })
            .collect();
        let resolved = listener::resolve_all(&settings.listeners).map_err(|e| e.to_string())?;
        let plan = reload::plan(&old, &settings.listeners, &resolved);
        let opened = listener::create_resolved(&plan.added, workers).map_err(|e| e.to_string())?;
        let mut added: Vec<_> = opened.per_worker.into_iter().map(Vec::into_iter).collect();
        let mut added_at = opened.bound.into_iter();
        for (addr, kept) in settings.listeners.iter().zip(&plan.kept) {
            match kept {
                Some(at) => {
                    let g = old
                        .iter()
                        .enumerate()
                        .position(|(i, r)| {
                            r.at == *at && self.groups[i].iter().any(Option::is_some)
                        })
                        .ok_or_else(|| format!("no socket for {addr} ({at})"))?;
                    for (w, sockets) in self.share_out(g, workers)?.into_iter().enumerate() {
                        per_worker[w].extend(
                            sockets
                                .into_iter()
                                .map(|s| Listener::new(s, addr.clone(), *at)),
                        );
                    }
                    bound.push(*at);
                    self.taken += 1;
                }
                None => {
                    for (w, list) in added.iter_mut().enumerate() {
                        per_worker[w].extend(list.next());
                    }
                    bound.extend(added_at.next());
                }
            }
        }
        let gone = plan.removed.len();
        if gone > 0 {
            xps_log!(
                Level::Info,
                SOURCE,
                "{gone} listener(s) of pid {} are not in this configuration: not served",
                self.hello.pid
            );
        }
        let running = settings
            .listeners
            .iter()
            .zip(&bound)
            .map(|(addr, &at)| Running {
                addr: addr.clone(),
                at,
            })
            .collect();
        Ok((OpenListeners { per_worker, bound }, running))
    }

    /// Listener `g`'s sockets for each of `workers` new workers.
    fn share_out(&mut self, g: usize, workers: usize) -> Result<Vec<Vec<TcpListener>>, String> {
        let old: Vec<OwnedFd> = self.groups[g].iter_mut().filter_map(Option::take).collect();
        if old.is_empty() {
            return Err(format!(
                "listener {} has no socket",
                self.hello.listeners[g].addr
            ));
        }
        let mut out: Vec<Vec<TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
        let n = old.len();
        let copies: Vec<Option<OwnedFd>> =
            (n..workers).map(|w| old[w % n].try_clone().ok()).collect();
        for (i, fd) in old.into_iter().enumerate() {
            out[i % workers].push(TcpListener::from(fd));
        }
        for (w, copy) in (n..workers).zip(copies) {
            let fd = copy.ok_or_else(|| "dup(listening socket) failed".to_string())?;
            out[w].push(TcpListener::from(fd));
        }
        Ok(out)
    }

    /// The old metrics endpoint's socket, when the configuration names the
    /// same endpoint (else it is closed here, and a new one is bound).
    pub fn metrics_socket(&mut self, settings: &Settings) -> Option<TcpListener> {
        let fd = self.metrics.take()?;
        let old = self.hello.metrics.as_ref()?;
        let addr = settings.metrics.as_ref()?;
        let same = *addr == old.addr
            || (addr.port != 0 && listener::resolve(addr).is_ok_and(|at| at == old.bound));
        same.then(|| TcpListener::from(fd))
    }

    /// Tells the old process this one is ready to accept.
    pub fn ready(&self) -> std::io::Result<()> {
        let reads = match std::env::var(ENV_READS) {
            Ok(list) => list
                .split(',')
                .filter_map(|v| v.trim().parse().ok())
                .collect(),
            Err(_) => vec![wire::STATE],
        };
        let r = wire::Ready {
            pid: std::process::id(),
            reads,
        };
        self.chan.send(Kind::Ready as u16, &[&wire::ready(&r)], &[])
    }

    /// Waits for the old process's `Commit`, giving up if `stop` is set
    /// first.
    pub fn wait_commit(&mut self, stop: &AtomicBool) -> Commit {
        let deadline = Instant::now() + COMMIT_WITHIN;
        loop {
            if stop.load(Ordering::Relaxed) {
                return Commit::Stopped;
            }
            match self
                .chan
                .recv(Some(Instant::now() + Duration::from_millis(100)))
            {
                Ok(Some(Frame { kind, payload, .. })) if kind == Kind::Commit as u16 => {
                    return match wire::read_commit(&payload) {
                        Ok(connections) => Commit::Go { connections },
                        Err(_) => Commit::RolledBack,
                    };
                }
                Ok(Some(_)) => return Commit::RolledBack,
                Ok(None) => {
                    // SAFETY: getppid cannot fail.
                    let parent = unsafe { libc::getppid() } as u32;
                    return match parent == self.hello.pid {
                        true => Commit::RolledBack,
                        false => Commit::OldGone,
                    };
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    if Instant::now() >= deadline {
                        return Commit::RolledBack;
                    }
                }
                Err(_) => return Commit::RolledBack,
            }
        }
    }

    /// Slots for the connections the old process is about to move, taken
    /// before this process accepts anyone: `--max-connections` bounds the
    /// moved and the newly accepted together (clients waiting in the
    /// backlog would otherwise fill the cap before the moved ones arrive).
    pub fn hold_slots(&self, slots: &Arc<crate::slots::Slots>) -> Vec<crate::slots::Slot> {
        (0..self.hello.connections)
            .map(|_| slots.acquire_forced())
            .collect()
    }

    /// Takes the moved connections in (each to old worker *w* mod the
    /// workers here) and, at `Done`, the counters; then serves the metrics,
    /// writes the pid file, says `Bye`, and once the old process is gone
    /// speaks to systemd. On a thread of its own.
    pub fn finish(self, f: Finisher) -> std::io::Result<JoinHandle<()>> {
        thread::Builder::new()
            .name("xps-takeover".into())
            .spawn(move || self.run(f))
    }

    fn run(mut self, mut f: Finisher) {
        let old = self.hello.pid;
        // Started after `Commit`, just before the workers: the old process
        // moves nothing until it hears this.
        let _ = self.chan.send(Kind::Accepting as u16, &[], &[]);
        let mut moved = 0usize;
        let mut done = false;
        loop {
            let frame = match self.chan.recv(None) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    xps_log!(
                        Level::Error,
                        SOURCE,
                        "the channel to pid {old}: {}",
                        crate::os_reason(&e)
                    );
                    break;
                }
            };
            match Kind::of(frame.kind) {
                Some(Kind::Batch) => match wire::read_batch(&frame.payload, frame.fds) {
                    Ok((w, conns)) => {
                        moved += conns.len();
                        // Each takes its own slot as it is taken in.
                        let n = f.held.len().saturating_sub(conns.len());
                        f.held.truncate(n);
                        let link = &f.workers[w % f.workers.len()];
                        if link.tx.send(Control::Adopt(conns)).is_ok() {
                            let _ = link.waker.wake();
                        }
                    }
                    Err(e) => xps_log!(
                        Level::Error,
                        SOURCE,
                        "a batch from pid {old} cannot be read ({e}): its connections are closed"
                    ),
                },
                Some(Kind::Done) => {
                    // Done is state: read only in a version this binary knows.
                    let done_read = match self.hello.state {
                        wire::STATE => wire::read_done(&frame.payload).map_err(|e| e.to_string()),
                        v => Err(format!(
                            "state version {v}, this binary reads {}",
                            wire::STATE
                        )),
                    };
                    match done_read {
                        Ok(d) => {
                            if let Some(m) = &f.metrics {
                                m.carry_over(d.counters);
                            }
                        }
                        Err(e) => xps_log!(
                            Level::Warning,
                            SOURCE,
                            "pid {old}'s counters cannot be read ({e}): they start from 0"
                        ),
                    }
                    self.taken_over(&mut f, moved);
                    done = true;
                    let _ = self.chan.send(Kind::Bye as u16, &[], &[]);
                }
                _ => xps_log!(
                    Level::Warning,
                    SOURCE,
                    "pid {old} sent frame {} during the hand-over: ignored",
                    frame.kind
                ),
            }
        }
        if !done {
            xps_log!(
                Level::Warning,
                SOURCE,
                "pid {old} went away before the hand-over was done"
            );
            self.taken_over(&mut f, moved);
        }
        // The old process has said MAINPID= (and exited): ours from now on.
        f.notifier.unmute();
    }

    /// Everything is here: metrics, pid file, log; SIGUSR2 and SIGHUP act
    /// again.
    fn taken_over(&self, f: &mut Finisher, moved: usize) {
        f.held.clear();
        if let Some(d) = f.deferred.take()
            && let Err(e) = d.serve()
        {
            xps_log!(
                Level::Error,
                SOURCE,
                "metrics thread: {}",
                crate::os_reason(&e)
            );
        }
        if let Some(prepared) = f.pid_file.take() {
            let path = prepared.path().to_owned();
            if let Err(e) = prepared.commit() {
                xps_log!(
                    Level::Error,
                    SOURCE,
                    "cannot rename the pid file into place at {}: {}",
                    path.display(),
                    crate::os_reason(&e)
                );
            }
        }
        f.state.taken_over();
        xps_log!(
            Level::Info,
            SOURCE,
            "took over {} listener(s) and {moved} connection(s) from pid {}",
            f.listeners,
            self.hello.pid
        );
    }
}

/// Makes room for `connections` descriptors more than at start-up: the
/// soft `RLIMIT_NOFILE` up to the hard one (descriptors past it would be
/// closed by the kernel in transit, cutting their clients).
fn raise_nofile(connections: u64) {
    let need = connections + connections / 4 + 256;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur >= need {
        return;
    }
    let want = need.min(lim.rlim_max);
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: a valid rlimit; failure (EPERM under a seccomp filter) is
    // only logged.
    let ok = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0;
    if !ok || want < need {
        xps_log!(
            Level::Warning,
            SOURCE,
            "RLIMIT_NOFILE is {} and {connections} connection(s) are coming: some may be cut",
            if ok { want } else { lim.rlim_cur }
        );
    }
}
