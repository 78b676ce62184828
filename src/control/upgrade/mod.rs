//! SIGUSR2: upgrade the binary without dropping anyone (SPEC §7).
//!
//! ```text
//! old (this module)                     new (takeover.rs)
//!  SIGUSR2: start the file at the path
//!  resolved at start-up (exe.rs)
//!  ── Hello + every worker's listening ─▶  loads its configuration as at
//!     sockets (+ the metrics socket)       start-up, takes the sockets it
//!                                          names, binds the others
//!  ◀─────────────────────────── Ready ───  (or exits / Fail: rollback)
//!  ── Commit ──────────────────────────▶  starts its workers: accepting
//!  ◀─────────────────────── Accepting ───
//!  workers stop accepting, move their
//!  connections out a slice per turn
//!  ── Batch (≤ 253 sockets each) … ────▶  workers take them in
//!  workers stop; counters read
//!  ── Done (counters) ─────────────────▶  adds them, serves metrics,
//!                                          writes the pid file
//!  ◀───────────────────────────── Bye ───
//!  MAINPID=new, READY=1, BARRIER=1;
//!  exit 0 ──── EOF ───────────────────▶  speaks to systemd from now on
//! ```
//!
//! The new process never accepts before `Commit`, so a rollback before it
//! loses nothing: the old process kills it (if it is still there), logs why
//! and goes on serving; nothing it had was touched. Nor does the old process
//! close or move anything before `Accepting`: a new process that dies on
//! `Commit` takes only the clients it accepted itself. One that dies while
//! connections move takes those already written to it; the old process
//! serves its listeners again and keeps the rest. The channel
//! (`channel.rs`) is a socketpair whose child end is the only descriptor
//! the new process inherits; the format (`wire.rs`) is versioned, and a new
//! binary that cannot read the old one's connections gets the listeners
//! only: the old process then finishes its connections as at shutdown.
//! `docs/operations.md` ("Upgrading the binary") is the operator's view.

pub mod channel;
pub mod exe;
pub mod takeover;
pub mod wire;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::config::ListenAddr;
use crate::control::reload::{Running, WorkerLink};
use crate::control::systemd::Notifier;
use crate::core::Control;
use crate::core::handover::{ListenerCopy, Outbound, Sink};
use crate::network::listener::Listener;
use crate::observe::metrics::Metrics;
use crate::slots::Slots;
use crate::utils::logger::Level;
use crate::xps_log;
use channel::{Channel, Frame};
use exe::Executable;
use wire::Kind;

/// How long the new process has to say it is ready (SPEC §7).
pub const READY_WITHIN: Duration = Duration::from_secs(10);
/// The environment variable naming the channel's descriptor in the new
/// process.
pub const ENV_FD: &str = "XPS_UPGRADE_FD";
/// The environment variable naming the old process (the new one checks it
/// is its parent, so a stray value in an operator's shell is ignored).
pub const ENV_PID: &str = "XPS_UPGRADE_PID";
/// Test hook: the state versions a binary claims to read (comma list;
/// empty: none).
pub const ENV_READS: &str = "XPS_UPGRADE_READS";
/// How long a worker has to answer the control thread.
const WORKER_ANSWER: Duration = Duration::from_secs(5);
/// How often a wait looks whether a SIGTERM asks to give up.
const POLL: Duration = Duration::from_millis(100);
const SOURCE: &str = "xps_upgrade()";

/// Where an upgrade is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// None runs.
    Idle,
    /// The new process is starting; it has not accepted anything.
    Starting,
    /// The new process accepts; connections are moving.
    HandingOver,
    /// This process is the new one, and the old one has not finished.
    TakingOver,
}

/// What the signal thread, the upgrade thread and `main` share.
#[derive(Debug)]
pub struct State {
    inner: Mutex<Inner>,
    changed: Condvar,
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    /// A SIGTERM came while starting: give up, then shut down.
    abort: bool,
    /// A SIGTERM came while handing over: shut down if it fails.
    stop_after: bool,
    /// Every worker thread has ended.
    workers_ended: bool,
    /// Set once every connection moved: the new pid.
    handed_over_to: Option<u32>,
    /// The upgrade thread, while one runs.
    thread: Option<JoinHandle<()>>,
}

impl State {
    /// The state of a process; `taking_over` when it is an upgrade's new
    /// process.
    pub fn new(taking_over: bool) -> Arc<State> {
        Arc::new(State {
            inner: Mutex::new(Inner {
                phase: if taking_over {
                    Phase::TakingOver
                } else {
                    Phase::Idle
                },
                abort: false,
                stop_after: false,
                workers_ended: false,
                handed_over_to: None,
                thread: None,
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the upgrade is.
    pub fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// The new process has finished taking over.
    pub fn taken_over(&self) {
        self.lock().phase = Phase::Idle;
    }

    /// A first SIGTERM/SIGINT: whether the workers may stop now. While the
    /// new process starts, it is given up (it never accepted); while
    /// connections move, the hand-over finishes first (this process exits
    /// at its end anyway).
    pub fn on_stop(&self) -> bool {
        let mut s = self.lock();
        match s.phase {
            Phase::Starting => {
                s.abort = true;
                true
            }
            Phase::HandingOver => {
                s.stop_after = true;
                false
            }
            Phase::Idle | Phase::TakingOver => true,
        }
    }

    /// `main`: every worker has ended. Waits for the upgrade thread, if any,
    /// and returns the pid connections were handed over to, if they were.
    pub fn after_workers(&self) -> Option<u32> {
        let thread = {
            let mut s = self.lock();
            s.workers_ended = true;
            self.changed.notify_all();
            s.thread.take()
        };
        if let Some(t) = thread {
            let _ = t.join();
        }
        self.lock().handed_over_to
    }

    /// Waits until `main` says every worker ended, up to `timeout`.
    fn wait_workers(&self, timeout: Duration) -> bool {
        let s = self.lock();
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| !s.workers_ended)
            .unwrap_or_else(|e| e.into_inner());
        s.workers_ended
    }
}

/// Stops every worker gracefully (`signals::Stopper::stop_all`).
pub type StopAll = Arc<dyn Fn() + Send + Sync>;

/// What SIGUSR2 needs; owned by the signal thread.
pub struct Upgrader {
    /// What to start.
    pub exe: Executable,
    /// Every worker.
    pub workers: Vec<WorkerLink>,
    /// Stops every worker (once the hand-over is done).
    pub stop_all: StopAll,
    /// systemd.
    pub notifier: Notifier,
    /// The counters to carry over, with metrics on.
    pub metrics: Option<Arc<Metrics>>,
    /// The metrics endpoint as configured, and a copy of its socket.
    pub metrics_socket: Option<(ListenAddr, std::net::TcpListener)>,
    /// The connection slots (how many are open).
    pub slots: Arc<Slots>,
    /// Shared with `main` and the signal thread.
    pub state: Arc<State>,
}

impl Upgrader {
    /// Why a SIGUSR2 or SIGHUP must wait, if it must.
    pub fn busy(&self) -> Option<&'static str> {
        match self.state.phase() {
            Phase::Idle => None,
            Phase::Starting | Phase::HandingOver => Some("an upgrade is running"),
            Phase::TakingOver => Some("this process is still taking over from the old one"),
        }
    }

    /// SIGUSR2: starts an upgrade on a thread of its own, unless one runs
    /// or the server is shutting down. `running` and `activated` are the
    /// listeners as the reloader knows them.
    pub fn on_sigusr2(&mut self, running: &[Running], activated: bool, stopping: bool) {
        let why = if stopping {
            Some("shutting down")
        } else {
            self.busy()
        };
        if let Some(why) = why {
            xps_log!(Level::Warning, SOURCE, "SIGUSR2 ignored: {why}");
            return;
        }
        let job = Job {
            exe: self.exe.clone(),
            workers: self.workers.clone(),
            stop_all: self.stop_all.clone(),
            notifier: self.notifier.clone(),
            metrics: self.metrics.clone(),
            metrics_socket: self
                .metrics_socket
                .as_ref()
                .and_then(|(a, s)| Some((a.clone(), s.try_clone().ok()?))),
            slots: self.slots.clone(),
            state: self.state.clone(),
            running: running.to_vec(),
            activated,
        };
        let mut s = self.state.lock();
        s.phase = Phase::Starting;
        s.abort = false;
        s.stop_after = false;
        if let Some(old) = s.thread.take() {
            drop(s);
            let _ = old.join(); // a finished rollback's thread
            s = self.state.lock();
        }
        let spawned = thread::Builder::new()
            .name("xps-upgrade".into())
            .spawn(move || job.run());
        match spawned {
            Ok(t) => s.thread = Some(t),
            Err(e) => {
                s.phase = Phase::Idle;
                xps_log!(
                    Level::Error,
                    SOURCE,
                    "SIGUSR2: cannot start the upgrade thread: {}; still serving",
                    crate::os_reason(&e)
                );
            }
        }
    }
}

/// One upgrade, run on its own thread.
struct Job {
    exe: Executable,
    workers: Vec<WorkerLink>,
    stop_all: StopAll,
    notifier: Notifier,
    metrics: Option<Arc<Metrics>>,
    metrics_socket: Option<(ListenAddr, std::net::TcpListener)>,
    slots: Arc<Slots>,
    state: Arc<State>,
    running: Vec<Running>,
    activated: bool,
}

/// One listener's sockets, one per worker (copies this thread keeps
/// until the upgrade ends: a hand-over that fails halfway serves them
/// again).
struct Group {
    addr: ListenAddr,
    bound: SocketAddr,
    per_worker: Vec<OwnedFd>,
}

/// Why an upgrade stopped before the new process accepted.
struct Rollback(String);

/// A hand-over that failed halfway: the batches not written, where the
/// workers send the rest until they stop, and why.
struct HalfWay {
    /// Connections written to the new process (gone with it).
    written: u64,
    kept: Vec<Outbound>,
    rx: Receiver<Outbound>,
    in_flight: Arc<AtomicUsize>,
    why: String,
}

/// The new process, from spawn on.
struct NewProcess {
    child: Child,
    chan: Channel,
}

impl NewProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ends it if it is still there, and reaps it: the old process never
    /// leaves a half-started new one behind (SIGKILL: it never accepted, so
    /// nothing of it needs a graceful end). Dropping the channel only after
    /// that, so it cannot mistake a rollback for the old process's end.
    fn end(mut self) -> String {
        let status = match self.child.try_wait() {
            Ok(Some(st)) => st,
            _ => {
                let _ = self.child.kill();
                match self.child.wait() {
                    Ok(st) => st,
                    Err(_) => return "could not be reaped".to_string(),
                }
            }
        };
        drop(self.chan);
        status.to_string()
    }

    /// After an EOF: waits up to a second for it to exit on its own.
    fn exit_status(mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.to_string();
            }
            thread::sleep(Duration::from_millis(5));
        }
        format!("{} (killed: it closed the channel but went on)", self.end())
    }
}

impl Job {
    fn run(self) {
        self.notifier.reloading();
        xps_log!(
            Level::Info,
            SOURCE,
            "SIGUSR2: starting {}",
            self.exe.path.display()
        );
        let groups = match self.listener_groups() {
            Ok(g) => g,
            Err(Rollback(why)) => return self.rolled_back(&why),
        };
        let new = match self.spawn(&groups) {
            Ok(new) => new,
            Err(Rollback(why)) => return self.rolled_back(&why),
        };
        let (mut new, ready) = match self.wait_ready(new) {
            Ok(r) => r,
            Err(Rollback(why)) => return self.rolled_back(&why),
        };
        // The point of no return: from the Commit on, the new process
        // accepts. A SIGTERM that came first wins.
        {
            let mut s = self.state.lock();
            if s.abort {
                drop(s);
                let status = new.end();
                return self.rolled_back(&format!(
                    "a stop signal came first; pid {} ended ({status})",
                    ready.pid
                ));
            }
            s.phase = Phase::HandingOver;
        }
        let connections = ready.reads.contains(&wire::STATE);
        let open = self.slots.taken();
        if connections {
            xps_log!(
                Level::Info,
                SOURCE,
                "pid {} is ready: it accepts from now on; handing over {open} connection(s)",
                ready.pid
            );
        } else {
            xps_log!(
                Level::Warning,
                SOURCE,
                "pid {} is ready but cannot read hand-over format v{} (it reads {:?}): it accepts from now on; finishing {open} connection(s) here as at shutdown",
                ready.pid,
                wire::STATE,
                ready.reads
            );
        }
        if let Err(e) = new
            .chan
            .send(Kind::Commit as u16, &[&wire::commit(connections)], &[])
        {
            let status = new.end();
            return self.rolled_back(&format!(
                "pid {} went away before it accepted ({}; {status})",
                ready.pid,
                crate::os_reason(&e)
            ));
        }
        // Nothing is closed or moved before the new process is seen alive
        // and accepting.
        if let Err(why) = wait_accepting(&mut new.chan) {
            let status = new.end();
            return self.rolled_back(&format!(
                "pid {} failed after it began accepting ({why}; {status}): the clients it accepted went with it",
                ready.pid
            ));
        }
        let moved = match connections {
            true => match self.hand_over(&mut new) {
                Ok(n) => n,
                Err(h) => return self.failed_halfway(new, groups, h),
            },
            false => 0,
        };
        drop(groups); // the new process holds the sockets now
        self.finish(new, ready.pid, moved);
    }

    /// Every worker's copies of its listening sockets, listener by
    /// listener in configuration order.
    fn listener_groups(&self) -> Result<Vec<Group>, Rollback> {
        let mut copies: Vec<Vec<ListenerCopy>> = Vec::with_capacity(self.workers.len());
        for (w, link) in self.workers.iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            if link.tx.send(Control::ListListeners(tx)).is_err() {
                return Err(Rollback(format!("worker {w} is gone")));
            }
            let _ = link.waker.wake();
            let list = rx
                .recv_timeout(WORKER_ANSWER)
                .map_err(|_| Rollback(format!("worker {w} did not answer")))?;
            copies.push(list);
        }
        // Systemd's sockets: as worker 0 serves them. Else: as configured.
        let order: Vec<(ListenAddr, SocketAddr)> = if self.activated {
            copies
                .first()
                .map(|l| l.iter().map(|c| (c.addr.clone(), c.bound)).collect())
                .unwrap_or_default()
        } else {
            self.running
                .iter()
                .map(|r| (r.addr.clone(), r.at))
                .collect()
        };
        let mut groups = Vec::with_capacity(order.len());
        for (addr, bound) in order {
            let mut per_worker = Vec::with_capacity(copies.len());
            for (w, list) in copies.iter_mut().enumerate() {
                let i = list.iter().position(|c| c.bound == bound).ok_or_else(|| {
                    Rollback(format!("worker {w} has no socket for listener {addr}"))
                })?;
                per_worker.push(list.swap_remove(i).fd);
            }
            groups.push(Group {
                addr,
                bound,
                per_worker,
            });
        }
        Ok(groups)
    }

    /// Starts the new process and sends it the listeners.
    fn spawn(&self, groups: &[Group]) -> Result<NewProcess, Rollback> {
        let cannot = |what: &str, e: std::io::Error| {
            Rollback(format!(
                "cannot start {}: {what}{}",
                self.exe.path.display(),
                crate::os_reason(&e)
            ))
        };
        let (chan, theirs) = Channel::pair().map_err(|e| cannot("socketpair(): ", e))?;
        // The child's end, as an inheritable copy: the only descriptor the
        // new process inherits (everything else is close-on-exec).
        let inherit = dup_inheritable(&theirs).map_err(|e| cannot("dup(): ", e))?;
        let mut cmd = Command::new(&self.exe.path);
        cmd.arg0(&self.exe.argv0)
            .args(&self.exe.args)
            .env(ENV_FD, inherit.as_raw_fd().to_string())
            .env(ENV_PID, std::process::id().to_string());
        let spawned = cmd.spawn();
        drop(inherit);
        drop(theirs);
        let child = spawned.map_err(|e| cannot("", e))?;
        xps_log!(
            Level::Info,
            SOURCE,
            "started pid {}; waiting up to {} s for it to be ready",
            child.id(),
            READY_WITHIN.as_secs()
        );
        let new = NewProcess { child, chan };
        let hello = wire::Hello {
            state: wire::STATE,
            pid: std::process::id(),
            workers: self.workers.len() as u16,
            activated: self.activated,
            connections: self.slots.taken() as u64,
            listeners: groups
                .iter()
                .map(|g| wire::Group {
                    addr: g.addr.clone(),
                    bound: g.bound,
                    sockets: g.per_worker.len() as u16,
                })
                .collect(),
            metrics: self.metrics_socket.as_ref().and_then(|(addr, s)| {
                Some(wire::Endpoint {
                    addr: addr.clone(),
                    bound: s.local_addr().ok()?,
                })
            }),
        };
        let mut fds: Vec<RawFd> = groups
            .iter()
            .flat_map(|g| g.per_worker.iter().map(|f| f.as_raw_fd()))
            .collect();
        if hello.metrics.is_some()
            && let Some((_, s)) = &self.metrics_socket
        {
            fds.push(s.as_raw_fd());
        }
        // The socket buffers it while the new process starts.
        let _ = new.chan.socket().set_write_timeout(Some(READY_WITHIN));
        if let Err(e) = new
            .chan
            .send(Kind::Hello as u16, &[&wire::hello(&hello)], &fds)
        {
            let pid = new.pid();
            // Its end closed: it exited already.
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) {
                return Err(Rollback(format!(
                    "pid {pid} exited before it was ready ({})",
                    new.exit_status()
                )));
            }
            let status = new.end();
            return Err(Rollback(format!(
                "pid {pid} did not take the listeners ({}; {status})",
                crate::os_reason(&e)
            )));
        }
        Ok(new)
    }

    /// Waits up to [`READY_WITHIN`] for `Ready`.
    fn wait_ready(&self, mut new: NewProcess) -> Result<(NewProcess, wire::Ready), Rollback> {
        let pid = new.pid();
        let deadline = Instant::now() + READY_WITHIN;
        let why = loop {
            if self.state.lock().abort {
                break "a stop signal came first".to_string();
            }
            let frame = new.chan.recv(Some((Instant::now() + POLL).min(deadline)));
            break match frame {
                Ok(Some(Frame { kind, payload, .. })) => match Kind::of(kind) {
                    Some(Kind::Ready) => match wire::read_ready(&payload) {
                        Ok(r) => return Ok((new, r)),
                        Err(e) => format!("pid {pid} sent a bad Ready ({e})"),
                    },
                    Some(Kind::Fail) => format!(
                        "pid {pid} failed: {}",
                        wire::read_fail(&payload).unwrap_or_else(|e| e)
                    ),
                    _ => format!("pid {pid} sent frame {kind} before Ready"),
                },
                Ok(None) => {
                    return Err(Rollback(format!(
                        "pid {pid} exited before it was ready ({})",
                        new.exit_status()
                    )));
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    if Instant::now() < deadline {
                        continue;
                    }
                    format!(
                        "pid {pid} was not ready within {} s",
                        READY_WITHIN.as_secs()
                    )
                }
                Err(e) => format!("the channel to pid {pid} failed: {}", crate::os_reason(&e)),
            };
        };
        // The pid is named once: "pid N was not ready …; ended it".
        let it = match why.starts_with(&format!("pid {pid} ")) {
            true => "it".to_string(),
            false => format!("pid {pid}"),
        };
        Err(Rollback(format!("{why}; ended {it} ({})", new.end())))
    }

    /// Tells every worker to move its connections out, and writes their
    /// batches to the new process. Returns how many moved.
    fn hand_over(&self, new: &mut NewProcess) -> Result<u64, HalfWay> {
        let (sinks, rx, in_flight) = Sink::for_workers(self.workers.len());
        for (link, sink) in self.workers.iter().zip(sinks) {
            if link.tx.send(Control::HandOver(sink)).is_ok() {
                let _ = link.waker.wake();
            }
        }
        let _ = new.chan.socket().set_write_timeout(Some(READY_WITHIN));
        let mut moved = 0u64;
        let mut done = 0;
        while done < self.workers.len() {
            let msg = match rx.recv_timeout(WORKER_ANSWER) {
                Ok(m) => m,
                Err(_) => {
                    return Err(HalfWay {
                        written: moved,
                        kept: Vec::new(),
                        rx,
                        in_flight,
                        why: "a worker stopped handing over".to_string(),
                    });
                }
            };
            match msg {
                Outbound::Done { .. } => done += 1,
                Outbound::Batch { worker, conns } => {
                    match write_batch(&new.chan, worker, &conns, &in_flight) {
                        Ok(()) => moved += conns.len() as u64, // our copies close here
                        Err(e) => {
                            return Err(HalfWay {
                                written: moved,
                                kept: vec![Outbound::Batch { worker, conns }],
                                rx,
                                in_flight,
                                why: format!("writing to it failed: {}", crate::os_reason(&e)),
                            });
                        }
                    }
                }
            }
        }
        Ok(moved)
    }

    /// The hand-over failed after the new process accepted: every worker
    /// serves its own listeners again and takes back the connections not
    /// written yet; those written are the new process's (lost with it).
    fn failed_halfway(&self, new: NewProcess, groups: Vec<Group>, h: HalfWay) {
        let HalfWay {
            written,
            mut kept,
            rx,
            in_flight,
            why,
        } = h;
        let pid = new.pid();
        let status = new.end();
        let mut per_worker: Vec<Vec<Listener>> =
            (0..self.workers.len()).map(|_| Vec::new()).collect();
        for g in groups {
            for (w, fd) in g.per_worker.into_iter().enumerate() {
                let socket = std::net::TcpListener::from(fd);
                per_worker[w].push(Listener::new(socket, g.addr.clone(), g.bound));
            }
        }
        let (ack, acks) = mpsc::channel();
        let mut asked = 0;
        for (link, listeners) in self.workers.iter().zip(per_worker) {
            if link
                .tx
                .send(Control::Resume(listeners, ack.clone()))
                .is_ok()
            {
                let _ = link.waker.wake();
                asked += 1;
            }
        }
        for _ in 0..asked {
            let _ = acks.recv_timeout(WORKER_ANSWER);
        }
        // Every worker has stopped moving: what they sent until then is
        // all there is.
        kept.extend(drain(&rx, &in_flight));
        for msg in kept.drain(..) {
            if let Outbound::Batch { worker, conns } = msg
                && let Some(link) = self.workers.get(worker)
                && link.tx.send(Control::Adopt(conns)).is_ok()
            {
                let _ = link.waker.wake();
            }
        }
        xps_log!(
            Level::Error,
            SOURCE,
            "pid {pid} failed during the hand-over ({why}; {status}): {written} connection(s) written to it went with it, the others are served here again; still serving"
        );
        self.notifier
            .ready_with_status("upgrade failed; still serving");
        let stop = {
            let mut s = self.state.lock();
            s.phase = Phase::Idle;
            s.stop_after
        };
        if stop {
            (self.stop_all)();
        }
    }

    /// Everything moved (or, with a format it cannot read, the new process
    /// took the listeners only): stop the workers (they finish what is
    /// left, as at shutdown), hand the counters over, wait for `Bye`, hand
    /// the unit over to the new pid and let `main` exit.
    fn finish(self, mut new: NewProcess, pid: u32, moved: u64) {
        (self.stop_all)();
        if !self
            .state
            .wait_workers(crate::core::drain::SHUTDOWN_GRACE * 2)
        {
            xps_log!(
                Level::Warning,
                SOURCE,
                "the workers are slow to stop; handing the counters over now"
            );
        }
        let done = wire::Done {
            handed_over: moved,
            counters: self
                .metrics
                .as_ref()
                .map(|m| m.total_samples())
                .unwrap_or_default(),
        };
        let said_bye = new
            .chan
            .send(Kind::Done as u16, &[&wire::done(&done)], &[])
            .is_ok()
            && matches!(
                new.chan.recv(Some(Instant::now() + READY_WITHIN)),
                Ok(Some(Frame { kind, .. })) if kind == Kind::Bye as u16
            );
        if !said_bye {
            xps_log!(
                Level::Warning,
                SOURCE,
                "pid {pid} did not confirm the end of the hand-over; it has every connection, exiting anyway"
            );
        }
        self.notifier
            .main_pid_ready(pid, &format!("upgraded: pid {pid} serves"));
        self.notifier.barrier(Duration::from_secs(5));
        xps_log!(
            Level::Info,
            SOURCE,
            "handed over {moved} connection(s) to pid {pid}; exiting"
        );
        self.state.lock().handed_over_to = Some(pid);
        // The channel closes here: the new process hears the old one is
        // done. Its `Child` is dropped unreaped: it outlives us.
        drop(new);
    }

    /// Logs why the upgrade stopped and goes back to serving.
    fn rolled_back(&self, why: &str) {
        let stopping = {
            let mut s = self.state.lock();
            s.phase = Phase::Idle;
            s.abort
        };
        if stopping {
            // A SIGTERM gave it up: the shutdown goes on (STOPPING=1 sent).
            xps_log!(Level::Warning, SOURCE, "upgrade given up: {why}");
            return;
        }
        xps_log!(Level::Error, SOURCE, "upgrade failed: {why}; still serving");
        self.notifier
            .ready_with_status("upgrade failed; still serving");
    }
}

/// Waits for the new process's `Accepting`.
fn wait_accepting(chan: &mut Channel) -> Result<(), String> {
    match chan.recv(Some(Instant::now() + READY_WITHIN)) {
        Ok(Some(Frame { kind, .. })) if kind == Kind::Accepting as u16 => Ok(()),
        Ok(Some(Frame { kind, payload, .. })) if kind == Kind::Fail as u16 => {
            Err(wire::read_fail(&payload).unwrap_or_else(|e| e))
        }
        Ok(Some(Frame { kind, .. })) => Err(format!("frame {kind} instead of Accepting")),
        Ok(None) => Err("it exited".to_string()),
        Err(e) => Err(crate::os_reason(&e)),
    }
}

/// Writes one batch and its sockets to the new process.
fn write_batch(
    chan: &Channel,
    worker: usize,
    conns: &[crate::core::handover::Moved],
    in_flight: &AtomicUsize,
) -> std::io::Result<()> {
    let bytes = wire::batch(worker, conns);
    let fds: Vec<RawFd> = conns.iter().map(|m| m.fd.as_raw_fd()).collect();
    let r = chan.send(Kind::Batch as u16, &[&bytes], &fds);
    Sink::written(in_flight);
    r
}

/// What the workers still send after a failure (they stop once told to).
fn drain(rx: &Receiver<Outbound>, in_flight: &AtomicUsize) -> Vec<Outbound> {
    rx.try_iter()
        .inspect(|m| {
            if matches!(m, Outbound::Batch { .. }) {
                Sink::written(in_flight);
            }
        })
        .collect()
}

/// An inheritable (not close-on-exec) copy of `fd`, numbered 3 or above.
fn dup_inheritable(fd: &OwnedFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD duplicates a valid fd; the result is a new fd we own.
    let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD, 3) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}
