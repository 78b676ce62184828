//! `GET /api`: one JSON object in the shape eXpServer's metrics dashboard
//! (`eXpServer/expserver-metrics`) reads, so that dashboard works unchanged
//! against xps (SPEC §8). Built from the metrics registry and `/proc`, with
//! no round trip to the workers. What each field means, and the choices
//! where eXpServer's meaning has no twin in xps: `docs/status-page.md`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::observe::metrics::{self, Metrics, Totals};

/// The dashboard's object: exactly these keys, in this order. Every count is
/// a JSON integer (the dashboard shows a non-integer as 0), every percent a
/// finite number, `workers_cpu_usage_percent` one number per worker.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Dashboard {
    pub server_name: String,
    pub pid: u32,
    pub workers: u64,
    pub uptime_msec: u64,
    pub conn_current: u64,
    pub conn_accepted: u64,
    pub conn_error: u64,
    pub conn_timeout: u64,
    pub conn_accepted_error: u64,
    pub req_current: u64,
    pub req_total: u64,
    pub req_file_serve: u64,
    pub req_reverse_proxy: u64,
    pub req_redirect: u64,
    pub res_avg_res_time_msec: u64,
    pub res_peak_res_time_msec: u64,
    pub res_code_2xx: u64,
    pub res_code_3xx: u64,
    pub res_code_4xx: u64,
    pub res_code_5xx: u64,
    pub traffic_total_send_bytes: u64,
    pub traffic_total_recv_bytes: u64,
    pub workers_cpu_usage_percent: Vec<f64>,
    pub workers_ram_usage_bytes: u64,
    pub sys_cpu_usage_percent: f64,
    pub sys_ram_usage_bytes: u64,
    pub sys_ram_total_bytes: u64,
    pub server_cpu_usage_time_msec: u64,
    pub server_ram_usage_bytes: u64,
}

/// CPU percentages: each worker thread's (of one core) and the machine's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// By worker index, in percent of one core, 0..=100.
    pub workers: Vec<f64>,
    /// The whole machine, 0..=100.
    pub system: f64,
}

/// CPU counters read at one moment.
#[derive(Debug, Clone)]
struct Reading {
    at: Instant,
    /// Each worker thread's CPU time in clock ticks (0 if not found).
    workers: Vec<u64>,
    /// `/proc/stat`'s `cpu` line: (all ticks, idle + iowait ticks).
    system: (u64, u64),
}

/// Turns CPU counters into percentages over a window of at least
/// [`Sampler::WINDOW`], read lazily when `/api` is asked: no timer, and two
/// clients polling at different rates see the same numbers.
#[derive(Debug)]
pub struct Sampler {
    /// Worker threads.
    workers: usize,
    /// The last reading and what it gave.
    last: Mutex<Option<(Reading, Usage)>>,
    /// When the process started (the first window starts there).
    started: Instant,
}

impl Sampler {
    /// The shortest window a percentage is computed over.
    pub const WINDOW: Duration = Duration::from_secs(1);

    /// A sampler for `workers` worker threads (named `xps-worker-N`).
    pub fn new(workers: usize, started: Instant) -> Sampler {
        Sampler {
            workers,
            last: Mutex::new(None),
            started,
        }
    }

    /// The percentages over the last window: the cached ones if the last
    /// reading is younger than [`Self::WINDOW`]. The first call averages
    /// since the process started (workers) and since boot (the machine).
    pub fn usage(&self) -> Usage {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some((r, usage)) = &*last
            && now.duration_since(r.at) < Self::WINDOW
        {
            return usage.clone();
        }
        let reading = read(self.workers, now);
        let base = match &*last {
            Some((r, _)) => r.clone(),
            None => Reading {
                at: self.started,
                workers: vec![0; self.workers],
                system: (0, 0),
            },
        };
        let usage = usage_between(&base, &reading, metrics::ticks_per_second().unwrap_or(100));
        *last = Some((reading, usage.clone()));
        usage
    }
}

/// The percentages between two readings.
fn usage_between(a: &Reading, b: &Reading, ticks_per_second: u64) -> Usage {
    let secs = b.at.saturating_duration_since(a.at).as_secs_f64();
    let core = |t0: u64, t1: u64| {
        let ticks = t1.saturating_sub(t0) as f64;
        let p = if secs > 0.0 {
            100.0 * ticks / (ticks_per_second as f64 * secs)
        } else {
            0.0
        };
        round2(p.clamp(0.0, 100.0))
    };
    let total = b.system.0.saturating_sub(a.system.0);
    let idle = b.system.1.saturating_sub(a.system.1);
    let system = if total > 0 {
        round2((100.0 * total.saturating_sub(idle) as f64 / total as f64).clamp(0.0, 100.0))
    } else {
        0.0
    };
    Usage {
        workers: a
            .workers
            .iter()
            .zip(&b.workers)
            .map(|(&t0, &t1)| core(t0, t1))
            .collect(),
        system,
    }
}

/// Two decimals are all a dashboard shows.
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Reads every worker thread's CPU time (found by its name in
/// `/proc/self/task/*/comm`, without touching the workers) and the
/// machine's.
fn read(workers: usize, at: Instant) -> Reading {
    let mut ticks = vec![0; workers];
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let dir = task.path();
            let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
                continue;
            };
            let Some(i) = worker_index(&comm).filter(|&i| i < workers) else {
                continue;
            };
            if let Some(t) = std::fs::read_to_string(dir.join("stat"))
                .ok()
                .and_then(|s| metrics::cpu_ticks(&s))
            {
                ticks[i] = t;
            }
        }
    }
    let system = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| parse_cpu_line(&s))
        .unwrap_or((0, 0));
    Reading {
        at,
        workers: ticks,
        system,
    }
}

/// `xps-worker-3\n` → 3 (the name `server` gives worker threads).
fn worker_index(comm: &str) -> Option<usize> {
    comm.trim_end().strip_prefix("xps-worker-")?.parse().ok()
}

/// The `cpu` line of `/proc/stat`: (every tick, idle + iowait ticks).
fn parse_cpu_line(s: &str) -> Option<(u64, u64)> {
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is
    // already inside user and nice).
    let total = f.iter().take(8).sum();
    let idle = f.get(3)? + f.get(4).copied().unwrap_or(0);
    Some((total, idle))
}

/// `/proc/meminfo`: (MemTotal, MemTotal − MemAvailable) in bytes.
fn parse_meminfo(s: &str) -> Option<(u64, u64)> {
    let kib = |key: &str| -> Option<u64> {
        s.lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_ascii_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let total = kib("MemTotal:")?;
    let available = kib("MemAvailable:")?;
    Some((total * 1024, total.saturating_sub(available) * 1024))
}

/// `/api` from the registry's totals and the sampler.
pub fn dashboard(metrics: &Metrics, sampler: &Sampler, uptime: Duration) -> Dashboard {
    let t = metrics.totals();
    let usage = sampler.usage();
    let (ram_total, ram_used) = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| parse_meminfo(&s))
        .unwrap_or((0, 0));
    let rss = metrics::resident_bytes().unwrap_or(0);
    let cpu_msec = metrics::process_cpu_msec().unwrap_or(0);
    from_parts(
        &t,
        metrics.workers(),
        uptime,
        usage,
        (ram_total, ram_used),
        rss,
        cpu_msec,
    )
}

/// The dashboard's fields from their sources (pure, unit-tested).
fn from_parts(
    t: &Totals,
    workers: usize,
    uptime: Duration,
    usage: Usage,
    (ram_total, ram_used): (u64, u64),
    rss: u64,
    cpu_msec: u64,
) -> Dashboard {
    Dashboard {
        server_name: format!("xps/{}", env!("CARGO_PKG_VERSION")),
        pid: std::process::id(),
        workers: workers as u64,
        uptime_msec: uptime.as_millis() as u64,
        conn_current: t.open,
        conn_accepted: t.accepted(),
        // Ended abnormally or turned away: with `conn_timeout`, `finished`,
        // `shutdown` and `conn_current` this partitions `conn_accepted`.
        conn_error: t.closed("error") + t.closed("reset") + t.refused.iter().sum::<u64>(),
        conn_timeout: t.closed("idle_timeout") + t.closed("line_timeout"),
        conn_accepted_error: t.accept_errors,
        req_current: t.holding,
        req_total: t.lines,
        req_file_serve: 0,
        req_reverse_proxy: 0,
        req_redirect: 0,
        res_avg_res_time_msec: 0,
        res_peak_res_time_msec: 0,
        res_code_2xx: 0,
        res_code_3xx: 0,
        res_code_4xx: 0,
        res_code_5xx: 0,
        traffic_total_send_bytes: t.sent,
        traffic_total_recv_bytes: t.received,
        workers_cpu_usage_percent: usage.workers,
        workers_ram_usage_bytes: rss,
        sys_cpu_usage_percent: usage.system,
        sys_ram_usage_bytes: ram_used,
        sys_ram_total_bytes: ram_total,
        server_cpu_usage_time_msec: cpu_msec,
        server_ram_usage_bytes: rss,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::io::CloseReason;
    use crate::policy::Refusal;

    #[test]
    fn the_29_keys_in_order_with_integer_counts() {
        let m = Metrics::new(2);
        let w = m.take_worker(0).unwrap();
        let l = m.listener("127.0.0.1:8001");
        for _ in 0..6 {
            w.accepted(&l);
        }
        w.closed(&CloseReason::Finished);
        w.closed(&CloseReason::Reset(
            std::io::ErrorKind::ConnectionReset.into(),
        ));
        w.closed(&CloseReason::IdleTimeout {
            stalled_writer: false,
            after_secs: 1,
        });
        w.refused(Refusal::Denied);
        w.lines(7);
        let usage = Usage {
            workers: vec![1.5, 0.0],
            system: 12.25,
        };
        let d = from_parts(
            &m.totals(),
            2,
            Duration::from_millis(93_512),
            usage,
            (8 << 30, 1 << 30),
            9 << 20,
            130,
        );
        let v = serde_json::to_value(&d).unwrap();
        let text = serde_json::to_string(&d).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys.len(), 29);
        // In the declared order in the text (serde_json's map may sort).
        let mut at = 0;
        for k in [
            "server_name",
            "pid",
            "workers",
            "uptime_msec",
            "conn_current",
            "conn_accepted",
            "conn_error",
            "conn_timeout",
            "conn_accepted_error",
            "req_current",
            "req_total",
            "req_file_serve",
            "req_reverse_proxy",
            "req_redirect",
            "res_avg_res_time_msec",
            "res_peak_res_time_msec",
            "res_code_2xx",
            "res_code_3xx",
            "res_code_4xx",
            "res_code_5xx",
            "traffic_total_send_bytes",
            "traffic_total_recv_bytes",
            "workers_cpu_usage_percent",
            "workers_ram_usage_bytes",
            "sys_cpu_usage_percent",
            "sys_ram_usage_bytes",
            "sys_ram_total_bytes",
            "server_cpu_usage_time_msec",
            "server_ram_usage_bytes",
        ] {
            let i = text[at..].find(&format!("\"{k}\":")).expect(k) + at;
            at = i;
        }
        assert_eq!(v["conn_accepted"], 6);
        assert_eq!(v["conn_current"], 2);
        assert_eq!(v["conn_error"], 2); // the reset and the refusal
        assert_eq!(v["conn_timeout"], 1);
        assert_eq!(v["req_total"], 7);
        assert_eq!(v["uptime_msec"], 93_512);
        assert_eq!(v["sys_cpu_usage_percent"], 12.25);
        assert_eq!(
            v["workers_cpu_usage_percent"],
            serde_json::json!([1.5, 0.0])
        );
        assert!(v["server_ram_usage_bytes"].is_u64());
    }

    #[test]
    fn percentages_over_a_window() {
        let t0 = Instant::now();
        let a = Reading {
            at: t0,
            workers: vec![100, 0],
            system: (1000, 800),
        };
        let b = Reading {
            at: t0 + Duration::from_secs(2),
            workers: vec![150, 400], // 50 ticks in 2 s at 100/s = 25 %; 400 is capped
            system: (1400, 1100),
        };
        let u = usage_between(&a, &b, 100);
        assert_eq!(u.workers, vec![25.0, 100.0]);
        assert_eq!(u.system, 25.0);
        let same = usage_between(&a, &a, 100);
        assert_eq!(same.workers, vec![0.0, 0.0]);
        assert_eq!(same.system, 0.0);
    }

    #[test]
    fn proc_parsers() {
        assert_eq!(worker_index("xps-worker-3\n"), Some(3));
        assert_eq!(worker_index("xps-http\n"), None);
        let stat = "cpu  10 1 5 80 4 0 0 0 0 0\ncpu0 5 0 2 40 2 0 0 0 0 0\n";
        assert_eq!(parse_cpu_line(stat), Some((100, 84)));
        assert_eq!(parse_cpu_line("intr 1\n"), None);
        let mem = "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    600 kB\n";
        assert_eq!(parse_meminfo(mem), Some((1000 * 1024, 400 * 1024)));
    }

    #[test]
    fn the_sampler_reads_this_process() {
        let s = Sampler::new(1, Instant::now());
        let u = s.usage();
        assert_eq!(u.workers.len(), 1);
        assert!(u.system.is_finite() && (0.0..=100.0).contains(&u.system));
        // Within the window the same numbers come back.
        assert_eq!(s.usage(), u);
    }
}
