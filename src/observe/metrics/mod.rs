//! `--metrics HOST:PORT`: counters that cost the line path nothing it can
//! measure, in the Prometheus text format (SPEC §5).
//!
//! * `counters`: each worker counts into its own cache-line-aligned block,
//!   alone, with a plain load and store, no lock and no shared write per
//!   line; listeners and process-wide events have counters of their own.
//! * `exposition`: at each scrape, the blocks summed into text format
//!   0.0.4, written by hand (a client crate speaks OpenMetrics, which
//!   `promtool check metrics` rejects).
//! * `procfs`: the standard `process_*` series, parsed from `/proc`.
//! * `totals`: the same sums as plain numbers, for `/api` and the status
//!   page.
//!
//! The endpoint that serves it is [`crate::observe::http`]. The design, and
//! why: `docs/metrics.md`.

mod carried;
mod counters;
mod exposition;
mod procfs;
mod totals;

pub use counters::{AcceptError, ListenerCounter, Metrics, WorkerMetrics};
pub use exposition::CONTENT_TYPE;
pub(crate) use procfs::{cpu_ticks, process_cpu_msec, resident_bytes, ticks_per_second};
pub use totals::Totals;
