//! `--max-connections-per-source` (SPEC §6), systemd's
//! `MaxConnectionsPerSource`: at most N open connections per source over
//! all workers, IPv4 by address and IPv6 by /64. One table behind one mutex,
//! taken at accept and at close, never per line; a connection owns its
//! [`SourcePermit`], whose drop uncounts it, so no path leaks a count. An
//! entry leaves the table at zero, so a scan over millions of addresses
//! leaves nothing behind; limit 0 takes no lock at all.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::policy::Refusal;

/// What the per-source limit counts by: an IPv4 address, or the /64 an IPv6
/// address belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    /// An IPv4 source (including IPv4-mapped IPv6).
    V4(Ipv4Addr),
    /// The first 64 bits of an IPv6 source.
    V6Prefix(u64),
}

impl SourceKey {
    /// The key `ip` is counted under.
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => SourceKey::V4(v4),
            IpAddr::V6(v6) => SourceKey::V6Prefix((v6.to_bits() >> 64) as u64),
        }
    }
}

impl fmt::Display for SourceKey {
    /// `10.1.2.3` or `2001:db8:1:2::/64`, for DEBUG lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceKey::V4(v4) => write!(f, "{v4}"),
            SourceKey::V6Prefix(p) => {
                write!(f, "{}/64", Ipv6Addr::from_bits(u128::from(*p) << 64))
            }
        }
    }
}

/// Open connections per source over all workers, shared as an `Arc`.
#[derive(Debug)]
pub struct SourceLimits {
    /// Connections allowed per source; 0 = no limit. Read without the lock.
    limit: AtomicUsize,
    /// Open connections per key; never holds a zero count.
    counts: Mutex<HashMap<SourceKey, usize>>,
}

impl SourceLimits {
    /// A table allowing `limit` connections per source (0 = no limit).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(SourceLimits {
            limit: AtomicUsize::new(limit),
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// The limit for connections accepted from now on (a reload).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// The current limit; 0 = none.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Counts one more connection from `ip`, or refuses it when its source
    /// already holds `limit`. With limit 0 no lock is taken and the permit
    /// does nothing.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<SourcePermit, Refusal> {
        let limit = self.limit();
        if limit == 0 {
            return Ok(SourcePermit { held: None });
        }
        let key = SourceKey::of(ip);
        let mut counts = self.lock();
        // A fresh entry starts at 0 and, as `limit ≥ 1`, is always counted
        // up to 1 here: no zero entry survives the lock.
        let count = counts.entry(key).or_insert(0);
        if *count >= limit {
            return Err(Refusal::PerSourceLimit);
        }
        *count += 1;
        Ok(SourcePermit {
            held: Some((Arc::clone(self), key)),
        })
    }

    /// Counts one more connection from `ip` even past the limit: a
    /// connection that moved from another process (an upgrade) is
    /// connected already; new ones wait until its source is below the
    /// limit again.
    pub fn acquire_forced(self: &Arc<Self>, ip: IpAddr) -> SourcePermit {
        if self.limit() == 0 {
            return SourcePermit { held: None };
        }
        let key = SourceKey::of(ip);
        *self.lock().entry(key).or_insert(0) += 1;
        SourcePermit {
            held: Some((Arc::clone(self), key)),
        }
    }

    /// Open connections counted for `ip`'s source (0 when untracked).
    pub fn count(&self, ip: IpAddr) -> usize {
        self.lock().get(&SourceKey::of(ip)).copied().unwrap_or(0)
    }

    /// Entries in the table: sources with at least one counted connection.
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    /// The table. No code panics while holding it, but a poisoned lock would
    /// still hold consistent counts, so it is used rather than propagated.
    fn lock(&self) -> MutexGuard<'_, HashMap<SourceKey, usize>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Uncounts one connection of `key`, removing the entry at 0.
    fn release(&self, key: &SourceKey) {
        let mut counts = self.lock();
        if let Some(count) = counts.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(key);
            }
        }
    }
}

/// One counted connection; dropping it uncounts it. Owned by the connection,
/// so every way a connection ends releases its count exactly once.
#[must_use = "dropping the permit releases the connection's count at once"]
#[derive(Debug)]
pub struct SourcePermit {
    /// The table and key to release, or `None` for a permit taken at limit 0.
    held: Option<(Arc<SourceLimits>, SourceKey)>,
}

impl SourcePermit {
    /// The key this permit counts under, if it counts at all.
    pub fn key(&self) -> Option<SourceKey> {
        self.held.as_ref().map(|(_, k)| *k)
    }
}

impl Drop for SourcePermit {
    fn drop(&mut self) {
        if let Some((limits, key)) = self.held.take() {
            limits.release(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn limit_reached_and_released_on_drop() {
        let limits = SourceLimits::new(2);
        let a = limits.try_acquire(ip("10.0.0.1")).unwrap();
        let b = limits.try_acquire(ip("10.0.0.1")).unwrap();
        assert_eq!(
            limits.try_acquire(ip("10.0.0.1")).unwrap_err(),
            Refusal::PerSourceLimit
        );
        // Another source is counted apart.
        let c = limits.try_acquire(ip("10.0.0.2")).unwrap();
        assert_eq!(limits.count(ip("10.0.0.1")), 2);
        assert_eq!(limits.tracked(), 2);
        drop(a);
        assert_eq!(limits.count(ip("10.0.0.1")), 1);
        let a2 = limits.try_acquire(ip("10.0.0.1")).unwrap();
        drop((a2, b, c));
        assert_eq!(limits.tracked(), 0, "the table empties back to nothing");
        assert_eq!(limits.count(ip("10.0.0.1")), 0);
    }

    #[test]
    fn ipv6_is_grouped_by_64() {
        let limits = SourceLimits::new(2);
        let _a = limits.try_acquire(ip("2001:db8:1:2::1")).unwrap();
        let _b = limits
            .try_acquire(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
            .unwrap();
        assert_eq!(
            limits.try_acquire(ip("2001:db8:1:2:abcd::9")).unwrap_err(),
            Refusal::PerSourceLimit
        );
        // The neighbouring /64 is another source.
        let _c = limits.try_acquire(ip("2001:db8:1:3::1")).unwrap();
        assert_eq!(limits.tracked(), 2);
        assert_eq!(
            SourceKey::of(ip("2001:db8:1:2::1")).to_string(),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn mapped_ipv6_counts_as_ipv4() {
        let limits = SourceLimits::new(1);
        let _a = limits.try_acquire(ip("10.0.0.1")).unwrap();
        assert_eq!(
            limits.try_acquire(ip("::ffff:10.0.0.1")).unwrap_err(),
            Refusal::PerSourceLimit
        );
        assert_eq!(SourceKey::of(ip("::ffff:10.0.0.1")).to_string(), "10.0.0.1");
    }

    #[test]
    fn limit_zero_takes_no_count() {
        let limits = SourceLimits::new(0);
        let permits: Vec<_> = (0..100)
            .map(|_| limits.try_acquire(ip("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(limits.tracked(), 0);
        assert!(permits.iter().all(|p| p.key().is_none()));
    }

    #[test]
    fn reload_changes_the_limit_for_new_connections() {
        let limits = SourceLimits::new(3);
        let held: Vec<_> = (0..3)
            .map(|_| limits.try_acquire(ip("10.0.0.1")).unwrap())
            .collect();
        limits.set_limit(1);
        assert_eq!(limits.limit(), 1);
        assert!(limits.try_acquire(ip("10.0.0.1")).is_err());
        assert_eq!(limits.count(ip("10.0.0.1")), 3, "nobody is closed");
        drop(held);
        assert_eq!(limits.tracked(), 0);
        // Permits taken at limit 0 stay uncounted after raising it.
        limits.set_limit(0);
        let free = limits.try_acquire(ip("10.0.0.1")).unwrap();
        limits.set_limit(1);
        let counted = limits.try_acquire(ip("10.0.0.1")).unwrap();
        drop(free);
        assert_eq!(limits.count(ip("10.0.0.1")), 1);
        drop(counted);
        assert_eq!(limits.tracked(), 0);
    }

    #[test]
    fn two_threads_acquire_and_release_back_to_zero() {
        let limits = SourceLimits::new(3);
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let limits = Arc::clone(&limits);
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    let mut refused = 0usize;
                    for i in 0..20_000usize {
                        let addr = if i % 3 == 0 {
                            "10.0.0.1"
                        } else {
                            "2001:db8::1"
                        };
                        match limits.try_acquire(ip(addr)) {
                            Ok(p) => held.push(p),
                            Err(_) => refused += 1,
                        }
                        if (i + t) % 2 == 0 {
                            drop(held.pop());
                        }
                        if held.len() > 4 {
                            drop(held.remove(0));
                        }
                        assert!(limits.count(ip(addr)) <= 3);
                    }
                    refused
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(limits.tracked(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Acquire(usize),
        Drop(usize),
    }

    const POOL: [&str; 5] = [
        "10.0.0.1",
        "::ffff:10.0.0.1",
        "10.0.0.2",
        "2001:db8::1",
        "2001:db8::2",
    ];

    proptest! {
        #[test]
        fn counts_match_live_permits(
            limit in 0usize..4,
            ops in proptest::collection::vec(
                prop_oneof![
                    (0..POOL.len()).prop_map(Op::Acquire),
                    any::<usize>().prop_map(Op::Drop),
                ],
                0..200,
            ),
        ) {
            let limits = SourceLimits::new(limit);
            let mut live: Vec<SourcePermit> = Vec::new();
            for op in ops {
                match op {
                    Op::Acquire(i) => {
                        let addr = ip(POOL[i]);
                        let before = limits.count(addr);
                        match limits.try_acquire(addr) {
                            Ok(p) => {
                                prop_assert!(limit == 0 || before < limit);
                                live.push(p);
                            }
                            Err(r) => {
                                prop_assert_eq!(r, Refusal::PerSourceLimit);
                                prop_assert!(limit != 0 && before >= limit);
                            }
                        }
                    }
                    Op::Drop(i) => {
                        if !live.is_empty() {
                            let i = i % live.len();
                            drop(live.swap_remove(i));
                        }
                    }
                }
                // The table is exactly the live permits, and never a zero.
                let mut want: HashMap<SourceKey, usize> = HashMap::new();
                for k in live.iter().filter_map(SourcePermit::key) {
                    *want.entry(k).or_insert(0) += 1;
                }
                let table = limits.lock().clone();
                prop_assert!(table.values().all(|&c| c > 0));
                prop_assert_eq!(table, want);
            }
            drop(live);
            prop_assert_eq!(limits.tracked(), 0);
        }
    }
}
