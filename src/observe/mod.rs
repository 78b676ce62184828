//! Beyond Stage 6: what lets an operator see inside the server (SPEC §5).
//!
//! * [`metrics`]: per-worker counters that cost the line path no lock and no
//!   shared cache line, summed by a scrape thread into the Prometheus text
//!   format behind `--metrics HOST:PORT`.
//! * [`access_log`]: one JSON line per connection that ends, written by a
//!   dedicated thread so the event loop never waits for the disk.
pub mod access_log;
pub mod metrics;
