//! Start-up and shutdown: the part of the tutorial's `main()` that is not
//! argument parsing.
//!
//! Every listening socket of every worker is opened first
//! ([`listener::create_all`], or systemd's sockets adopted): a failure stops
//! here, exit status 1, before any "listening" line. Then one [`Core`] per
//! worker, each on its own [`EventLoop`] with its [`Features`]; the
//! "listening" lines; the signal thread ([`signals::spawn`]), which lives
//! until the process exits so a second signal always exits at once; and the
//! workers, on threads under [`supervise`]: if one fails or panics, the
//! others stop gracefully and the process exits 1, never half alive.
//! SIGPIPE is ignored (the Rust runtime) and sockets are written with
//! `MSG_NOSIGNAL`, so a vanished client only ends its own connection.
//! `docs/lifetime-of-a-connection.md` (start-up, shutdown) walks through it.
//!
//! Started by an upgrade (SIGUSR2, SPEC §7), the process takes the old
//! one's listening sockets instead of binding them (`control::upgrade`),
//! says it is ready, and starts its workers only when the old one commits.

use std::sync::Arc;
use std::sync::mpsc;
use std::thread;

use crate::config::{Cli, Settings};
use crate::control::pidfile;
use crate::control::reload::{Reloader, Running, WorkerLink};
use crate::control::signals::{self, Stopper};
use crate::control::systemd::{self, Notifier};
use crate::control::upgrade::exe::Executable;
use crate::control::upgrade::takeover::{Commit, Finisher, TakeOver};
use crate::control::upgrade::{self, Upgrader};
use crate::core::{Control, Core, Shared, Target};
use crate::event_loop::EventLoop;
use crate::features::{Admission, Features};
use crate::network::listener::{self, ListenError, OpenListeners};
use crate::observe;
use crate::utils::logger::{self, Level};
use crate::xps_log;

/// Why the server stopped with a non-zero status.
#[derive(Debug)]
pub enum ServerError {
    /// A listener could not be opened (exit 1).
    Listen(ListenError),
    /// Anything else that stops the server (exit 1): the epoll instance, a
    /// thread, the signal handler, a worker that failed.
    Fatal(String),
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerError::Listen(e) => e.fmt(f),
            ServerError::Fatal(s) => f.write_str(s),
        }
    }
}

/// `--check`: what start-up would resolve, resolved; nothing bound. The
/// options and the config file were already validated by
/// [`Settings::from_cli`], the one validation path start-up uses too.
pub fn check(settings: &Settings) -> Result<(), ServerError> {
    listener::resolve_all(&settings.listeners).map_err(ServerError::Listen)?;
    if let Some(addr) = &settings.metrics {
        listener::resolve(addr).map_err(ServerError::Listen)?;
    }
    Ok(())
}

/// Runs the server until a signal stops it. `cli` is the command line the
/// settings came from: a reload merges it with the CONFIG file again.
pub fn run(settings: &Settings, cli: Cli) -> Result<(), ServerError> {
    if !settings.ignored_keys.is_empty() {
        xps_log!(
            Level::Warning,
            "xps_config_load()",
            "keys not served by this release are ignored: {}",
            settings.ignored_keys.join(", ")
        );
    }
    let fatal = |what: &str, e: std::io::Error| {
        ServerError::Fatal(format!("{what}: {}", crate::os_reason(&e)))
    };
    // What SIGUSR2 starts: the path we were started from, resolved now.
    let exe = Executable::at_start_up();
    // Catch the signals before the first "listening" line: a signal sent as
    // soon as the server says it is up must start a graceful shutdown, not
    // kill it. Signals that come before the signal thread starts wait.
    let caught = signals::catch().map_err(|e| fatal("signal handler", e))?;
    // An upgrade's new process takes the old one's sockets (before any
    // thread starts).
    let mut takeover = TakeOver::from_env().map_err(ServerError::Fatal)?;
    let failed = |t: &Option<TakeOver>, e: ServerError| {
        if let Some(t) = t {
            t.fail(&e.to_string());
        }
        e
    };
    let (open, running, activated_flag) = match &mut takeover {
        Some(t) => {
            let activated = t.activated();
            let (open, running) = match t.listeners(settings) {
                Ok(r) => r,
                Err(e) => {
                    t.fail(&e);
                    return Err(ServerError::Fatal(e));
                }
            };
            listener::log_listening(&open.bound, "main()");
            (open, running, activated)
        }
        None => open_listeners(settings)?,
    };
    let notifier = Notifier::from_env();
    if takeover.is_some() {
        // Not the unit's main process until the old one says so.
        notifier.mute();
    }
    let inherited = takeover.as_mut().and_then(|t| t.metrics_socket(settings));
    let mut observers = observe::open_with(settings, inherited, takeover.is_some())
        .map_err(|e| match e {
            observe::OpenError::Listen(e) => ServerError::Listen(e),
            observe::OpenError::Fatal(e) => ServerError::Fatal(e),
        })
        .map_err(|e| failed(&takeover, e))?;
    let shared = Shared::new(settings.max_connections);
    let admission = Admission::from_settings(settings);
    let mut loops = Vec::with_capacity(settings.workers);
    let mut wakers = Vec::with_capacity(settings.workers);
    let mut links = Vec::with_capacity(settings.workers);
    for (worker, listeners) in open.per_worker.into_iter().enumerate() {
        let features = Features::new(
            worker,
            admission.clone(),
            shared.slots.clone(),
            observers.worker_metrics(worker),
            observers.access_log(),
        );
        let event_loop = EventLoop::create().map_err(|e| fatal("epoll_create()", e))?;
        let waker = Arc::new(
            event_loop
                .waker(Target::Waker.token())
                .map_err(|e| fatal("eventfd()", e))?,
        );
        let (tx, rx) = mpsc::channel();
        links.push(WorkerLink {
            tx,
            waker: waker.clone(),
        });
        wakers.push(waker);
        let handle = event_loop.handle().map_err(|e| fatal("epoll dup", e))?;
        let core = Core::new(
            handle,
            listeners,
            settings.limits(),
            shared.clone(),
            features,
            Some(rx),
        )
        .map_err(|e| fatal("epoll_ctl(listener)", e))?;
        loops.push((event_loop, core));
    }
    observers.connect_workers(|| snapshot_askers(&links));
    let slots = shared.slots.clone();
    let stop = shared.clone();
    let stopper = Stopper::new(shared, wakers);
    let state = upgrade::State::new(takeover.is_some());
    let upgrader = Upgrader {
        exe,
        workers: links.clone(),
        stop_all: {
            let stopper = stopper.clone();
            Arc::new(move || stopper.stop_all())
        },
        notifier: notifier.clone(),
        metrics: observers.metrics.clone(),
        metrics_socket: settings.metrics.clone().zip(observers.metrics_socket()),
        slots: slots.clone(),
        state: state.clone(),
    };
    let reloader = Reloader {
        cli,
        current: settings.clone(),
        running,
        activated: activated_flag,
        workers: links.clone(),
        slots: slots.clone(),
        access_log: observers.access_log(),
        metrics: observers.metrics.clone(),
        notifier: notifier.clone(),
        admission,
    };
    let signal_thread = signals::spawn(
        caught,
        stopper.clone(),
        reloader,
        notifier.clone(),
        upgrader,
    )
    .map_err(|e| fatal("spawn signal thread", e))?;
    let pid_file = |path: &std::path::Path| {
        pidfile::prepare(path, std::process::id()).map_err(|e| {
            format!(
                "cannot write the pid file {}: {}",
                path.display(),
                crate::os_reason(&e)
            )
        })
    };
    match takeover {
        None => {
            // Before "listening": a pid file that cannot be written stops
            // start-up (exit 1) before the server says it serves.
            if let Some(path) = &settings.pid_file {
                pid_file(path)
                    .and_then(|p| {
                        p.commit()
                            .map_err(|e| format!("rename(): {}", crate::os_reason(&e)))
                    })
                    .map_err(ServerError::Fatal)?;
            }
            // Every listener of every worker is open: now say so.
            listener::log_listening(&open.bound, "main()");
            notifier.ready_with_status(&status_text(slots.taken()));
        }
        Some(mut t) => {
            let old = t.old_pid();
            // Written beside its place before Ready: one that cannot be
            // written rolls the upgrade back, the old pid file stays.
            let pid_file = match settings.pid_file.as_deref().map(pid_file).transpose() {
                Ok(p) => p,
                Err(e) => {
                    t.fail(&e);
                    return Err(ServerError::Fatal(e));
                }
            };
            listener::log_listening(&open.bound, "main()");
            t.ready().map_err(|e| fatal("upgrade channel", e))?;
            match t.wait_commit(&stop.stop) {
                Commit::Go { .. } | Commit::OldGone => {}
                Commit::Stopped => {
                    xps_log!(
                        Level::Info,
                        "main()",
                        "stopped before taking over from pid {old}"
                    );
                    return Ok(());
                }
                Commit::RolledBack => {
                    return Err(ServerError::Fatal(format!(
                        "pid {old} did not hand over: exiting"
                    )));
                }
            }
            // Before the workers accept anyone.
            let held = t.hold_slots(&slots);
            let finisher = Finisher {
                workers: links,
                metrics: observers.metrics.clone(),
                deferred: observers.deferred_metrics(),
                pid_file,
                notifier: notifier.clone(),
                state: state.clone(),
                listeners: t.listeners_taken(),
                held,
            };
            t.finish(finisher)
                .map_err(|e| fatal("spawn take-over thread", e))?;
        }
    }

    let named = settings.workers > 1;
    let workers: Vec<Worker> = loops
        .into_iter()
        .enumerate()
        .map(|(id, (mut event_loop, mut core))| -> Worker {
            Box::new(move || {
                if named {
                    logger::set_worker(Some(id));
                }
                event_loop
                    .run(&mut core)
                    .map_err(|e| format!("epoll_wait(): {}", crate::os_reason(&e)))
            })
        })
        .collect();
    let result = supervise(
        workers,
        || stopper.stop_all(),
        || notifier.status(&status_text(slots.taken())),
    );
    // An upgrade's last steps (the counters, the new process's Bye) wait
    // for the workers to have ended.
    let handed_over = state.after_workers();
    // The signal thread is neither closed nor joined: it runs until the
    // process exits, so a second SIGINT/SIGTERM exits at once also while the
    // access log's writer is given its last seconds here.
    drop(signal_thread);
    // Writes every record queued, or gives up on a blocked writer after
    // CLOSE_GRACE, counting what it holds as dropped.
    observers.close();
    if let Some(path) = &settings.pid_file {
        pidfile::remove_if_holds(path, std::process::id());
    }
    match result {
        Err(e) => Err(ServerError::Fatal(e)),
        Ok(()) => {
            if handed_over.is_none() {
                xps_log!(Level::Info, "main()", "all connections closed, exiting");
            }
            Ok(())
        }
    }
}

/// Opens every listener of every worker: the configured ones, or under
/// systemd socket activation the sockets it passed. Returns them, the
/// listeners as a reload compares them, and whether they came from systemd.
fn open_listeners(settings: &Settings) -> Result<(OpenListeners, Vec<Running>, bool), ServerError> {
    // systemd socket activation: the sockets systemd passed replace the
    // configured listeners (taken before any thread starts).
    let activated = systemd::listen_fds().map_err(ServerError::Fatal)?;
    let activated_flag = activated.is_some();
    let open = match activated {
        Some(sockets) => {
            systemd::adopt_listeners(sockets, settings.workers).map_err(ServerError::Fatal)?
        }
        None => listener::create_all(&settings.listeners, settings.workers)
            .map_err(ServerError::Listen)?,
    };
    // What a reload compares the new listeners with (systemd's sockets are
    // never reloaded).
    let running: Vec<Running> = match activated_flag {
        true => Vec::new(),
        false => settings
            .listeners
            .iter()
            .zip(&open.bound)
            .map(|(addr, &at)| Running {
                addr: addr.clone(),
                at,
            })
            .collect(),
    };
    Ok((open, running, activated_flag))
}

/// How `/api/connections` asks each worker for a snapshot of its
/// connections: a control message, then a wake-up.
fn snapshot_askers(links: &[WorkerLink]) -> Vec<observe::status::Asker> {
    links
        .iter()
        .map(|l| {
            let (tx, waker) = (l.tx.clone(), l.waker.clone());
            Box::new(move |reply| tx.send(Control::Snapshot(reply)).is_ok() && waker.wake().is_ok())
                as observe::status::Asker
        })
        .collect()
}

/// systemd's STATUS= text.
fn status_text(open: usize) -> String {
    format!("{open} connection(s) open")
}

/// How often the supervisor runs its `tick`.
const STATUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// One worker's body: runs its loop to the end, or fails with a reason.
pub type Worker = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// Tells the supervisor how a worker thread ended, also when it unwinds
/// from a panic (`Drop` runs then too).
struct ExitReport {
    /// Worker index.
    id: usize,
    /// What to report; stays "panicked" unless the body returns.
    outcome: Option<Result<(), String>>,
    /// Where the supervisor listens.
    tx: mpsc::Sender<(usize, Result<(), String>)>,
}

impl Drop for ExitReport {
    fn drop(&mut self) {
        let outcome = self
            .outcome
            .take()
            .unwrap_or_else(|| Err("the worker thread panicked".to_string()));
        let _ = self.tx.send((self.id, outcome));
    }
}

/// Runs each worker on its own thread and waits for all of them. The first
/// failure (an error or a panic) calls `stop_all`, so the other workers
/// finish their clients and end too, and is returned, naming the worker.
/// Connections of a worker that panicked are dropped with its core as the
/// thread unwinds, and give their slots back.
///
/// `tick` runs every few seconds while the workers run (systemd's STATUS=).
pub fn supervise(
    workers: Vec<Worker>,
    stop_all: impl Fn(),
    mut tick: impl FnMut(),
) -> Result<(), String> {
    let (tx, rx) = mpsc::channel();
    let mut threads = Vec::with_capacity(workers.len());
    for (id, body) in workers.into_iter().enumerate() {
        let tx = tx.clone();
        let spawned = thread::Builder::new()
            .name(format!("xps-worker-{id}"))
            .spawn(move || {
                let mut report = ExitReport {
                    id,
                    outcome: None,
                    tx,
                };
                report.outcome = Some(body());
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                stop_all();
                for t in threads {
                    let _ = t.join();
                }
                return Err(format!("spawn worker thread: {}", crate::os_reason(&e)));
            }
        }
    }
    drop(tx);
    let mut failure = None;
    let mut running = threads.len();
    while running > 0 {
        let (id, outcome) = match rx.recv_timeout(STATUS_INTERVAL) {
            Ok(report) => report,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tick();
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        running -= 1;
        if let Err(reason) = outcome
            && failure.is_none()
        {
            xps_log!(
                Level::Error,
                "main()",
                "worker {id} failed: {reason}; stopping the other workers"
            );
            failure = Some(format!("worker {id} failed: {reason}"));
            stop_all();
        }
    }
    for t in threads {
        let _ = t.join();
    }
    failure.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    /// A worker that runs until `stop` is set, like an event loop.
    fn until_stopped(stop: Arc<AtomicBool>) -> Worker {
        Box::new(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() > deadline {
                    return Err("never stopped".to_string());
                }
                thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        })
    }

    #[test]
    fn a_panicking_worker_stops_the_others_and_fails() {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = vec![
            until_stopped(stop.clone()),
            Box::new(|| -> Result<(), String> { panic!("worker bug") }) as Worker,
            until_stopped(stop.clone()),
        ];
        let started = Instant::now();
        let s = stop.clone();
        let r = supervise(workers, move || s.store(true, Ordering::Relaxed), || {});
        assert_eq!(
            r,
            Err("worker 1 failed: the worker thread panicked".to_string())
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_failing_worker_stops_the_others_and_fails() {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = vec![
            until_stopped(stop.clone()),
            Box::new(|| Err("epoll_wait(): Bad file descriptor".to_string())) as Worker,
        ];
        let s = stop.clone();
        let r = supervise(workers, move || s.store(true, Ordering::Relaxed), || {});
        assert_eq!(
            r,
            Err("worker 1 failed: epoll_wait(): Bad file descriptor".to_string())
        );
    }

    #[test]
    fn workers_that_end_cleanly_succeed() {
        let workers: Vec<Worker> = vec![Box::new(|| Ok(())), Box::new(|| Ok(()))];
        assert_eq!(supervise(workers, || {}, || {}), Ok(()));
    }
}
