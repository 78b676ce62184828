//! The signal thread: what SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 do.
//!
//! * the first SIGINT/SIGTERM stops every worker gracefully ([`Stopper`])
//!   (during an upgrade's hand-over, once it is done); a second exits at
//!   once with 128+N;
//! * SIGHUP reloads the CONFIG file (and reopens the access log);
//! * SIGUSR1 reopens the access log (logrotate's convention);
//! * SIGUSR2 upgrades the binary ([`Upgrader`]). A SIGUSR2 or SIGHUP while
//!   an upgrade runs, and a SIGUSR2 during a shutdown, is ignored with a
//!   warning.
//!
//! Signals are caught ([`catch`]) before the first "listening" line, so a
//! signal sent as soon as the server says it is up is never lost; the
//! thread that acts on them starts once the workers exist ([`spawn`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;

use mio::Waker;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;

use crate::control::reload::Reloader;
use crate::control::systemd::Notifier;
use crate::control::upgrade::Upgrader;
use crate::core::Shared;
use crate::utils::logger::Level;
use crate::xps_log;

/// Stops every worker: sets the shared stop flag and wakes each loop.
#[derive(Clone)]
pub struct Stopper {
    /// The flag every core reads after each wake-up.
    shared: Arc<Shared>,
    /// One waker per worker loop.
    wakers: Arc<Vec<Arc<Waker>>>,
}

impl Stopper {
    /// A stopper for the workers behind `wakers`.
    pub fn new(shared: Arc<Shared>, wakers: Vec<Arc<Waker>>) -> Stopper {
        Stopper {
            shared,
            wakers: Arc::new(wakers),
        }
    }

    /// Asks every worker to shut down gracefully.
    pub fn stop_all(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for w in self.wakers.iter() {
            let _ = w.wake();
        }
    }
}

/// The signals xps acts on, caught and waiting for the signal thread.
pub struct Caught(Signals);

/// Catches SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 from now on.
pub fn catch() -> std::io::Result<Caught> {
    Signals::new([SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2]).map(Caught)
}

/// The running signal thread. It is never joined: it acts on signals until
/// the process exits.
pub struct SignalThread {
    /// The thread.
    _thread: thread::JoinHandle<()>,
}

/// Starts the signal thread.
pub fn spawn(
    caught: Caught,
    stopper: Stopper,
    mut reloader: Reloader,
    notifier: Notifier,
    mut upgrader: Upgrader,
) -> std::io::Result<SignalThread> {
    let Caught(mut signals) = caught;
    let thread = thread::Builder::new()
        .name("xps-signals".into())
        .spawn(move || {
            let mut stops = 0;
            for sig in signals.forever() {
                match sig {
                    SIGUSR1 => reloader.reopen_access_log(),
                    SIGUSR2 => {
                        upgrader.on_sigusr2(&reloader.running, reloader.activated, stops > 0)
                    }
                    SIGHUP if stops == 0 => match upgrader.busy() {
                        Some(why) => {
                            xps_log!(Level::Warning, "xps_signals()", "SIGHUP ignored: {why}")
                        }
                        None => reloader.on_sighup(),
                    },
                    SIGHUP => {}
                    _ => {
                        stops += 1;
                        let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                        if stops == 1 && !upgrader.state.on_stop() {
                            xps_log!(
                                Level::Info,
                                "xps_signals()",
                                "{name} received during an upgrade: the new process takes over; exiting when the hand-over is done (send it again to exit at once)"
                            );
                        } else if stops == 1 {
                            xps_log!(
                                Level::Info,
                                "xps_signals()",
                                "{name} received: finishing replies, then exiting (send it again to exit at once)"
                            );
                            notifier.stopping();
                            stopper.stop_all();
                        } else {
                            xps_log!(Level::Warning, "xps_signals()", "second {name}: exiting now");
                            std::process::exit(128 + sig);
                        }
                    }
                }
            }
        })?;
    Ok(SignalThread { _thread: thread })
}
