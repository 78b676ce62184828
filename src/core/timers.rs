//! Every deadline a connection has, and the one heap that wakes the loop for
//! them.
//!
//! A connection has an idle deadline (`--idle-timeout`: no byte moved either
//! way), a line deadline (`--line-timeout`: an unterminated line held while
//! reading) and, during a preface such as a PROXY header, the preface's
//! deadline (kept as its idle deadline: nothing moves until it is complete).
//! Activity only moves `last_active`, never the heap, which holds at most one
//! live entry per connection (its earliest deadline); an entry that comes due
//! for a connection active since is pushed again with its real deadline.
//! So a connection costs at most one heap operation per timeout period, and
//! nothing scans every connection. A timerfd ([`LoopTimer`]) armed for the
//! earliest entry wakes the loop, so `epoll_wait` needs no timeout. Times
//! are [`Moment`]s: milliseconds of `CLOCK_MONOTONIC` (since boot), 8 bytes
//! where an `Instant` takes 16, which matters at 10 000 idle connections —
//! and the same clock in every process, so a connection's deadlines move to
//! a new process of an upgrade unchanged ([`TimersSnapshot`]).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use crate::config::Timeouts;
use crate::event_loop::{LoopHandle, LoopTimer};
use crate::network::connection::{Connection, Flow, Pass, Phase};
use crate::network::io::CloseReason;
use crate::utils::logger::Level;
use crate::xps_log;

/// A point in time: milliseconds of `CLOCK_MONOTONIC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Moment(u64);

impl Moment {
    /// `secs` seconds later (`secs` is at least 1 where it is used; the extra
    /// millisecond makes up for the truncation of both ends).
    fn after_secs(self, secs: u32) -> Moment {
        Moment(self.0 + u64::from(secs) * 1000 + 1)
    }

    /// `ms` milliseconds later.
    fn after_ms(self, ms: u64) -> Moment {
        Moment(self.0 + ms)
    }

    /// Milliseconds from `self` until `later` (0 if it has passed).
    fn until(self, later: Moment) -> u64 {
        later.0.saturating_sub(self.0)
    }
}

/// The loop's clock: read once per wake-up, so everything handled in a turn
/// is stamped with the time of the wake-up.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// `CLOCK_MONOTONIC`'s zero (boot): `Moment(0)`.
    epoch: Instant,
    /// The time of the current wake-up.
    pub now: Instant,
    /// The same, as a [`Moment`].
    pub moment: Moment,
}

impl Clock {
    /// The clock, read now.
    pub fn start() -> Clock {
        // `Instant` is CLOCK_MONOTONIC on Linux: read the clock first, so
        // the subtraction stays at or after its zero.
        let since_boot = monotonic();
        let now = Instant::now();
        let epoch = now.checked_sub(since_boot).unwrap_or(now);
        let mut clock = Clock {
            epoch,
            now,
            moment: Moment(0),
        };
        clock.tick();
        clock
    }

    /// Reads the time (once per wake-up).
    pub fn tick(&mut self) {
        self.now = Instant::now();
        self.moment = Moment(self.now.duration_since(self.epoch).as_millis() as u64);
    }

    /// `m` as an `Instant` (for the timerfd).
    fn instant(&self, m: Moment) -> Instant {
        self.epoch + Duration::from_millis(m.0)
    }
}

/// `CLOCK_MONOTONIC` now.
fn monotonic() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// [`Timeouts`] in whole seconds (0 = off), as a connection keeps them: a
/// reload changes them for new connections only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeoutSecs {
    /// `--idle-timeout` (or the preface's deadline).
    idle: u32,
    /// `--line-timeout`.
    line: u32,
}

impl TimeoutSecs {
    /// From the settings.
    pub fn of(t: Timeouts) -> TimeoutSecs {
        let secs =
            |d: Option<Duration>| d.map_or(0, |d| d.as_secs().clamp(1, u32::MAX as u64) as u32);
        TimeoutSecs {
            idle: secs(t.idle),
            line: secs(t.line),
        }
    }

    /// A preface's deadline: `within` from accept, nothing else.
    pub fn preface(within: Duration) -> TimeoutSecs {
        TimeoutSecs::of(Timeouts {
            idle: Some(within),
            line: None,
        })
    }
}

/// How long the current unterminated line has been held while reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineClock {
    /// No unterminated line is held.
    Clear,
    /// A line is held and the clock runs: it times out at `due`.
    Running {
        /// When the line times out if nothing changes.
        due: Moment,
    },
    /// A line is held but reading is paused (flow control, or the caller's
    /// allowance): `left_ms` of the timeout remain.
    Stopped {
        /// What remains of the timeout.
        left_ms: u64,
    },
}

/// What the timers say when a connection's heap entry comes due.
#[derive(Debug)]
pub enum Expiry {
    /// A timeout ran out: close for this reason.
    Expired(CloseReason),
    /// Nothing ran out; its next deadline.
    Next(Moment),
    /// No deadline applies.
    None,
}

/// One connection's clocks.
#[derive(Debug)]
pub struct ConnTimers {
    /// Last time a byte moved (or the slow reader was seen to progress).
    last_active: Moment,
    /// The `--line-timeout` clock.
    line: LineClock,
    /// The deadline this connection has in the heap, if any: an earlier new
    /// one is pushed, a later one waits until this one comes due.
    in_heap: Option<Moment>,
    /// Its timeouts.
    secs: TimeoutSecs,
}

impl ConnTimers {
    /// The clocks of a connection accepted at `now`.
    pub fn new(now: Moment, secs: TimeoutSecs) -> ConnTimers {
        ConnTimers {
            last_active: now,
            line: LineClock::Clear,
            in_heap: None,
            secs,
        }
    }

    /// The first deadline of a new connection, to push into the heap.
    pub fn first_due(&mut self) -> Option<Moment> {
        let due = (self.secs.idle > 0).then(|| self.last_active.after_secs(self.secs.idle));
        self.in_heap = due;
        due
    }

    /// After a pass: activity moves the idle clock; the line clock runs from
    /// the read that left a new unterminated line and stops while the
    /// connection is not being read (flow control, or out of allowance).
    /// Returns a deadline to push when it is earlier than the heap's.
    #[inline]
    pub fn after_pass(
        &mut self,
        now: Moment,
        pass: &Pass,
        conn: &Connection,
        reading: bool,
    ) -> Option<Moment> {
        if pass.received > 0 || pass.sent > 0 {
            self.last_active = now;
        }
        if self.secs.line == 0 {
            return None;
        }
        let open = conn.phase() == Phase::Open;
        if !open || conn.partial_len() == 0 {
            self.line = LineClock::Clear;
            return None;
        }
        if pass.received > 0 && (pass.replies > 0 || self.line == LineClock::Clear) {
            self.line = LineClock::Running {
                due: now.after_secs(self.secs.line),
            };
        }
        let reading = reading && conn.flow() == Flow::Reading;
        self.line = match self.line {
            LineClock::Running { due } if !reading => LineClock::Stopped {
                left_ms: now.until(due),
            },
            LineClock::Stopped { left_ms } if reading => LineClock::Running {
                due: now.after_ms(left_ms),
            },
            same => same,
        };
        match self.line {
            LineClock::Running { due } if self.in_heap.is_none_or(|t| due < t) => {
                self.in_heap = Some(due);
                Some(due)
            }
            _ => None,
        }
    }

    /// Whether `due` is this connection's live heap entry (entries left by
    /// a closed connection whose key was reused, or superseded, are not).
    pub fn is_due(&self, due: Moment) -> bool {
        self.in_heap == Some(due)
    }

    /// Looks at the deadlines at `now`. The idle timeout counts from the
    /// last byte moved — or, for a client with replies pending, from the
    /// last time its kernel send queue was seen to shrink.
    pub fn check(&mut self, now: Moment, conn: &mut Connection) -> Expiry {
        let line_due = match (self.line, conn.phase()) {
            (LineClock::Running { due }, Phase::Open) => Some(due),
            _ => None,
        };
        if line_due.is_some_and(|due| due <= now) {
            return Expiry::Expired(CloseReason::LineTimeout {
                after_secs: self.secs.line,
            });
        }
        let mut idle_due =
            (self.secs.idle > 0).then(|| self.last_active.after_secs(self.secs.idle));
        if let Some(due) = idle_due
            && due <= now
        {
            let pending = conn.pending_len() > 0;
            if pending && conn.reader_progressed() {
                self.last_active = now;
                idle_due = Some(now.after_secs(self.secs.idle));
            } else {
                return Expiry::Expired(CloseReason::IdleTimeout {
                    stalled_writer: pending,
                    after_secs: self.secs.idle,
                });
            }
        }
        let next = [idle_due, line_due].into_iter().flatten().min();
        self.in_heap = next;
        match next {
            Some(t) => Expiry::Next(t),
            None => Expiry::None,
        }
    }
}

/// The deadline heap of one worker and the timerfd that wakes it.
pub struct Timers {
    /// (deadline, slab key), earliest first; an entry counts only while it
    /// equals its connection's `in_heap`.
    heap: BinaryHeap<Reverse<(Moment, usize)>>,
    /// Fires at the earliest deadline (`None` if it could not be armed:
    /// then deadlines shorten the loop's waits instead).
    timer: Option<LoopTimer>,
}

impl Timers {
    /// The heap, with its timerfd attached to the loop under `token`.
    pub fn create(handle: &LoopHandle, token: mio::Token) -> std::io::Result<Timers> {
        Ok(Timers {
            heap: BinaryHeap::new(),
            timer: Some(LoopTimer::create(handle, token)?),
        })
    }

    /// Adds a deadline for the connection at `key`.
    pub fn push(&mut self, due: Moment, key: usize) {
        self.heap.push(Reverse((due, key)));
    }

    /// The timerfd fired: clear it (the deadlines run after the events).
    pub fn fired(&mut self) {
        if let Some(timer) = &mut self.timer {
            timer.fired();
        }
    }

    /// Takes the next entry due at `now`, if any.
    pub fn pop_due(&mut self, now: Moment) -> Option<(Moment, usize)> {
        match self.heap.peek() {
            Some(&Reverse((due, key))) if due <= now => {
                self.heap.pop();
                Some((due, key))
            }
            _ => None,
        }
    }

    /// Arms the timerfd for the earliest deadline.
    pub fn arm(&mut self, clock: &Clock) {
        if let (Some(timer), Some(Reverse((due, _)))) = (&mut self.timer, self.heap.peek())
            && let Err(e) = timer.arm_at(clock.instant(*due), clock.now)
        {
            xps_log!(
                Level::Warning,
                "xps_core_timer()",
                "timerfd_settime() failed ({e}); deadlines now shorten epoll waits"
            );
            self.timer = None;
        }
    }

    /// The earliest deadline, when the timerfd cannot wake the loop for it.
    pub fn unarmed_next(&self, clock: &Clock) -> Option<Instant> {
        match (&self.timer, self.heap.peek()) {
            (None, Some(Reverse((due, _)))) => Some(clock.instant(*due)),
            _ => None,
        }
    }

    /// Keeps the heap within twice the live connections: entries of closed
    /// connections would otherwise pile up under churn. `live` lists each
    /// connection's heap entry.
    pub fn compact(&mut self, open: usize, live: impl Iterator<Item = (Moment, usize)>) {
        if self.heap.len() > 2 * open + 1024 {
            self.heap = live.map(Reverse).collect();
        }
    }
}

impl ConnTimers {
    /// Its live heap entry, for [`Timers::compact`].
    pub fn in_heap(&self) -> Option<Moment> {
        self.in_heap
    }

    /// Its clocks as plain data, to move with the connection (SPEC §7):
    /// absolute moments, valid in any process on this machine.
    pub fn snapshot(&self) -> TimersSnapshot {
        TimersSnapshot {
            idle_secs: self.secs.idle,
            line_secs: self.secs.line,
            last_active_ms: self.last_active.0,
            line: match self.line {
                LineClock::Clear => LineSnapshot::Clear,
                LineClock::Running { due } => LineSnapshot::Running { due_ms: due.0 },
                LineClock::Stopped { left_ms } => LineSnapshot::Stopped { left_ms },
            },
        }
    }

    /// The clocks of a moved connection: its deadlines are the ones it had
    /// (time passed in transit counts). Returns them with the first
    /// deadline to push into the heap.
    pub fn restore(s: &TimersSnapshot) -> (ConnTimers, Option<Moment>) {
        let mut t = ConnTimers {
            last_active: Moment(s.last_active_ms),
            line: match s.line {
                LineSnapshot::Clear => LineClock::Clear,
                LineSnapshot::Running { due_ms } => LineClock::Running {
                    due: Moment(due_ms),
                },
                LineSnapshot::Stopped { left_ms } => LineClock::Stopped { left_ms },
            },
            in_heap: None,
            secs: TimeoutSecs {
                idle: s.idle_secs,
                line: s.line_secs,
            },
        };
        let idle = (t.secs.idle > 0).then(|| t.last_active.after_secs(t.secs.idle));
        let line = match t.line {
            LineClock::Running { due } => Some(due),
            _ => None,
        };
        t.in_heap = [idle, line].into_iter().flatten().min();
        let due = t.in_heap;
        (t, due)
    }
}

/// A connection's clocks as plain data ([`ConnTimers::snapshot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimersSnapshot {
    /// Its `--idle-timeout` (or preface deadline) in seconds; 0 = off.
    pub idle_secs: u32,
    /// Its `--line-timeout` in seconds; 0 = off.
    pub line_secs: u32,
    /// When a byte last moved (`CLOCK_MONOTONIC` ms).
    pub last_active_ms: u64,
    /// The line clock.
    pub line: LineSnapshot,
}

/// The line clock as plain data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineSnapshot {
    /// No unterminated line.
    Clear,
    /// Running: the line times out at `due_ms` (`CLOCK_MONOTONIC` ms).
    Running {
        /// When.
        due_ms: u64,
    },
    /// Stopped (reading paused) with `left_ms` of the timeout left.
    Stopped {
        /// What remains.
        left_ms: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_round_so_a_timeout_is_never_early() {
        let m = Moment(10);
        assert_eq!(m.after_secs(1), Moment(1011));
        assert_eq!(m.until(Moment(5)), 0);
        assert_eq!(m.until(Moment(15)), 5);
    }

    #[test]
    fn the_clock_is_monotonic_time_so_moments_agree_across_processes() {
        let c = Clock::start();
        let boot = monotonic().as_millis() as u64;
        assert!(c.moment.0.abs_diff(boot) <= 5, "{:?} vs {boot}", c.moment);
    }

    #[test]
    fn a_snapshot_restores_the_same_deadlines() {
        let mut t = ConnTimers::new(
            Moment(5_000),
            TimeoutSecs::of(Timeouts {
                idle: Some(Duration::from_secs(3)),
                line: Some(Duration::from_secs(2)),
            }),
        );
        t.line = LineClock::Running { due: Moment(6_500) };
        let (r, due) = ConnTimers::restore(&t.snapshot());
        assert_eq!(due, Some(Moment(6_500)), "the line deadline is the earlier");
        assert_eq!(r.snapshot(), t.snapshot());
        t.line = LineClock::Stopped { left_ms: 700 };
        let (_, due) = ConnTimers::restore(&t.snapshot());
        assert_eq!(due, Some(Moment(8_001)), "idle: 5 s + 3 s (+1 ms rounding)");
    }

    #[test]
    fn timeouts_are_whole_seconds() {
        let t = TimeoutSecs::of(Timeouts {
            idle: Some(Duration::from_millis(300)),
            line: None,
        });
        assert_eq!(t, TimeoutSecs { idle: 1, line: 0 });
    }
}
