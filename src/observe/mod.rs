//! Beyond Stage 6: what lets an operator see inside the server (SPEC §5, §8).
//!
//! * [`metrics`]: per-worker counters that cost the line path no lock and no
//!   shared cache line, summed by a scrape thread into the Prometheus text
//!   format, which [`http`] serves behind `--metrics HOST:PORT`, with the
//!   eXpServer dashboard's [`api`], the open [`connections`] and the status
//!   page, all put together by [`status`].
//! * [`access_log`]: one JSON line per connection that ends, written by a
//!   dedicated thread so the event loop never waits for the disk.
//!
//! [`open`] starts what the settings ask for, before any worker runs.
pub mod access_log;
pub mod api;
pub mod connections;
pub mod http;
pub mod metrics;
pub mod status;

use std::sync::Arc;

use crate::config::Settings;
use crate::network::listener::{self, ListenError};
use crate::utils::logger::Level;
use crate::xps_log;
use access_log::{AccessLog, AccessLogWriter};
use metrics::{Metrics, WorkerMetrics};
use status::{Asker, Observed};

/// What observes the server, each part only if configured.
/// What observes the server, each part only if configured.
pub struct Observers {
    /// The metrics registry (its HTTP endpoint runs on a thread of its own).
    pub metrics: Option<Arc<Metrics>>,
    /// What the endpoint shows, with metrics on.
    status: Option<Arc<Observed>>,
    /// A copy of the metrics endpoint's socket (for an upgrade to pass on),
    /// and the endpoint while it waits to be served.
    endpoint: Option<(std::net::TcpListener, Option<DeferredMetrics>)>,
    /// The access log's handle for the workers, and its writer thread.
    log: Option<(AccessLog, AccessLogWriter)>,
}

/// Why [`open`] failed: start-up stops with exit status 1.
#[derive(Debug)]
pub enum OpenError {
    /// The metrics address cannot be opened.
    Listen(ListenError),
    /// A thread or the access log's file.
    Fatal(String),
}

/// The metrics endpoint, open and not served yet: a new process of an
/// upgrade serves it once the old one's counters have been added (so no
/// scrape sees a counter go down).
pub struct DeferredMetrics {
    socket: std::net::TcpListener,
    status: Arc<Observed>,
}

impl DeferredMetrics {
    /// Serves it from now on.
    pub fn serve(self) -> std::io::Result<()> {
        http::serve(self.socket, self.status, http::Limits::default()).map(drop)
    }
}

/// Opens the metrics endpoint and the access log the settings ask for.
pub fn open(settings: &Settings) -> Result<Observers, OpenError> {
    open_with(settings, None, false)
}

/// [`open`], with the metrics endpoint's socket given (`inherited`, from
/// the old process of an upgrade) and, with `defer`, not served until
/// [`Observers::deferred_metrics`] says so.
pub fn open_with(
    settings: &Settings,
    inherited: Option<std::net::TcpListener>,
    defer: bool,
) -> Result<Observers, OpenError> {
    let started = std::time::Instant::now();
    let mut endpoint = None;
    let (metrics, status) = match &settings.metrics {
        None => (None, None),
        Some(addr) => {
            let at = listener::resolve(addr).map_err(OpenError::Listen)?;
            let socket = match inherited {
                Some(socket) => socket,
                None => std::net::TcpListener::bind(at).map_err(|e| {
                    OpenError::Listen(ListenError {
                        addr: addr.clone(),
                        reason: format!("bind(): {}", crate::os_reason(&e)),
                    })
                })?,
            };
            let local = socket.local_addr().unwrap_or(at);
            let metrics = Metrics::new(settings.workers);
            let status = Observed::new(metrics.clone(), started);
            let copy = socket.try_clone().map_err(|e| {
                OpenError::Fatal(format!("dup(metrics socket): {}", crate::os_reason(&e)))
            })?;
            let deferred = DeferredMetrics {
                socket,
                status: status.clone(),
            };
            if defer {
                endpoint = Some((copy, Some(deferred)));
            } else {
                deferred.serve().map_err(|e| {
                    OpenError::Fatal(format!("metrics thread: {}", crate::os_reason(&e)))
                })?;
                endpoint = Some((copy, None));
            }
            xps_log!(Level::Info, "main()", "metrics on http://{local}/metrics");
            xps_log!(Level::Info, "main()", "status page on http://{local}/");
            (Some(metrics), Some(status))
        }
    };
    let log = match &settings.access_log {
        None => None,
        Some(path) => {
            let dropped = metrics
                .as_ref()
                .map_or_else(Default::default, |m| m.access_log_dropped());
            Some(access_log::open(path, dropped).map_err(|e| {
                OpenError::Fatal(format!(
                    "cannot open access log {}: {}",
                    path.display(),
                    crate::os_reason(&e)
                ))
            })?)
        }
    };
    Ok(Observers {
        metrics,
        status,
        endpoint,
        log,
    })
}

impl Observers {
    /// Worker `worker`'s counting handle and the registry, with metrics on.
    pub fn worker_metrics(&self, worker: usize) -> Option<(Arc<Metrics>, WorkerMetrics)> {
        let m = self.metrics.as_ref()?;
        m.take_worker(worker).map(|w| (m.clone(), w))
    }

    /// The metrics endpoint [`open_with`] was told to defer.
    pub fn deferred_metrics(&mut self) -> Option<DeferredMetrics> {
        self.endpoint.as_mut()?.1.take()
    }

    /// A copy of the metrics endpoint's socket, for an upgrade to pass on.
    pub fn metrics_socket(&self) -> Option<std::net::TcpListener> {
        self.endpoint.as_ref()?.0.try_clone().ok()
    }

    /// With metrics on, how `/api/connections` asks each worker (by index)
    /// for a snapshot of its connections.
    pub fn connect_workers(&self, askers: impl FnOnce() -> Vec<Asker>) {
        if let Some(status) = &self.status {
            status.connect_workers(askers());
        }
    }

    /// A handle on the access log, if it is on.
    pub fn access_log(&self) -> Option<AccessLog> {
        self.log.as_ref().map(|(log, _)| log.clone())
    }

    /// At exit: flushes the access log.
    pub fn close(self) {
        if let Some((_, writer)) = self.log {
            writer.close();
        }
    }
}
