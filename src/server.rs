//! Start-up and shutdown: the part of the tutorial's `main()` that is not
//! argument parsing.
//!
//! 1. Open every listening socket of every worker (SO_REUSEPORT when there
//!    are several workers). Any failure stops here, before anything is
//!    served: exit status 1 with one line naming the address.
//! 2. Build one [`Core`] per worker, each on its own [`EventLoop`].
//! 3. Start a signal thread: the first SIGINT/SIGTERM sets the shared stop
//!    flag and wakes every loop (graceful shutdown); a second exits at once.
//! 4. Run the workers on threads and wait for them.
//!
//! SIGPIPE is ignored by the Rust runtime before `main` runs, and sockets
//! are written with `send(MSG_NOSIGNAL)`, so a vanished client can never kill
//! the process: its write fails with EPIPE and only its connection closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::config::{ListenAddr, Settings};
use crate::core::{Core, Limits, Shared, WAKER};
use crate::event_loop::EventLoop;
use crate::network::listener::{self, ListenError, Listener};
use crate::utils::logger::{self, Level};
use crate::xps_log;

/// Why the server stopped with a non-zero status.
#[derive(Debug)]
pub enum ServerError {
    /// A listener could not be opened (exit 1).
    Listen(ListenError),
    /// Anything else that stops the server (exit 1): the epoll instance, a
    /// thread, the signal handler.
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

/// Opens `addrs` once per worker. Port 0 is resolved to the port the kernel
/// picked for the first worker, so every worker shares it.
pub fn open_listeners(
    addrs: &[ListenAddr],
    workers: usize,
) -> Result<Vec<Vec<Listener>>, ListenError> {
    let reuse_port = workers > 1;
    let mut per_worker: Vec<Vec<Listener>> = (0..workers).map(|_| Vec::new()).collect();
    for addr in addrs {
        let mut at: SocketAddr = listener::resolve(addr)?;
        for list in per_worker.iter_mut() {
            let socket = listener::bind(addr, at, reuse_port)?;
            let local = socket.local_addr().map_err(|e| ListenError {
                addr: addr.clone(),
                reason: format!("getsockname(): {}", crate::os_reason(&e)),
            })?;
            at.set_port(local.port());
            list.push(Listener::new(socket, addr.clone()));
        }
        xps_log!(
            Level::Info,
            "main()",
            "Server listening on port {} ({})",
            at.port(),
            at
        );
    }
    Ok(per_worker)
}

/// Runs the server until a signal stops it.
pub fn run(settings: &Settings) -> Result<(), ServerError> {
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
    let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(|e| fatal("signal handler", e))?;
    let per_worker =
        open_listeners(&settings.listeners, settings.workers).map_err(ServerError::Listen)?;
    let shared = Arc::new(Shared::default());
    let limits = Limits {
        max_line: settings.max_line,
        max_connections: settings.max_connections,
        idle_timeout: settings.idle_timeout,
    };
    let mut loops = Vec::with_capacity(settings.workers);
    let mut wakers = Vec::with_capacity(settings.workers);
    for listeners in per_worker {
        let event_loop = EventLoop::create().map_err(|e| fatal("epoll_create()", e))?;
        wakers.push(event_loop.waker(WAKER).map_err(|e| fatal("eventfd()", e))?);
        let handle = event_loop.handle().map_err(|e| fatal("epoll dup", e))?;
        let core = Core::new(handle, listeners, limits, shared.clone())
            .map_err(|e| fatal("epoll_ctl(listener)", e))?;
        loops.push((event_loop, core));
    }

    let signal_handle = signals.handle();
    let stop_shared = shared.clone();
    let signal_thread = thread::Builder::new()
        .name("xps-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                seen += 1;
                let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                if seen == 1 {
                    xps_log!(
                        Level::Info,
                        "main()",
                        "{name} received: finishing replies, then exiting (send it again to exit at once)"
                    );
                    stop_shared.stop.store(true, Ordering::Relaxed);
                    for w in &wakers {
                        let _ = w.wake();
                    }
                } else {
                    xps_log!(Level::Warning, "main()", "second {name}: exiting now");
                    std::process::exit(128 + sig);
                }
            }
        })
        .map_err(|e| fatal("spawn signal thread", e))?;

    let named = settings.workers > 1;
    let mut threads = Vec::with_capacity(loops.len());
    for (id, (mut event_loop, mut core)) in loops.into_iter().enumerate() {
        let shared = shared.clone();
        let t = thread::Builder::new()
            .name(format!("xps-worker-{id}"))
            .spawn(move || {
                if named {
                    logger::set_worker(Some(id));
                }
                let result = event_loop.run(&mut core);
                if result.is_err() {
                    // Take the other workers down with this one.
                    shared.stop.store(true, Ordering::Relaxed);
                }
                result
            })
            .map_err(|e| fatal("spawn worker thread", e))?;
        threads.push(t);
    }
    let mut failure = None;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(fatal("epoll_wait()", e)),
            Err(_) => failure = Some(ServerError::Fatal("a worker thread panicked".into())),
        }
    }
    signal_handle.close();
    let _ = signal_thread.join();
    match failure {
        Some(e) => Err(e),
        None => {
            xps_log!(Level::Info, "main()", "all connections closed, exiting");
            Ok(())
        }
    }
}
