//! The `--max-connections` slots, held by guards.
//!
//! Every connection of every worker holds one [`Slot`]; the count of slots
//! taken is one atomic shared by the workers. A slot is taken *before*
//! `accept()` (at the cap, connections stay in the kernel's backlog instead of
//! being accepted and dropped) and given back when the [`Slot`] is dropped —
//! with the connection that holds it, on every path: an ordinary close, an
//! accept or attach that failed, the end of the shutdown grace period, or a
//! worker thread unwinding from a panic. No site counts by hand, so no path
//! can leak a slot or free one twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The slots of one server, shared by its workers.
#[derive(Debug)]
pub struct Slots {
    /// Slots taken, over all workers.
    taken: AtomicUsize,
    /// `--max-connections` (a reload may change it; connections above a
    /// lowered cap are not closed, new ones wait).
    max: AtomicUsize,
}

/// One taken slot; dropping it gives the slot back.
#[derive(Debug)]
pub struct Slot {
    /// Where to give it back.
    slots: Arc<Slots>,
}

impl Slots {
    /// `max` slots, none taken.
    pub fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            taken: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        })
    }

    /// Takes a slot if one is free.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let mut taken = self.taken.load(Ordering::Relaxed);
        let max = self.max.load(Ordering::Relaxed);
        loop {
            if taken >= max {
                return None;
            }
            match self.taken.compare_exchange_weak(
                taken,
                taken + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(Slot {
                        slots: self.clone(),
                    });
                }
                Err(now) => taken = now,
            }
        }
    }

    /// Takes a slot even past the cap: a connection that moved from another
    /// process (an upgrade) is connected already; accepting waits until
    /// the count is below the cap again.
    pub fn acquire_forced(self: &Arc<Self>) -> Slot {
        self.taken.fetch_add(1, Ordering::Relaxed);
        Slot {
            slots: self.clone(),
        }
    }

    /// Whether every slot is taken.
    pub fn full(&self) -> bool {
        self.taken() >= self.max.load(Ordering::Relaxed)
    }

    /// Changes the cap (reload).
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Slots taken now, over all workers.
    pub fn taken(&self) -> usize {
        self.taken.load(Ordering::Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.taken.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_given_back_on_drop_and_on_unwind() {
        let slots = Slots::new(2);
        let a = slots.try_acquire().unwrap();
        let b = slots.try_acquire().unwrap();
        assert!(slots.try_acquire().is_none());
        assert!(slots.full());
        drop(a);
        assert_eq!(slots.taken(), 1);
        let s = slots.clone();
        let r = std::thread::spawn(move || {
            let _held = s.try_acquire().unwrap();
            panic!("a worker dies holding a slot");
        })
        .join();
        assert!(r.is_err());
        assert_eq!(slots.taken(), 1, "the panicking thread's slot came back");
        drop(b);
        assert_eq!(slots.taken(), 0);
    }
}
