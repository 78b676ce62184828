//! Beyond Stage 6: what lets an operator see inside the server (SPEC §5).
//!
//! * [`access_log`]: one JSON line per connection that ends, written by a
//!   dedicated thread so the event loop never waits for the disk.
pub mod access_log;
