//! The workers' counters summed into plain numbers, for `/api` and the
//! status page (the exposition writes the same sums as text).

use std::collections::BTreeMap;

use super::counters::{Metrics, WorkerBlock};
use crate::network::io::CloseReason;
use crate::policy::Refusal;

/// Every count, summed over the workers at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// Accepted, by listener address (as `xps_connections_accepted_total`).
    pub accepted_by_listener: BTreeMap<Box<str>, u64>,
    /// Accepted and not yet closed or refused.
    pub open: u64,
    /// Served connections that ended, by [`CloseReason::index`].
    pub closed: [u64; CloseReason::LABELS.len()],
    /// Refused connections, by [`Refusal::index`].
    pub refused: [u64; Refusal::LABELS.len()],
    /// Failed `accept()` calls, every kind.
    pub accept_errors: u64,
    /// Replies sent.
    pub lines: u64,
    /// Bytes read from clients.
    pub received: u64,
    /// Bytes written to clients.
    pub sent: u64,
    /// Connections holding bytes (an unterminated line or unsent replies).
    pub holding: u64,
}

impl Totals {
    /// Connections accepted, over every listener.
    pub fn accepted(&self) -> u64 {
        self.accepted_by_listener.values().sum()
    }

    /// Served connections that ended for `label` (a [`CloseReason`] label).
    pub fn closed(&self, label: &str) -> u64 {
        CloseReason::LABELS
            .iter()
            .position(|l| *l == label)
            .map_or(0, |i| self.closed[i])
    }
}

impl Metrics {
    /// The counters summed over the workers (a few relaxed loads each; the
    /// workers are not disturbed).
    pub fn totals(&self) -> Totals {
        let sum = |f: &dyn Fn(&WorkerBlock) -> u64| -> u64 {
            self.workers.iter().fold(0u64, |a, b| a.wrapping_add(f(b)))
        };
        let mut accepted_by_listener = BTreeMap::new();
        {
            let entries = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
            for e in entries.iter() {
                let c: &mut u64 = accepted_by_listener.entry(e.addr.clone()).or_insert(0);
                *c = c.wrapping_add(e.cell.accepted.get());
            }
        }
        let mut t = Totals {
            accepted_by_listener,
            open: sum(&|b| b.open.get()),
            closed: std::array::from_fn(|i| sum(&|b| b.closed[i].get())),
            refused: std::array::from_fn(|i| sum(&|b| b.refused[i].get())),
            accept_errors: sum(&|b| b.accept_errors.iter().map(|c| c.get()).sum()),
            lines: sum(&|b| b.lines.get()),
            received: sum(&|b| b.received.get()),
            sent: sum(&|b| b.sent.get()),
            holding: sum(&|b| b.holding.get()),
        };
        self.add_carried_totals(&mut t);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_the_workers() {
        let m = Metrics::new(2);
        let (a, b) = (m.take_worker(0).unwrap(), m.take_worker(1).unwrap());
        let (la, lb) = (m.listener("a:1"), m.listener("a:1"));
        a.accepted(&la);
        b.accepted(&lb);
        b.accepted(&lb);
        a.lines(3);
        b.lines(4);
        a.received(10);
        b.sent(7);
        a.closed(&CloseReason::Finished);
        b.refused(Refusal::Denied);
        b.holding(1);
        let t = m.totals();
        assert_eq!(t.accepted(), 3);
        assert_eq!(t.open, 1);
        assert_eq!(t.closed("finished"), 1);
        assert_eq!(t.refused, [1, 0, 0]);
        assert_eq!((t.lines, t.received, t.sent, t.holding), (7, 10, 7, 1));
    }
}
