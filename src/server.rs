//! Start-up and shutdown: the part of the tutorial's `main()` that is not
//! argument parsing.
//!
//! 1. Open every listening socket of every worker ([`open_listeners`]:
//!    SO_REUSEPORT when there are several workers, after a probe proves no
//!    other socket holds the port). Any failure stops here, before anything
//!    is served and before any "listening" line: exit status 1 with one line
//!    naming the address.
//! 2. Build one [`Core`] per worker, each on its own [`EventLoop`]; then log
//!    one "listening" line per address.
//! 3. Start the signal thread ([`spawn_signal_thread`]): the first
//!    SIGINT/SIGTERM stops every worker gracefully; a second exits at once.
//!    It runs until the process exits, so the second signal works also
//!    while the access log's writer gets its last seconds
//!    ([`AccessLogWriter::close`], bounded by [`access_log::CLOSE_GRACE`]).
//! 4. Run the workers on threads and supervise them ([`supervise`]): if one
//!    fails or panics, the others are stopped gracefully and the process
//!    exits 1 with the reason — never a silent, half-alive server.
//!
//! SIGPIPE is ignored by the Rust runtime before `main` runs, and sockets
//! are written with `send(MSG_NOSIGNAL)`, so a vanished client can never kill
//! the process: its write fails with EPIPE and only its connection closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread;

use mio::Waker;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

use crate::admission::{AccessRules, Action, BufferBudget, Rule, Scope, SourceLimits};
use crate::config::Cli;
use crate::config::{ListenAddr, Settings};
use crate::control::reload::{self, Reloader, WorkerLink};
use crate::control::systemd::{self, Notifier};
use crate::core::{Admission, Core, Observers, Shared, Target};
use crate::event_loop::EventLoop;
use crate::network::listener::{self, ListenError, Listener};
use crate::observe::access_log::{self, AccessLog, AccessLogWriter};
use crate::observe::metrics::Metrics;
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

/// The listening sockets of every worker, and the addresses they are bound
/// to (one per configured listener, port 0 resolved).
pub struct OpenListeners {
    /// `per_worker[w]` holds worker `w`'s sockets, in configuration order.
    pub per_worker: Vec<Vec<Listener>>,
    /// The bound address of each configured listener.
    pub bound: Vec<SocketAddr>,
}

/// `xps_getaddrinfo()` for every listener: the first address each host
/// resolves to. Two listeners that resolve to the same socket address
/// (`localhost:8001` and `127.0.0.1:8001`) would be one socket: an error
/// naming both, the same at start-up, `--check` and reload. Port 0 ("any
/// free port") is a listener of its own each time.
pub fn resolve_all(addrs: &[ListenAddr]) -> Result<Vec<SocketAddr>, ListenError> {
    let mut resolved: Vec<SocketAddr> = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let at = listener::resolve(addr)?;
        if at.port() != 0
            && let Some(j) = resolved.iter().position(|&r| r == at)
        {
            return Err(ListenError {
                addr: addr.clone(),
                reason: format!("the same address ({at}) as {}", addrs[j]),
            });
        }
        resolved.push(at);
    }
    Ok(resolved)
}

/// Resolves `addrs` ([`resolve_all`]) and opens them once per worker.
pub fn open_listeners(addrs: &[ListenAddr], workers: usize) -> Result<OpenListeners, ListenError> {
    let resolved = resolve_all(addrs)?;
    let pairs: Vec<(ListenAddr, SocketAddr)> = addrs.iter().cloned().zip(resolved).collect();
    open_resolved(&pairs, workers)
}

/// Opens each resolved listener once per worker. With several workers each
/// address is first probed ([`listener::probe_free`]), because their
/// SO_REUSEPORT sockets would otherwise share a port with any other process
/// that asks; port 0 is resolved once, so every worker shares the port.
pub fn open_resolved(
    addrs: &[(ListenAddr, SocketAddr)],
    workers: usize,
) -> Result<OpenListeners, ListenError> {
    let reuse_port = workers > 1;
    let mut per_worker: Vec<Vec<Listener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::with_capacity(addrs.len());
    for (addr, at) in addrs {
        let mut at = *at;
        if reuse_port {
            at = listener::probe_free(addr, at)?;
        }
        for list in per_worker.iter_mut() {
            let socket = listener::bind(addr, at, reuse_port)?;
            let local = socket.local_addr().map_err(|e| ListenError {
                addr: addr.clone(),
                reason: format!("getsockname(): {}", crate::os_reason(&e)),
            })?;
            at.set_port(local.port());
            list.push(Listener::new(socket, addr.clone(), at));
        }
        bound.push(at);
    }
    Ok(OpenListeners { per_worker, bound })
}

/// The sockets systemd passed (socket activation), once per worker: every
/// worker accepts from the same sockets.
fn adopt_listeners(
    sockets: Vec<std::net::TcpListener>,
    workers: usize,
) -> Result<OpenListeners, ServerError> {
    let mut per_worker: Vec<Vec<Listener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::with_capacity(sockets.len());
    for socket in sockets {
        let at = socket.local_addr().map_err(|e| {
            ServerError::Fatal(format!("LISTEN_FDS socket: {}", crate::os_reason(&e)))
        })?;
        let addr = ListenAddr {
            host: at.ip().to_string(),
            port: at.port(),
            // systemd's sockets carry no PROXY flag (see docs/load-balancing.md).
            proxy: false,
        };
        for list in per_worker.iter_mut() {
            let copy = socket.try_clone().map_err(|e| {
                ServerError::Fatal(format!("dup(LISTEN_FDS socket): {}", crate::os_reason(&e)))
            })?;
            list.push(Listener::new(copy, addr.clone(), at));
        }
        bound.push(at);
    }
    Ok(OpenListeners { per_worker, bound })
}

/// The access log's handle for the workers, and its writer thread.
type AccessLogParts = (AccessLog, AccessLogWriter);

/// Opens what observes the server: the metrics endpoint and the access
/// log, each only if configured. Failing to open either stops start-up.
fn open_observers(
    settings: &Settings,
) -> Result<(Option<Arc<Metrics>>, Option<AccessLogParts>), ServerError> {
    let metrics = match &settings.metrics {
        None => None,
        Some(addr) => {
            let at = listener::resolve(addr).map_err(ServerError::Listen)?;
            let socket = std::net::TcpListener::bind(at).map_err(|e| {
                ServerError::Listen(ListenError {
                    addr: addr.clone(),
                    reason: format!("bind(): {}", crate::os_reason(&e)),
                })
            })?;
            let local = socket.local_addr().unwrap_or(at);
            let metrics = Metrics::new(settings.workers);
            crate::observe::metrics::serve(socket, metrics.clone()).map_err(|e| {
                ServerError::Fatal(format!("metrics thread: {}", crate::os_reason(&e)))
            })?;
            xps_log!(Level::Info, "main()", "metrics on http://{local}/metrics");
            Some(metrics)
        }
    };
    let log = match &settings.access_log {
        None => None,
        Some(path) => {
            let dropped = metrics
                .as_ref()
                .map_or_else(Default::default, |m| m.access_log_dropped());
            Some(access_log::open(path, dropped).map_err(|e| {
                ServerError::Fatal(format!(
                    "cannot open access log {}: {}",
                    path.display(),
                    crate::os_reason(&e)
                ))
            })?)
        }
    };
    Ok((metrics, log))
}

/// SPEC §6's admission from the settings, shared by every worker.
pub fn admission(settings: &Settings) -> Admission {
    Admission {
        rules: Arc::new(settings.access.clone()),
        proxy_from: proxy_rules(settings),
        sources: SourceLimits::new(settings.max_connections_per_source),
        budget: BufferBudget::new(settings.max_buffered, settings.workers),
    }
}

/// `--proxy-from A --proxy-from B` as rules: allow A, allow B, deny all;
/// `None` = any peer may send headers.
pub fn proxy_rules(settings: &Settings) -> Option<Arc<AccessRules>> {
    (!settings.proxy_from.is_empty()).then(|| {
        let allow = settings.proxy_from.iter().map(|&scope| Rule {
            action: Action::Allow,
            scope,
        });
        let deny_rest = std::iter::once(Rule {
            action: Action::Deny,
            scope: Scope::All,
        });
        Arc::new(AccessRules::new(allow.chain(deny_rest).collect()))
    })
}

/// Stops every worker: sets the shared stop flag and wakes each loop.
#[derive(Clone)]
struct Stopper {
    /// The flag every core reads after each wake-up.
    shared: Arc<Shared>,
    /// One waker per worker loop.
    wakers: Arc<Vec<Arc<Waker>>>,
}

impl Stopper {
    fn stop_all(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for w in self.wakers.iter() {
            let _ = w.wake();
        }
    }
}

/// `--check`: what start-up would resolve, resolved; nothing bound. The
/// options and the config file were already validated by
/// [`Settings::from_cli`], the one validation path start-up uses too.
pub fn check(settings: &Settings) -> Result<(), ServerError> {
    resolve_all(&settings.listeners).map_err(ServerError::Listen)?;
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
    // Catch SIGINT/SIGTERM before the first "listening" line: a signal sent
    // as soon as the server says it is up must start a graceful shutdown,
    // not kill it. Signals that come before the signal thread starts wait
    // in signal-hook's pipe.
    let signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP, SIGUSR1]).map_err(|e| fatal("signal handler", e))?;
    // systemd socket activation: the sockets systemd passed replace the
    // configured listeners (taken before any thread starts).
    let activated = systemd::listen_fds().map_err(ServerError::Fatal)?;
    let activated_flag = activated.is_some();
    let open = match activated {
        Some(sockets) => adopt_listeners(sockets, settings.workers)?,
        None => {
            open_listeners(&settings.listeners, settings.workers).map_err(ServerError::Listen)?
        }
    };
    // What a reload compares the new listeners with (systemd's sockets are
    // never reloaded).
    let running = match activated_flag {
        true => Vec::new(),
        false => settings
            .listeners
            .iter()
            .zip(&open.bound)
            .map(|(addr, &at)| reload::Running {
                addr: addr.clone(),
                at,
            })
            .collect(),
    };
    let notifier = Notifier::from_env();
    let (metrics, access_log) = open_observers(settings)?;
    let shared = Shared::new(settings.max_connections);
    let limits = reload::limits_of(settings);
    let admission = admission(settings);
    let mut loops = Vec::with_capacity(settings.workers);
    let mut wakers = Vec::with_capacity(settings.workers);
    let mut links = Vec::with_capacity(settings.workers);
    for (worker, listeners) in open.per_worker.into_iter().enumerate() {
        let observers = Observers {
            worker,
            metrics: metrics
                .as_ref()
                .and_then(|m| m.take_worker(worker).map(|w| (m.clone(), w))),
            access_log: access_log.as_ref().map(|(log, _)| log.clone()),
        };
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
            limits,
            shared.clone(),
            observers,
            Some(rx),
        )
        .map_err(|e| fatal("epoll_ctl(listener)", e))?
        .with_admission(admission.clone());
        loops.push((event_loop, core));
    }
    // Every listener of every worker is open: now say so.
    for at in &open.bound {
        xps_log!(
            Level::Info,
            "main()",
            "Server listening on port {} ({})",
            at.port(),
            at
        );
    }
    let slots = shared.slots.clone();
    notifier.ready_with_status(&status_text(slots.taken()));
    let stopper = Stopper {
        shared,
        wakers: Arc::new(wakers),
    };
    let control = Control {
        stopper: stopper.clone(),
        reloader: Reloader {
            cli,
            current: settings.clone(),
            running,
            activated: activated_flag,
            workers: links,
            slots: slots.clone(),
            access_log: access_log.as_ref().map(|(log, _)| log.clone()),
            metrics: metrics.clone(),
            notifier: notifier.clone(),
            admission: admission.clone(),
        },
    };
    let signal_thread =
        spawn_signal_thread(signals, control).map_err(|e| fatal("spawn signal thread", e))?;

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
    // The signal thread is neither closed nor joined: it runs until the
    // process exits, so a second SIGINT/SIGTERM exits at once also while the
    // access log's writer is given its last seconds below.
    drop(signal_thread);
    if let Some((_, writer)) = access_log {
        // Writes every record queued, or gives up on a blocked writer after
        // CLOSE_GRACE, counting what it holds as dropped.
        writer.close();
    }
    match result {
        Err(e) => Err(ServerError::Fatal(e)),
        Ok(()) => {
            xps_log!(Level::Info, "main()", "all connections closed, exiting");
            Ok(())
        }
    }
}

/// systemd's STATUS= text.
fn status_text(open: usize) -> String {
    format!("{open} connection(s) open")
}

/// What the signal thread acts on.
struct Control {
    /// Stops the workers (SIGINT, SIGTERM).
    stopper: Stopper,
    /// Reloads (SIGHUP) and reopens the access log (SIGUSR1, SIGHUP).
    reloader: Reloader,
}

/// The signal thread: the first SIGINT/SIGTERM stops every worker
/// gracefully, a second exits at once with 128+N; SIGHUP reloads the
/// CONFIG file (and reopens the access log); SIGUSR1 reopens the access log
/// (logrotate's convention).
fn spawn_signal_thread(
    mut signals: Signals,
    mut control: Control,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("xps-signals".into())
        .spawn(move || {
            let mut stops = 0;
            for sig in signals.forever() {
                match sig {
                    SIGUSR1 => {
                        if let Some(log) = &control.reloader.access_log {
                            log.reopen();
                        }
                    }
                    SIGHUP if stops == 0 => control.reloader.on_sighup(),
                    SIGHUP => {}
                    _ => {
                        stops += 1;
                        let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                        if stops == 1 {
                            xps_log!(
                                Level::Info,
                                "main()",
                                "{name} received: finishing replies, then exiting (send it again to exit at once)"
                            );
                            control.reloader.notifier.stopping();
                            control.stopper.stop_all();
                        } else {
                            xps_log!(Level::Warning, "main()", "second {name}: exiting now");
                            std::process::exit(128 + sig);
                        }
                    }
                }
            }
        })
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
    use std::sync::atomic::AtomicBool;
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
