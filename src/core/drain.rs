//! Graceful shutdown (SPEC §4): stop accepting, answer what has arrived,
//! close every connection without destroying replies in flight.
//!
//! When the stop flag is seen, the listening sockets close at once and each
//! connection drains: it reads only the bytes that had reached the kernel
//! then (`Connection::begin_drain`), sends their replies, and closes with a
//! lingering close (`Connection::linger`), as nginx does. Lingering
//! connections raise no event when the client acknowledges replies, so they
//! are looked at every [`LINGER_TICK`]. After [`SHUTDOWN_GRACE`] whatever
//! remains is closed.

use std::time::{Duration, Instant};

use crate::core::Core;
use crate::core::hooks::Hooks;
use crate::core::session::Session;
use crate::network::connection::{Next, Pass, Phase};
use crate::network::io::CloseReason;
use crate::utils::logger::Level;
use crate::xps_log;

/// How long shutdown waits for replies to drain before closing anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// During shutdown, how often lingering connections are looked at.
pub const LINGER_TICK: Duration = Duration::from_millis(10);

impl<H: Hooks> Core<H> {
    /// Step 1: stops accepting, and lets every connection read what has
    /// arrived, answer it and close.
    pub(super) fn begin_shutdown(&mut self) {
        xps_log!(
            Level::Debug,
            "xps_core_shutdown()",
            "closing {} listener(s); draining {} connection(s)",
            self.listeners.len(),
            self.connections.len()
        );
        for ls in self.listeners.drain() {
            ls.listener.destroy();
        }
        self.shutdown = Some(self.clock.now + SHUTDOWN_GRACE);
        let keys: Vec<usize> = self.connections.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.begin_drain_of(key);
        }
    }

    /// One connection's part in [`begin_shutdown`](Self::begin_shutdown).
    pub(super) fn begin_drain_of(&mut self, key: usize) {
        let entry = &mut self.connections[key];
        let Session::Serving(state) = &mut entry.session else {
            // Not served yet: nothing of it to answer.
            return self.connection_destroy(key, CloseReason::Shutdown);
        };
        let replies = entry.conn.begin_drain();
        if replies > 0 {
            let pass = Pass {
                replies,
                ..Pass::default()
            };
            self.hooks.on_pass(state, &pass, &entry.conn);
        }
        self.drive(key);
    }

    /// Step 6: during a shutdown, looks at lingering connections and ends
    /// the grace period.
    pub(super) fn step_shutdown(&mut self) {
        let Some(deadline) = self.shutdown else {
            return;
        };
        let lingering: Vec<usize> = self
            .connections
            .iter()
            .filter(|(_, e)| e.conn.phase() == Phase::Lingering)
            .map(|(k, _)| k)
            .collect();
        for key in lingering {
            if let Next::Close(reason) = self.connections[key].conn.linger(&mut self.scratch.read) {
                self.connection_destroy(key, reason);
            }
        }
        if self.connections.is_empty() {
            self.stopped = true;
        } else if self.clock.now >= deadline {
            xps_log!(
                Level::Warning,
                "xps_core_shutdown()",
                "grace period over: closing {} connection(s) with replies unsent",
                self.connections.len()
            );
            let keys: Vec<usize> = self.connections.iter().map(|(k, _)| k).collect();
            for key in keys {
                self.connection_destroy(key, CloseReason::Shutdown);
            }
            self.stopped = true;
        }
    }

    /// When the loop must wake for the shutdown: the next linger tick, or
    /// the end of the grace period.
    pub(super) fn drain_wake(&self) -> Option<Instant> {
        self.shutdown
            .map(|deadline| deadline.min(self.clock.now + LINGER_TICK))
    }
}
