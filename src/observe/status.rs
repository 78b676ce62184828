//! What the `--metrics` address shows, put together: the registry, the CPU
//! sampler, the last minutes of totals, and a way to ask each worker for a
//! snapshot of its connections. [`http`](crate::observe::http) calls it
//! through its `Status` trait and knows nothing else of the server.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde::Serialize;

use crate::core::snapshot::{Reply, Snapshot};
use crate::observe::http::{Answers, NotGathered, Status};
use crate::observe::metrics::{self, Metrics};
use crate::observe::{api, connections};

/// Asks one worker for a snapshot: delivers the reply to its control
/// channel and wakes it; `false` if the worker is gone (the reply is
/// dropped unanswered).
pub type Asker = Box<dyn Fn(Reply) -> bool + Send + Sync>;

/// Samples of the history: one a second, five minutes.
pub const HISTORY: usize = 300;

/// One second of the history.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
struct Sample {
    uptime_msec: u64,
    open: u64,
    accepted: u64,
    lines: u64,
    received: u64,
    sent: u64,
    cpu_msec: u64,
}

/// The history's answer.
#[derive(Debug, Serialize)]
struct History<'a> {
    pid: u32,
    interval_msec: u64,
    samples: &'a VecDeque<Sample>,
}

/// The endpoint's view of the server.
pub struct Observed {
    metrics: Arc<Metrics>,
    sampler: api::Sampler,
    started: Instant,
    /// One per worker, by index; set once the workers exist.
    workers: OnceLock<Vec<Asker>>,
    /// The last [`HISTORY`] seconds, oldest first.
    history: Mutex<VecDeque<Sample>>,
}

impl Observed {
    /// The view of a server whose registry is `metrics`, started at
    /// `started`.
    pub fn new(metrics: Arc<Metrics>, started: Instant) -> Arc<Observed> {
        Arc::new(Observed {
            sampler: api::Sampler::new(metrics.workers(), started),
            metrics,
            started,
            workers: OnceLock::new(),
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
        })
    }

    /// The workers to ask for snapshots (once, at start-up).
    pub fn connect_workers(&self, askers: Vec<Asker>) {
        let _ = self.workers.set(askers);
    }

    fn uptime_msec(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

impl Status for Observed {
    fn metrics(&self) -> String {
        self.metrics.render()
    }

    fn api(&self) -> String {
        let d = api::dashboard(&self.metrics, &self.sampler, self.started.elapsed());
        serde_json::to_string(&d).unwrap_or_default()
    }

    fn history(&self) -> String {
        let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::to_string(&History {
            pid: std::process::id(),
            interval_msec: 1000,
            samples: &h,
        })
        .unwrap_or_default()
    }

    fn ask_workers(&self) -> Result<(usize, Answers), NotGathered> {
        let Some(workers) = self.workers.get() else {
            return Err(NotGathered("the workers are starting".to_string()));
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for (i, ask) in workers.iter().enumerate() {
            let tx = tx.clone();
            // Runs on the worker's thread: a send that never blocks.
            ask(Box::new(move |s| {
                let _ = tx.send((i, s));
            }));
        }
        Ok((workers.len(), rx))
    }

    fn connections(&self, snapshots: &[Snapshot], limit: usize) -> String {
        let c = connections::gather(snapshots, &self.metrics.totals(), self.uptime_msec(), limit);
        serde_json::to_string(&c).unwrap_or_default()
    }

    fn tick(&self) {
        let t = self.metrics.totals();
        let cpu_msec = metrics::process_cpu_msec().unwrap_or(0);
        let sample = Sample {
            uptime_msec: self.uptime_msec(),
            open: t.open,
            accepted: t.accepted(),
            lines: t.lines,
            received: t.received,
            sent: t.sent,
            cpu_msec,
        };
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(sample);
    }
}
