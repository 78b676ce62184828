//! `--max-buffered` (SPEC §6): the bytes held for clients (unsent replies
//! and unterminated lines) over all connections of all workers, bounded.
//!
//! A shared counter updated on every read would put a contended cache line
//! on the line path, so each worker keeps its own exact total and
//! [`publish`](BufferBudget::publish)es it once per loop turn into its own
//! padded slot; each turn it takes a [`BudgetView`] (the other workers'
//! totals) and asks it, without atomics, before each read pass. Past the
//! pause mark (¾ of the limit) reads are rationed: each connection may read
//! up to its share, or on to the end of its unterminated line; one holding
//! unsent replies waits until they drain. So a client that reads its
//! replies is always answered, and the total stays under the limit plus a
//! fixed overhead per connection. `docs/admission.md` derives the rule and
//! the bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The per-connection share never falls below this while rationing: a
/// connection holding less is always read (`docs/admission.md`, "The rule").
pub const MIN_SHARE: usize = 64 * 1024;

/// What one connection holds, as "The rule" asks it: its bytes in all, the
/// part of them that is its unterminated line, and its `--max-line` (a
/// reload changes that for new connections only, so each one brings its
/// own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    /// Every byte held for it: unsent replies, its unterminated line, an
    /// incomplete PROXY header.
    pub bytes: usize,
    /// Of which its unterminated line.
    pub line: usize,
    /// The length past which its line is cut into a segment reply.
    pub max_line: usize,
}

/// "The rule" for one connection while rationing, with `share` the share:
/// how many bytes it may read in this pass (0 = paused).
fn ration(share: usize, h: Holding) -> usize {
    if h.bytes < share {
        share - h.bytes
    } else if h.bytes == h.line {
        // Nothing but its line: only reading on can complete it (or cut it,
        // once more than `max_line` bytes are held), so read on that far.
        (h.max_line + 1).saturating_sub(h.line)
    } else {
        0 // replies wait: they must drain first
    }
}

/// SPEC §6's default `--max-buffered`: 256 MiB.
pub const DEFAULT_MAX_BUFFERED: usize = 256 << 20;

/// One worker's published total, alone on its cache-line pair.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Slot(AtomicUsize);

/// The bytes held for clients over all workers, and the read policy when
/// they pass the bound. Shared as an `Arc`; each worker writes only its slot.
#[derive(Debug)]
pub struct BufferBudget {
    /// `--max-buffered`; 0 = no bound.
    limit: AtomicUsize,
    /// Each worker's last published total, indexed by worker number.
    slots: Box<[Slot]>,
}

impl BufferBudget {
    /// A budget of `limit` bytes (0 = off) for `workers` workers, numbered
    /// from 0.
    pub fn new(limit: usize, workers: usize) -> Arc<Self> {
        Arc::new(BufferBudget {
            limit: AtomicUsize::new(limit),
            slots: (0..workers).map(|_| Slot::default()).collect(),
        })
    }

    /// Changes the bound (a reload); applies from each worker's next turn.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// The bound; 0 = off.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Records that `worker` holds `held` bytes. Call once per loop turn; a
    /// worker number out of range is ignored.
    pub fn publish(&self, worker: usize, held: usize) {
        if let Some(slot) = self.slots.get(worker) {
            slot.0.store(held, Ordering::Relaxed);
        }
    }

    /// The sum of the published totals.
    pub fn total(&self) -> usize {
        self.slots.iter().fold(0usize, |sum, s| {
            sum.saturating_add(s.0.load(Ordering::Relaxed))
        })
    }

    /// Whether reads are being rationed: the total is past the pause mark.
    /// Always false when the budget is off.
    #[cfg(test)]
    fn over(&self) -> bool {
        let limit = self.limit();
        limit != 0 && self.total() > pause_mark(limit)
    }

    /// Worker `worker`'s view for one loop turn: the other workers'
    /// published totals and the rule, with `open_connections` open over the
    /// server. The view leaves out the worker's own slot: the worker adds
    /// its own exact, live total at every pass
    /// ([`BudgetView::allowance`]), so its own reads are never one turn
    /// stale — only the other workers' growth during the turn is unseen.
    pub fn view(&self, worker: usize, open_connections: usize) -> BudgetView {
        let limit = self.limit();
        if limit == 0 {
            return BudgetView::OFF;
        }
        let own = self
            .slots
            .get(worker)
            .map_or(0, |s| s.0.load(Ordering::Relaxed));
        BudgetView {
            limit,
            others: self.total().saturating_sub(own),
            share: share(limit, open_connections),
            workers: self.slots.len().max(1),
        }
    }
}

/// One worker's budget for a loop turn (see [`BufferBudget::view`]): plain
/// numbers, so asking it per read pass costs no atomics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetView {
    /// `--max-buffered`; 0 = off.
    limit: usize,
    /// What the other workers published at the start of the turn.
    others: usize,
    /// Each connection's share while rationing ("The rule").
    share: usize,
    /// Workers sharing the budget: each may take this fraction of the room
    /// left under the pause mark in one pass, since none sees the others'
    /// growth until they publish.
    workers: usize,
}

impl BudgetView {
    /// No bound: every allowance is unlimited.
    pub const OFF: BudgetView = BudgetView {
        limit: 0,
        others: 0,
        share: 0,
        workers: 1,
    };

    /// How many bytes a connection holding `held` may read in this pass,
    /// when this worker holds `own` bytes in all (exactly, now): what "The
    /// rule" allows whatever the total (up to its share, or on to the end of
    /// its line: a well-behaved client is never paused), and beyond it only
    /// while the total stays under the pause mark (a worker's part of the
    /// room left there). 0 means "not now": the core looks again when the
    /// total or the connection's holding falls. `usize::MAX` when the
    /// budget is off.
    ///
    /// Capping each `recv()` at this makes `C = 0` and the exact own total
    /// removes this worker's `G` from "The bound": the total stays under
    /// `L + n · F`, plus what the other workers read in one turn.
    pub fn allowance(&self, own: usize, held: Holding) -> usize {
        if self.limit == 0 {
            return usize::MAX;
        }
        let total = self.others.saturating_add(own);
        let mark = pause_mark(self.limit);
        let by_rule = ration(self.share, held);
        match mark.checked_sub(total) {
            Some(room) if room > 0 => (room / self.workers).max(by_rule),
            _ => by_rule,
        }
    }

    /// Whether the budget is off.
    pub fn is_off(&self) -> bool {
        self.limit == 0
    }
}

/// `limit − limit/4`.
fn pause_mark(limit: usize) -> usize {
    limit - limit / 4
}

/// `max(limit / (4·open), MIN_SHARE)`; `open` of 0 counts as 1.
fn share(limit: usize, open: usize) -> usize {
    (limit / 4 / open.max(1)).max(MIN_SHARE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default `--max-line`.
    const M: usize = 100_000;

    /// A connection holding `bytes` of unsent replies and no line.
    fn replies(bytes: usize) -> Holding {
        Holding {
            bytes,
            line: 0,
            max_line: M,
        }
    }

    /// A connection holding nothing but a line of `line` bytes.
    fn line_only(line: usize) -> Holding {
        Holding {
            bytes: line,
            line,
            max_line: M,
        }
    }

    #[test]
    fn a_view_is_unlimited_when_off() {
        let b = BufferBudget::new(0, 2);
        b.publish(1, 1 << 40);
        let v = b.view(0, 10);
        assert!(v.is_off());
        assert_eq!(v.allowance(1 << 40, replies(1 << 30)), usize::MAX);
    }

    #[test]
    fn a_view_counts_the_others_and_lets_the_worker_add_its_own() {
        let limit = 4 << 20; // pause mark 3 MiB
        let b = BufferBudget::new(limit, 2);
        b.publish(0, 123_456); // our own stale slot: ignored by the view
        b.publish(1, 1 << 20);
        let v = b.view(0, 4);
        // share = max(4 MiB / 16, 64 KiB) = 256 KiB.
        // Under the mark: half (two workers) of the room left, or the share.
        assert_eq!(v.allowance(0, replies(0)), (2 << 20) / 2);
        assert_eq!(v.allowance((2 << 20) - 1000, replies(0)), 256 << 10);
        assert_eq!(
            v.allowance((2 << 20) - 1000, replies(200 << 10)),
            (256 - 200) << 10
        );
        // At or past the mark: only the share.
        assert_eq!(v.allowance(2 << 20, replies(10)), (256 << 10) - 10);
        assert_eq!(v.allowance(2 << 20, replies(256 << 10)), 0);
        assert_eq!(v.allowance(usize::MAX, replies(0)), 256 << 10);
    }

    #[test]
    fn a_connection_holding_only_its_line_is_read_to_its_end() {
        // Issue 13: 12 clients with 80 000-byte lines under a 1 MB bound were
        // paused at the 64 KiB share with their LF unread, for good.
        let b = BufferBudget::new(1_000_000, 1);
        b.publish(0, 0);
        let v = b.view(0, 12); // share = max(20 833, 64 KiB) = 64 KiB
        let own = 960_000; // past the pause mark (750 000)
        assert_eq!(v.allowance(own, line_only(80_000)), M + 1 - 80_000);
        // Under the share, the share decides (a second pass reads on).
        assert_eq!(v.allowance(own, line_only(60_000)), MIN_SHARE - 60_000);
        // Whatever the share and the line, such a connection may read
        // enough to complete its line or have it cut (more than M held).
        for n in [1, 12, 1000, 100_000] {
            let v = b.view(0, n);
            for line in [0, 1, MIN_SHARE - 1, MIN_SHARE, 80_000, M - 1, M] {
                let allow = v.allowance(usize::MAX, line_only(line));
                assert!(allow >= 1, "n={n} line={line}");
                assert!(
                    line < MIN_SHARE || allow >= M + 1 - line,
                    "n={n} line={line}: {allow}"
                );
            }
        }
        // With replies waiting it is paused at the share, line or not:
        // its client must read them first.
        let mixed = Holding {
            bytes: 80_001,
            line: 80_000,
            max_line: M,
        };
        assert_eq!(v.allowance(own, mixed), 0);
        assert_eq!(v.allowance(own, replies(MIN_SHARE)), 0);
        // Each connection brings its own --max-line (a reload changes it
        // for new connections only).
        let short = Holding {
            bytes: 70_000,
            line: 70_000,
            max_line: 70_000,
        };
        assert_eq!(v.allowance(own, short), 1);
    }

    /// What a client that never reads makes the server hold, in the
    /// simulations: the protocol's arithmetic, not the protocol.
    #[derive(Debug, Clone, Copy)]
    enum Sends {
        /// Lines of this many bytes before their LF (at most `M`).
        Lines(usize),
        /// Never a LF: the line is cut every `M` bytes.
        NoLf,
    }

    #[derive(Debug, Clone, Copy)]
    struct Client {
        sends: Sends,
        /// The kernel takes every reply (the server holds none): the line
        /// rule's worst case. Otherwise every reply stays held.
        kernel_takes: bool,
        line: usize,
        replies: usize,
    }

    impl Client {
        fn new(sends: Sends, kernel_takes: bool) -> Client {
            Client {
                sends,
                kernel_takes,
                line: 0,
                replies: 0,
            }
        }

        fn holding(&self) -> Holding {
            Holding {
                bytes: self.held(),
                line: self.line,
                max_line: M,
            }
        }

        fn held(&self) -> usize {
            self.line + self.replies
        }

        /// The server reads `k` more bytes.
        fn read(&mut self, k: usize) {
            let total = self.line + k;
            self.line = match self.sends {
                Sends::Lines(len) => total % (len + 1),
                // A segment of M is cut each time more than M are held.
                Sends::NoLf if total > M => total - (total - 1) / M * M,
                Sends::NoLf => total,
            };
            if !self.kernel_takes {
                self.replies += total - self.line;
            }
        }
    }

    /// Every kind of client that never reads, alone and mixed: short
    /// lines, lines just under `--max-line`, no LF at all; replies held or
    /// taken by the kernel. Each mix is named, and says whether all of its
    /// clients hold their replies.
    fn flood_mixes(n: usize) -> Vec<(String, bool, Vec<Client>)> {
        let kinds = [Sends::Lines(61), Sends::Lines(M - 1), Sends::NoLf];
        let mut mixes = Vec::new();
        for kernel_takes in [false, true] {
            for sends in kinds {
                let name = format!("{sends:?}, kernel takes replies: {kernel_takes}");
                mixes.push((
                    name,
                    !kernel_takes,
                    vec![Client::new(sends, kernel_takes); n],
                ));
            }
        }
        let mixed = (0..n)
            .map(|i| Client::new(kinds[i % 3], i % 2 == 0))
            .collect();
        mixes.push(("mixed".to_string(), false, mixed));
        mixes
    }

    /// F of "The bound": the most a rationed connection may hold.
    const F: usize = if MIN_SHARE > M + 1 { MIN_SHARE } else { M + 1 };

    #[test]
    fn simulated_flood_with_views_stays_under_the_tight_bound() {
        // One worker, n clients that never read, each with unlimited data:
        // read passes capped at the allowance and at the read budget, exact
        // own total. The total never passes L + n·F.
        for n in [1usize, 10, 100, 1000] {
            for (mix, held, mut clients) in flood_mixes(n) {
                let limit = 64 << 20;
                let b = BufferBudget::new(limit, 1);
                let mut own = 0usize;
                let mut peak = 0;
                for _turn in 0..200 {
                    let v = b.view(0, n);
                    for c in clients.iter_mut() {
                        let got = v.allowance(own, c.holding()).min(256 << 10);
                        let before = c.held();
                        c.read(got);
                        own = own - before + c.held();
                        peak = peak.max(own);
                    }
                    b.publish(0, own);
                }
                assert!(peak <= limit + n * F, "n={n} {mix}: {peak}");
                if n == 1000 && held {
                    assert!(b.over(), "{mix}: the flood never reached the bound");
                }
            }
        }
    }

    const MIB: usize = 1 << 20;

    #[test]
    fn slots_are_padded() {
        assert_eq!(std::mem::align_of::<Slot>(), 128);
        assert_eq!(std::mem::size_of::<Slot>(), 128);
    }

    #[test]
    fn publish_and_total() {
        let b = BufferBudget::new(100 * MIB, 3);
        assert_eq!(b.total(), 0);
        b.publish(0, 10);
        b.publish(2, 5);
        assert_eq!(b.total(), 15);
        b.publish(0, 1);
        assert_eq!(b.total(), 6, "a publish replaces the worker's last value");
        b.publish(3, 1000); // out of range: ignored, no panic
        assert_eq!(b.total(), 6);
        b.publish(1, usize::MAX);
        assert_eq!(b.total(), usize::MAX, "the sum saturates");
    }

    #[test]
    fn rationing_starts_at_the_pause_mark() {
        // Two workers, 100 MiB: the pause mark is 75 MiB. Worker 1 holds
        // 35 MiB; worker 0's own total decides the rest.
        let b = BufferBudget::new(100 * MIB, 2);
        b.publish(1, 35 * MIB);
        let v = b.view(0, 10); // share = 100 MiB / 40 = 2.5 MiB
        let heavy = replies(10 * MIB);
        assert!(v.allowance(39 * MIB, heavy) > 0, "under the mark: read");
        assert_eq!(v.allowance(40 * MIB, heavy), 0, "at the mark: paused");
        assert!(b.over() || b.total() < pause_mark(b.limit()));
        b.publish(1, 0);
        let v = b.view(0, 10);
        assert!(v.allowance(40 * MIB, heavy) > 0, "the total fell back");
    }

    #[test]
    fn past_the_mark_the_heavy_wait_and_the_light_are_read() {
        let b = BufferBudget::new(100 * MIB, 1);
        let own = 90 * MIB;
        // 100 open: share = max(100 MiB / 400, 64 KiB) = 256 KiB.
        let v = b.view(0, 100);
        assert_eq!(v.allowance(own, replies(0)), 256 * 1024);
        assert_eq!(v.allowance(own, replies(256 * 1024 - 1)), 1);
        assert_eq!(v.allowance(own, replies(256 * 1024)), 0);
        assert_eq!(v.allowance(own, replies(MIB)), 0);
        // 100 000 open: the share floors at 64 KiB; a client holding a
        // short line is read, and so is one holding a long line, to its end.
        let v = b.view(0, 100_000);
        assert_eq!(v.allowance(own, line_only(100)), MIN_SHARE - 100);
        assert_eq!(v.allowance(own, line_only(M)), 1);
        assert_eq!(v.allowance(own, replies(MIN_SHARE)), 0);
        // 0 open counts as 1.
        assert_eq!(b.view(0, 0).allowance(own, replies(0)), 25 * MIB);
        // Under the mark, even a heavy connection is read.
        assert!(b.view(0, 100).allowance(10 * MIB, replies(10 * MIB)) > 0);
    }

    #[test]
    fn the_rule_caps_a_rationed_pass() {
        assert_eq!(ration(1000, replies(0)), 1000);
        assert_eq!(ration(1000, replies(900)), 100);
        assert_eq!(ration(1000, replies(1000)), 0);
        assert_eq!(ration(1000, replies(5000)), 0);
        // A line past the share is read on to its end, no further.
        assert_eq!(ration(1000, line_only(5000)), M + 1 - 5000);
        assert_eq!(ration(1000, line_only(M)), 1);
    }

    #[test]
    fn reload_changes_the_budget() {
        let b = BufferBudget::new(100 * MIB, 1);
        b.publish(0, 80 * MIB);
        assert!(b.over());
        b.set_limit(200 * MIB);
        assert_eq!(b.limit(), 200 * MIB);
        assert!(!b.over());
        b.set_limit(0);
        assert!(!b.over());
        assert!(b.view(0, 1).is_off());
    }

    /// A simulation of "The bound" with the stale views it is about: `w`
    /// workers, each driving its share of `n` clients that never read once
    /// per turn, each read capped at the allowance of a view taken at the
    /// start of the turn (the others' totals as last published), each
    /// worker publishing at the end of the turn. The total never passes
    /// `L + n·(G + C + F)`.
    #[test]
    fn simulated_flood_over_workers_stays_under_the_bound() {
        const G: usize = 320 * 1024;
        const C: usize = 64 * 1024;
        for w in [1usize, 2, 4] {
            for n in [4usize, 100, 1000] {
                for (mix, held, mut clients) in flood_mixes(n) {
                    let limit = 64 * MIB;
                    let b = BufferBudget::new(limit, w);
                    let bound = limit + n * (G + C + F);
                    let mut own = vec![0usize; w];
                    let mut peak = 0;
                    for _ in 0..200 {
                        let views: Vec<BudgetView> = (0..w).map(|k| b.view(k, n)).collect();
                        for (i, c) in clients.iter_mut().enumerate() {
                            let k = i % w;
                            let got = views[k].allowance(own[k], c.holding()).min(G);
                            let before = c.held();
                            c.read(got);
                            own[k] = own[k] - before + c.held();
                        }
                        peak = peak.max(own.iter().sum());
                        for (k, total) in own.iter().enumerate() {
                            b.publish(k, *total);
                        }
                    }
                    assert!(
                        peak <= bound,
                        "w={w} n={n} {mix}: peak {peak} > bound {bound}"
                    );
                    if n == 1000 && held {
                        assert!(b.over(), "{mix}: the flood never reached the bound");
                    }
                }
            }
        }
    }
}
