//! Process-level helpers: the file-descriptor limit and the server's CPU time
//! and memory as the kernel reports them in /proc.

use std::fs;

/// Raises RLIMIT_NOFILE's soft limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return r.rlim_max;
            }
        }
        r.rlim_cur
    }
}

/// Clock ticks per second (the unit of utime/stime in /proc/PID/stat).
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// (utime, stime) of process `pid`, all threads, in clock ticks.
pub fn proc_cpu(pid: u32) -> Option<(u64, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: fields restart after ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// On-CPU time of every thread of process `pid`, in nanoseconds, from
/// /proc/PID/task/*/schedstat (exact, unlike the tick-sampled utime/stime).
pub fn sched_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for t in fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(t) = t else { continue };
        if let Ok(s) = fs::read_to_string(t.path().join("schedstat"))
            && let Some(v) = s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        {
            total += v;
        }
    }
    Some(total)
}

/// VmRSS of process `pid` in kB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time of the server over a measured window.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuWindow {
    pub utime_s: f64,
    pub stime_s: f64,
    /// Exact on-CPU time (schedstat), when the kernel provides it.
    pub sched_s: Option<f64>,
}

/// Samples the server's CPU clock at the start of a window and reports the
/// difference at its end. Without a PID it measures nothing.
pub struct CpuMeter {
    pid: Option<u32>,
    start: Option<(u64, u64)>,
    start_ns: Option<u64>,
}

impl CpuMeter {
    pub fn new(pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            pid,
            start: None,
            start_ns: None,
        }
    }

    pub fn start(&mut self) {
        self.start = self.pid.and_then(proc_cpu);
        self.start_ns = self.pid.and_then(sched_ns);
    }

    pub fn stop(&self) -> Option<CpuWindow> {
        let (u0, s0) = self.start?;
        let (u1, s1) = proc_cpu(self.pid?)?;
        let ns1 = sched_ns(self.pid?);
        let hz = clk_tck();
        Some(CpuWindow {
            utime_s: u1.saturating_sub(u0) as f64 / hz,
            stime_s: s1.saturating_sub(s0) as f64 / hz,
            sched_s: match (self.start_ns, ns1) {
                (Some(a), Some(b)) if b > 0 => Some(b.saturating_sub(a) as f64 / 1e9),
                _ => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(proc_cpu(me).is_some());
        assert!(rss_kb(me).unwrap() > 0);
        assert!(sched_ns(me).is_some());
        assert!(raise_nofile() > 0);
    }
}
