//! Fairness: the connections a worker drives again without a new edge, and
//! the rule that each connection gets at most one pass per turn (one read
//! budget, one allowance), however it became ready.
//!
//! Edge-triggered readiness is reported once, so a connection that stopped
//! reading with data left must be remembered: one that spent its read
//! budget or resumed after a flow-control pause is queued for the next turn
//! ([`Queue::again`]; the loop does not sleep while one waits), and its
//! edges are ignored while it is queued; one the hooks' allowance stopped
//! (`--max-buffered`) waits until the allowance grows ([`Queue::hold`]),
//! looked at every [`HOLD_TICK`], and is not retried in a turn that already
//! drove it. So a connection that gets an edge every turn still reads one
//! budget per turn and cannot make the others wait behind copies of it.

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
    /// Queued in this turn, to be driven in the next.
    again: Vec<(usize, u64)>,
    /// Queued in the last turn, driven in this one (step 2).
    due: Vec<(usize, u64)>,
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

    /// A new turn: what was queued in the last one is due now.
    pub fn turn(&mut self) {
        debug_assert!(self.due.is_empty());
        std::mem::swap(&mut self.again, &mut self.due);
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
    /// Step 2: drives the connections queued in the last turn (their edges
    /// in this one were ignored, so this is their one pass of the turn).
    pub(super) fn run_again(&mut self) {
        let mut batch = std::mem::take(&mut self.queue.due);
        for &(key, id) in &batch {
            if let Some(entry) = self.connections.get_mut(key)
                && entry.conn.id == id
            {
                entry.queued = false;
                self.drive(key);
            }
        }
        batch.clear();
        self.queue.due = batch; // its capacity, for the next turn
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
            // Driven already in this turn (an edge), or not allowed yet:
            // look again later.
            if entry.turn == self.turn || self.hooks.allowance(state, &entry.conn) == 0 {
                self.queue.held.push((key, id));
                continue;
            }
            entry.held = false;
            if !entry.queued {
                self.drive(key); // a pass stopped again holds it again
            }
        }
    }
}
