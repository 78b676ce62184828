//! Fairness: the connections a worker drives again without a new edge.
//!
//! Edge-triggered readiness is reported once, so a connection that stopped
//! reading with data left must be remembered: one that spent its read
//! budget or resumed after a flow-control pause is driven again once every
//! other event of the wake-up had its pass ([`Queue::again`], step 2 of
//! `after_events`; the loop does not sleep while one waits); one the hooks'
//! allowance stopped (`--max-buffered`) is driven again once the allowance
//! grows ([`Queue::hold`]), looked at every [`HOLD_TICK`]. Each connection
//! is in each queue at most once, and its edges are ignored while queued,
//! so one that gets an edge every turn still reads one budget per turn and
//! cannot make the others wait behind copies of it.

use std::time::{Duration, Instant};

use crate::core::Core;
use crate::core::hooks::Hooks;
use crate::core::session::{Entry, Session};

/// While connections wait for a larger allowance, how often to look again
/// (the other workers' totals raise no event).
pub const HOLD_TICK: Duration = Duration::from_millis(10);

/// The two queues: (slab key, connection id) pairs, so a key reused by a
/// new connection is not mistaken for the old one.
#[derive(Debug, Default)]
pub struct Queue {
    /// Driven again next turn.
    again: Vec<(usize, u64)>,
    /// The other half of `again`'s double buffer (no allocation per turn).
    spare: Vec<(usize, u64)>,
    /// Waiting for a larger allowance.
    held: Vec<(usize, u64)>,
}

impl Queue {
    /// Queues `entry` for the next turn, unless it is queued already.
    pub fn again<H: Hooks>(&mut self, key: usize, entry: &mut Entry<H>) {
        if !entry.queued {
            entry.queued = true;
            self.again.push((key, entry.conn.id));
        }
    }

    /// Queues `entry` until its allowance grows, unless it waits already.
    pub fn hold<H: Hooks>(&mut self, key: usize, entry: &mut Entry<H>) {
        if !entry.held {
            entry.held = true;
            self.held.push((key, entry.conn.id));
        }
    }

    /// When the loop must wake for these queues: now, if work waits for the
    /// next turn; soon, if connections wait for their allowance.
    pub fn wake(&self, now: Instant) -> Option<Instant> {
        if !self.again.is_empty() {
            Some(now)
        } else if !self.held.is_empty() {
            Some(now + HOLD_TICK)
        } else {
            None
        }
    }
}

impl<H: Hooks> Core<H> {
    /// Step 2: drives the connections queued since the last step 2: by this
    /// wake-up's events (after every other event had its pass), or by the
    /// last step 2 itself.
    pub(super) fn run_again(&mut self) {
        let mut batch = std::mem::take(&mut self.queue.spare);
        std::mem::swap(&mut batch, &mut self.queue.again);
        for &(key, id) in &batch {
            if let Some(entry) = self.connections.get_mut(key)
                && entry.conn.id == id
            {
                entry.queued = false;
                self.drive(key);
            }
        }
        batch.clear();
        self.queue.spare = batch;
    }

    /// Step 3: drives the connections waiting for a larger allowance, once
    /// the hooks allow them; the others stay queued.
    pub(super) fn retry_held(&mut self) {
        if self.queue.held.is_empty() {
            return;
        }
        for (key, id) in std::mem::take(&mut self.queue.held) {
            let Some(entry) = self.connections.get_mut(key).filter(|e| e.conn.id == id) else {
                continue; // closed since
            };
            let Session::Serving(state) = &entry.session else {
                continue;
            };
            if self.hooks.allowance(state, &entry.conn) == 0 {
                self.queue.held.push((key, id)); // not yet
                continue;
            }
            entry.held = false;
            if !entry.queued {
                self.drive(key); // a pass stopped again queues it again
            }
        }
    }
}
