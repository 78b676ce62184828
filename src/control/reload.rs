//! SIGHUP: reload the CONFIG file, all or nothing (SPEC §5), as nginx's
//! `kill -HUP` and HAProxy's seamless reload: the operator changes the file,
//! sends SIGHUP, and no client notices.
//!
//! The command line given at start-up is merged with the file again by
//! [`Settings::from_cli`] (the validation start-up and `--check` use). A
//! listener is the same listener when it resolves to the same socket
//! address ([`plan`]): it keeps its sockets, so no connect is refused during
//! a reload. Everything that can fail (parsing, binding new sockets, a new
//! access-log path) happens first; only then is each worker sent its share
//! ([`Reconfigure`], applied by `core/control.rs`) and woken. A failure
//! changes nothing. `docs/operations.md` ("Reload: SIGHUP") says what changes
//! when, and what waits for a restart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::Sender;

use mio::Waker;

use crate::config::{Cli, ListenAddr, Settings};
use crate::control::systemd::Notifier;
use crate::core::{Control, Reconfigure};
use crate::features::{Admission, Features, Update};
use crate::network::listener::{self, ListenError};
use crate::observe::access_log::AccessLog;
use crate::observe::metrics::Metrics;
use crate::policy::access::AccessRules;
use crate::slots::Slots;
use crate::utils::logger::Level;
use crate::xps_log;

/// A listener as it runs: its configuration and the address its sockets
/// are bound to (port 0 resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// As configured (the host as written, the PROXY flag).
    pub addr: ListenAddr,
    /// Where its sockets are bound: what the listener *is*.
    pub at: SocketAddr,
}

/// How a reload changes the listeners ([`plan`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// New listeners to open, with the address each resolved to.
    pub added: Vec<(ListenAddr, SocketAddr)>,
    /// Running listeners to close.
    pub removed: Vec<Running>,
    /// Running listeners kept whose configuration changes in place: the
    /// old one and the new one (same bound address).
    pub changed: Vec<(Running, ListenAddr)>,
    /// For each new listener, in order: the bound address of the running
    /// listener it keeps, or `None` if it is added.
    pub kept: Vec<Option<SocketAddr>>,
}

/// Compares the running listeners with the new list (`resolved[i]` is
/// where `new[i]` resolves to, from `listener::resolve_all`, which rejects
/// two that resolve to the same address).
///
/// A listener is the same listener when it resolves to the same socket
/// address: `localhost:8001` keeps the socket of `127.0.0.1:8001`, and a
/// flipped `proxy_protocol` changes the kept listener in place — binding
/// the address again would fail on xps's own socket. A port-0 listener
/// (only from `--listen`, which a reload cannot change) resolves to port 0,
/// not to the port it got: it is the running port-0 listener written the
/// same way, in order.
pub fn plan(running: &[Running], new: &[ListenAddr], resolved: &[SocketAddr]) -> Plan {
    let mut taken = vec![false; running.len()];
    let mut out = Plan::default();
    for (addr, &at) in new.iter().zip(resolved) {
        let found = running.iter().enumerate().position(|(j, r)| {
            !taken[j]
                && if addr.port == 0 {
                    r.addr.port == 0 && r.addr.host == addr.host
                } else {
                    r.at == at
                }
        });
        match found {
            Some(j) => {
                taken[j] = true;
                let r = &running[j];
                if r.addr != *addr {
                    out.changed.push((r.clone(), addr.clone()));
                }
                out.kept.push(Some(r.at));
            }
            None => {
                out.added.push((addr.clone(), at));
                out.kept.push(None);
            }
        }
    }
    out.removed = running
        .iter()
        .zip(&taken)
        .filter(|&(_, &t)| !t)
        .map(|(r, _)| r.clone())
        .collect();
    out
}

/// The reload's log line: `listeners +A -R`, and when kept listeners
/// changed in place ` ~C (ADDR: what; ...)`, naming each change.
fn summary(plan: &Plan) -> String {
    let mut s = format!("listeners +{} -{}", plan.added.len(), plan.removed.len());
    if !plan.changed.is_empty() {
        let what: Vec<String> = plan
            .changed
            .iter()
            .map(|(old, new)| {
                let mut parts = Vec::new();
                if old.addr.proxy != new.proxy {
                    let flag = |on: bool| if on { "on" } else { "off" };
                    parts.push(format!(
                        "proxy_protocol {} -> {}",
                        flag(old.addr.proxy),
                        flag(new.proxy)
                    ));
                }
                if old.addr.host != new.host {
                    parts.push(format!("host {} -> {}", old.addr.host, new.host));
                }
                format!("{}: {}", old.at, parts.join(", "))
            })
            .collect();
        s.push_str(&format!(" ~{} ({})", plan.changed.len(), what.join("; ")));
    }
    s
}

/// A bind of a new listener failed with EADDRINUSE where a listener this
/// reload removes holds the port (`0.0.0.0:8001` -> `127.0.0.1:8001`): it
/// is only closed once the reload commits, so say so instead of leaving
/// the operator to hunt for another process.
fn explain_in_use(e: ListenError, at: Option<SocketAddr>, removed: &[Running]) -> String {
    let holder = at.and_then(|at| {
        removed.iter().find(|r| {
            r.at.port() == at.port()
                && r.at.is_ipv4() == at.is_ipv4()
                && (r.at.ip().is_unspecified() || at.ip().is_unspecified())
        })
    });
    let in_use = crate::os_reason(&std::io::Error::from_raw_os_error(libc::EADDRINUSE));
    match holder {
        Some(r) if e.reason.ends_with(&in_use) => format!(
            "{e} (held by xps's own listener {}, which this reload removes: \
             it closes only once the reload succeeds, so remove it in one reload \
             and add {} in the next)",
            r.addr, e.addr
        ),
        _ => e.to_string(),
    }
}

/// A way to reach one worker's core.
#[derive(Clone)]
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
    /// The listeners as they run, in configuration order (empty with
    /// socket activation).
    pub running: Vec<Running>,
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
        let plan = if self.activated {
            if new.listeners != self.current.listeners {
                xps_log!(
                    Level::Warning,
                    "xps_core_reload()",
                    "listeners come from systemd (socket activation): their changes are ignored"
                );
            }
            Plan::default()
        } else {
            let resolved = listener::resolve_all(&new.listeners).map_err(|e| e.to_string())?;
            plan(&self.running, &new.listeners, &resolved)
        };
        self.warn_fixed(&new);
        // Everything that can fail, before anything changes.
        let opened = listener::create_resolved(&plan.added, self.workers.len()).map_err(|e| {
            let at = plan
                .added
                .iter()
                .find(|(a, _)| *a == e.addr)
                .map(|&(_, at)| at);
            explain_in_use(e, at, &plan.removed)
        })?;
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
        let (applied, acks) = std::sync::mpsc::channel();
        let mut sent = 0;
        for (link, add) in self.workers.iter().zip(opened.per_worker) {
            let msg = Control::Reconfigure(Reconfigure {
                add,
                remove: plan.removed.iter().map(|r| r.at).collect(),
                changed: plan
                    .changed
                    .iter()
                    .map(|(old, new)| (old.at, new.clone()))
                    .collect(),
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
        listener::log_listening(&opened.bound, "xps_core_reload()");
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
            // The new list, each kept listener at its socket's address and
            // each added one at the address it was just bound to.
            let mut bound = opened.bound.iter();
            self.running = current
                .listeners
                .iter()
                .zip(&plan.kept)
                .filter_map(|(addr, kept)| {
                    let at = kept.or_else(|| bound.next().copied())?;
                    Some(Running {
                        addr: addr.clone(),
                        at,
                    })
                })
                .collect();
        }
        self.current = current;
        Ok(summary(&plan))
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
                "{what} changed: takes effect at the next restart or upgrade (SIGUSR2)"
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

    fn addr(host: &str, port: u16, proxy: bool) -> ListenAddr {
        ListenAddr {
            host: host.to_string(),
            port,
            proxy,
        }
    }

    fn sock(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn running(a: ListenAddr, at: SocketAddr) -> Running {
        Running { addr: a, at }
    }

    #[test]
    fn the_plan_keeps_unchanged_listeners() {
        let run: Vec<Running> = [1, 2, 3]
            .iter()
            .map(|&p| running(addr("127.0.0.1", p, false), sock(p)))
            .collect();
        let new = [
            addr("127.0.0.1", 3, false),
            addr("127.0.0.1", 1, false),
            addr("127.0.0.1", 4, false),
        ];
        let p = plan(&run, &new, &[sock(3), sock(1), sock(4)]);
        assert_eq!(p.added, [(addr("127.0.0.1", 4, false), sock(4))]);
        assert_eq!(p.removed, [run[1].clone()]);
        assert!(p.changed.is_empty());
        assert_eq!(p.kept, [Some(sock(3)), Some(sock(1)), None]);
        assert_eq!(summary(&p), "listeners +1 -1");
        let p = plan(&run[..1], &new[1..2], &[sock(1)]);
        assert_eq!(
            p,
            Plan {
                kept: vec![Some(sock(1))],
                ..Plan::default()
            }
        );
    }

    #[test]
    fn a_listener_is_its_resolved_address() {
        // The same address written another way, and with the PROXY flag
        // flipped: kept and changed in place, never re-bound.
        let run = [running(addr("127.0.0.1", 8001, false), sock(8001))];
        let new = [addr("localhost", 8001, true)];
        let p = plan(&run, &new, &[sock(8001)]);
        assert!(p.added.is_empty() && p.removed.is_empty(), "{p:?}");
        assert_eq!(p.changed, [(run[0].clone(), new[0].clone())]);
        assert_eq!(p.kept, [Some(sock(8001))]);
        assert_eq!(
            summary(&p),
            "listeners +0 -0 ~1 (127.0.0.1:8001: proxy_protocol off -> on, host 127.0.0.1 -> localhost)"
        );
    }

    #[test]
    fn port_0_listeners_are_matched_by_how_they_are_written_in_order() {
        // `--listen 127.0.0.1:0` twice: bound to two ports, each resolving
        // to port 0 again on reload.
        let run = [
            running(addr("127.0.0.1", 0, false), sock(40001)),
            running(addr("127.0.0.1", 0, true), sock(40002)),
        ];
        let new = [addr("127.0.0.1", 0, false), addr("127.0.0.1", 0, true)];
        let p = plan(&run, &new, &[sock(0), sock(0)]);
        assert!(
            p.added.is_empty() && p.removed.is_empty() && p.changed.is_empty(),
            "{p:?}"
        );
        assert_eq!(p.kept, [Some(sock(40001)), Some(sock(40002))]);
    }

    #[test]
    fn a_bind_failure_on_a_port_this_reload_frees_is_explained() {
        let removed = [running(
            addr("0.0.0.0", 8001, false),
            SocketAddr::from(([0, 0, 0, 0], 8001)),
        )];
        let e = ListenError {
            addr: addr("127.0.0.1", 8001, false),
            reason: "bind(): Address already in use".to_string(),
        };
        let text = explain_in_use(e, Some(sock(8001)), &removed);
        assert!(
            text.starts_with("cannot listen on 127.0.0.1:8001: bind(): Address already in use (held by xps's own listener 0.0.0.0:8001"),
            "{text}"
        );
        // Another process holding it: the OS reason alone.
        let e = ListenError {
            addr: addr("127.0.0.1", 8002, false),
            reason: "bind(): Address already in use".to_string(),
        };
        assert_eq!(
            explain_in_use(e, Some(sock(8002)), &removed),
            "cannot listen on 127.0.0.1:8002: bind(): Address already in use"
        );
    }

    #[test]
    fn a_new_access_log_path_must_be_writable() {
        assert!(check_writable(std::path::Path::new("/nonexistent-dir/x.log")).is_err());
        assert!(check_writable(std::path::Path::new("-")).is_ok());
    }
}
