//! SIGHUP: reload the CONFIG file, all or nothing (SPEC §5).
//!
//! The anchors are nginx's `kill -HUP` and HAProxy's seamless reload: the
//! operator changes the file, sends SIGHUP, and no client notices.
//!
//! 1. The command line given at start-up is merged with the file again by
//!    [`Settings::from_cli`] — the one validation path that start-up and
//!    `--check` use too — so options given on the command line still win.
//! 2. The listener lists are compared ([`diff`]). Listeners whose address is
//!    unchanged keep their sockets: nothing is closed and re-bound, so no
//!    connection attempt to them is refused during a reload. New ones are
//!    opened for every worker *before* anything changes.
//! 3. Only when everything that can fail has succeeded (the config parsed,
//!    every new socket bound, a new access-log path opened) is the change
//!    committed: each worker is sent its new sockets, the listeners to close
//!    the limits and access rules for new connections ([`Reconfigure`]),
//!    and woken (the per-source limit and the buffer bound, shared by all
//!    workers, change in place). Any
//!    failure before that is logged and changes nothing.
//!
//! What a reload does not change is named in a warning and waits for a
//! restart: the number of workers, the metrics address, and turning the
//! access log on or off. Started without a CONFIG file, SIGHUP only reopens
//! the access log; started with sockets from systemd (socket activation),
//! the listeners are systemd's and a reload leaves them alone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::Sender;

use mio::Waker;

use crate::admission::AccessRules;
use crate::config::{Cli, ListenAddr, Settings};
use crate::control::systemd::Notifier;
use crate::core::{Control, Reconfigure};
use crate::features::{Admission, Features, Update};
use crate::network::listener;
use crate::observe::access_log::AccessLog;
use crate::observe::metrics::Metrics;
use crate::slots::Slots;
use crate::utils::logger::Level;
use crate::xps_log;

/// The listeners `new` adds to `old`, and those it removes, in order.
pub fn diff(old: &[ListenAddr], new: &[ListenAddr]) -> (Vec<ListenAddr>, Vec<ListenAddr>) {
    let added = new.iter().filter(|a| !old.contains(a)).cloned().collect();
    let removed = old.iter().filter(|a| !new.contains(a)).cloned().collect();
    (added, removed)
}

/// A way to reach one worker's core.
pub struct WorkerLink {
    /// Where its control messages go.
    pub tx: Sender<Control<Features>>,
    /// Wakes its loop to read them.
    pub waker: Arc<Waker>,
}

/// Everything a reload needs; owned by the signal thread.
pub struct Reloader {
    /// The command line as given at start-up (its options win over the file).
    pub cli: Cli,
    /// The settings the server runs with now.
    pub current: Settings,
    /// The address each of `current.listeners` is bound to, in order.
    pub bound: Vec<SocketAddr>,
    /// The listeners came from systemd (socket activation).
    pub activated: bool,
    /// One link per worker.
    pub workers: Vec<WorkerLink>,
    /// The `--max-connections` slots (their cap is reloadable).
    pub slots: Arc<Slots>,
    /// The access log, if on.
    pub access_log: Option<AccessLog>,
    /// The metrics registry, if on (`xps_reloads_total`).
    pub metrics: Option<Arc<Metrics>>,
    /// systemd's notify socket.
    pub notifier: Notifier,
    /// The admission state the workers share (its per-source table and
    /// buffer budget take new limits in place).
    pub admission: Admission,
}

impl Reloader {
    /// SIGUSR1: reopens the access log (logrotate's convention).
    pub fn reopen_access_log(&self) {
        if let Some(log) = &self.access_log {
            log.reopen();
        }
    }

    /// SIGHUP: reopens the access log and, with a CONFIG file, reloads it.
    pub fn on_sighup(&mut self) {
        self.notifier.reloading();
        if let Some(log) = &self.access_log {
            log.reopen();
        }
        if self.current.config.is_none() {
            xps_log!(
                Level::Info,
                "xps_core_reload()",
                "SIGHUP: access log reopened (no CONFIG file to reload)"
            );
            self.notifier.ready();
            return;
        }
        let outcome = self.reload();
        match &outcome {
            Ok(summary) => xps_log!(
                Level::Info,
                "xps_core_reload()",
                "configuration reloaded: {summary}"
            ),
            Err(e) => xps_log!(
                Level::Error,
                "xps_core_reload()",
                "reload failed, still serving the previous configuration: {e}"
            ),
        }
        if let Some(m) = &self.metrics {
            m.reload(outcome.is_ok());
        }
        self.notifier.ready();
    }

    /// Validates and opens everything new, then commits it. Returns what
    /// changed, in the log's words.
    fn reload(&mut self) -> Result<String, String> {
        let new = Settings::from_cli(self.cli.clone()).map_err(|e| e.to_string())?;
        let (added, removed) = if self.activated {
            if new.listeners != self.current.listeners {
                xps_log!(
                    Level::Warning,
                    "xps_core_reload()",
                    "listeners come from systemd (socket activation): their changes are ignored"
                );
            }
            (Vec::new(), Vec::new())
        } else {
            diff(&self.current.listeners, &new.listeners)
        };
        self.warn_fixed(&new);
        // Everything that can fail, before anything changes.
        let opened =
            listener::create_all(&added, self.workers.len()).map_err(|e| e.to_string())?;
        let new_log_path = match (&self.current.access_log, &new.access_log) {
            (Some(old), Some(path)) if old != path => {
                check_writable(path)?;
                Some(path.clone())
            }
            _ => None,
        };
        // Commit.
        let limits = new.limits();
        let rules = Arc::new(new.access.clone());
        let proxy_from = AccessRules::trusted_proxies(&new.proxy_from).map(Arc::new);
        let remove: Vec<SocketAddr> = self
            .current
            .listeners
            .iter()
            .zip(&self.bound)
            .filter(|(a, _)| removed.contains(a))
            .map(|(_, at)| *at)
            .collect();
        let (applied, acks) = std::sync::mpsc::channel();
        let mut sent = 0;
        for (link, add) in self.workers.iter().zip(opened.per_worker) {
            let msg = Control::Reconfigure(Reconfigure {
                add,
                remove: remove.clone(),
                changed: Vec::new(),
                limits,
                update: Update {
                    rules: rules.clone(),
                    proxy_from: proxy_from.clone(),
                },
                applied: applied.clone(),
            });
            if link.tx.send(msg).is_ok() {
                let _ = link.waker.wake();
                sent += 1;
            }
        }
        // Wait until every worker has applied it (a loop answers within
        // microseconds; a shutting-down one may never): only then are the
        // removed listeners closed, so that a reload right after this one
        // can bind their addresses again.
        for _ in 0..sent {
            if acks
                .recv_timeout(std::time::Duration::from_secs(2))
                .is_err()
            {
                break;
            }
        }
        self.slots.set_max(new.max_connections);
        self.admission
            .sources
            .set_limit(new.max_connections_per_source);
        self.admission.budget.set_limit(new.max_buffered);
        if let (Some(log), Some(path)) = (&self.access_log, new_log_path) {
            log.reopen_at(path);
        }
        for at in &opened.bound {
            xps_log!(
                Level::Info,
                "xps_core_reload()",
                "Server listening on port {} ({})",
                at.port(),
                at
            );
        }
        // What could not change stays as it runs.
        let mut current = new;
        current.workers = self.current.workers;
        current.metrics = self.current.metrics.clone();
        if self.current.access_log.is_none() != current.access_log.is_none() {
            current.access_log = self.current.access_log.clone();
        }
        if self.activated {
            current.listeners = self.current.listeners.clone();
        } else {
            let mut bound = Vec::with_capacity(current.listeners.len());
            for addr in &current.listeners {
                let old = self.current.listeners.iter().position(|a| a == addr);
                let new = added.iter().position(|a| a == addr);
                match (old, new) {
                    (Some(i), _) => bound.push(self.bound[i]),
                    (None, Some(j)) => bound.push(opened.bound[j]),
                    (None, None) => {}
                }
            }
            self.bound = bound;
        }
        self.current = current;
        Ok(format!("listeners +{} -{}", added.len(), removed.len()))
    }

    /// Names, in one warning each, what changed but waits for a restart.
    fn warn_fixed(&self, new: &Settings) {
        let mut fixed = Vec::new();
        if new.workers != self.current.workers {
            fixed.push(format!(
                "workers ({} -> {})",
                self.current.workers, new.workers
            ));
        }
        if new.metrics != self.current.metrics {
            fixed.push("metrics".to_string());
        }
        if new.access_log.is_none() != self.current.access_log.is_none() {
            fixed.push("access_log on/off".to_string());
        }
        for what in fixed {
            xps_log!(
                Level::Warning,
                "xps_core_reload()",
                "{what} changed: takes effect at the next restart"
            );
        }
    }
}

/// Whether the access log could be written at `path` (opened for append,
/// created if missing), so a reload that moves it fails before committing.
fn check_writable(path: &std::path::Path) -> Result<(), String> {
    if path.as_os_str() == "-" {
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map(drop)
        .map_err(|e| {
            format!(
                "cannot open access log {}: {}",
                path.display(),
                crate::os_reason(&e)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(port: u16) -> ListenAddr {
        ListenAddr {
            host: "127.0.0.1".to_string(),
            port,
            proxy: false,
        }
    }

    #[test]
    fn the_diff_keeps_unchanged_listeners() {
        let (added, removed) = diff(&[at(1), at(2), at(3)], &[at(3), at(1), at(4)]);
        assert_eq!(added, [at(4)]);
        assert_eq!(removed, [at(2)]);
        let (added, removed) = diff(&[at(1)], &[at(1)]);
        assert!(added.is_empty() && removed.is_empty());
    }

    #[test]
    fn a_new_access_log_path_must_be_writable() {
        assert!(check_writable(std::path::Path::new("/nonexistent-dir/x.log")).is_err());
        assert!(check_writable(std::path::Path::new("-")).is_ok());
    }
}
