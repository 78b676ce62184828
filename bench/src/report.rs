//! The one-line JSON summary, and the error log shared by the modes.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::sys::CpuWindow;
use crate::{Args, Verify};

/// Latency histogram in nanoseconds (1 ns … 100 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

/// Records `d` into `h`, clamping to the histogram's range.
#[inline]
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_nanos() as u64).max(1));
}

/// Errors seen so far; prints the first few on stderr.
#[derive(Default)]
pub struct Errors {
    pub count: u64,
}

impl Errors {
    pub fn add(&mut self, what: &str) {
        self.count += 1;
        if self.count <= 10 {
            eprintln!("xps-bench: error: {what}");
        } else if self.count == 11 {
            eprintln!("xps-bench: (further errors only counted)");
        }
    }
}

#[derive(Default)]
pub struct Report {
    pub mode: &'static str,
    pub verify: &'static str,
    pub addrs: Vec<String>,
    pub conns: usize,
    pub pipeline: Option<usize>,
    pub size: usize,
    /// Measured window, seconds.
    pub duration: f64,
    pub warmup: f64,
    /// Lines fully answered in the window.
    pub lines: u64,
    /// Reply bytes received (and verified) in the window.
    pub bytes: u64,
    /// Connections completed (churn) or established (idle) in the window.
    pub connections: u64,
    pub lines_per_s: Option<f64>,
    pub mb_per_s: Option<f64>,
    pub conns_per_s: Option<f64>,
    pub latency: Option<Histogram<u64>>,
    pub errors: u64,
    /// idle: connections open and verified at the end.
    pub open: Option<u64>,
    pub server_pid: Option<u32>,
    pub cpu: Option<CpuWindow>,
    pub server_rss_kb: Option<u64>,
    pub server_rss_before_kb: Option<u64>,
    pub rss_per_conn_bytes: Option<f64>,
    /// idle: seconds to open and verify all connections.
    pub connect_s: Option<f64>,
}

impl Report {
    pub fn new(args: &Args) -> Report {
        Report {
            mode: args.mode.name(),
            verify: match args.verify {
                Verify::Reverse => "reverse",
                Verify::Echo => "echo",
                Verify::None => "none",
            },
            addrs: args.addr.iter().map(|a| a.to_string()).collect(),
            conns: args.conns,
            size: args.size(),
            warmup: args.warmup,
            server_pid: args.server_pid,
            ..Report::default()
        }
    }

    pub fn failed(&self) -> bool {
        self.errors > 0 || self.open.is_some_and(|o| o < self.conns as u64)
    }

    pub fn to_json(&self) -> String {
        let mut o = Obj::default();
        o.str("mode", self.mode);
        o.str("verify", self.verify);
        o.raw(
            "addrs",
            &format!(
                "[{}]",
                self.addrs
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        );
        o.num("conns", Some(self.conns as f64));
        o.num("pipeline", self.pipeline.map(|p| p as f64));
        o.num("size", Some(self.size as f64));
        o.num("duration", Some(self.duration));
        o.num("warmup", Some(self.warmup));
        o.num("lines", Some(self.lines as f64));
        o.num("bytes", Some(self.bytes as f64));
        o.num("connections", Some(self.connections as f64));
        o.num("lines_per_s", self.lines_per_s);
        o.num("mb_per_s", self.mb_per_s);
        o.num("conns_per_s", self.conns_per_s);
        let q = |p: f64| {
            self.latency
                .as_ref()
                .filter(|h| !h.is_empty())
                .map(|h| h.value_at_quantile(p) as f64 / 1000.0)
        };
        o.num("p50_us", q(0.5));
        o.num("p99_us", q(0.99));
        o.num("p999_us", q(0.999));
        o.num(
            "max_us",
            self.latency
                .as_ref()
                .filter(|h| !h.is_empty())
                .map(|h| h.max() as f64 / 1000.0),
        );
        o.num(
            "mean_us",
            self.latency
                .as_ref()
                .filter(|h| !h.is_empty())
                .map(|h| h.mean() / 1000.0),
        );
        o.num("errors", Some(self.errors as f64));
        o.num("open", self.open.map(|v| v as f64));
        o.num("connect_s", self.connect_s);
        o.num("server_pid", self.server_pid.map(|v| v as f64));
        o.num("server_utime_s", self.cpu.map(|c| c.utime_s));
        o.num("server_stime_s", self.cpu.map(|c| c.stime_s));
        o.num("server_sched_cpu_s", self.cpu.and_then(|c| c.sched_s));
        o.num("server_rss_kb", self.server_rss_kb.map(|v| v as f64));
        o.num(
            "server_rss_before_kb",
            self.server_rss_before_kb.map(|v| v as f64),
        );
        o.num("rss_per_conn_bytes", self.rss_per_conn_bytes);
        o.finish()
    }
}

#[derive(Default)]
struct Obj {
    s: String,
}

impl Obj {
    fn key(&mut self, k: &str) {
        self.s.push(if self.s.is_empty() { '{' } else { ',' });
        let _ = write!(self.s, "\"{k}\":");
    }
    fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        let _ = write!(self.s, "\"{v}\"");
    }
    fn raw(&mut self, k: &str, v: &str) {
        self.key(k);
        self.s.push_str(v);
    }
    fn num(&mut self, k: &str, v: Option<f64>) {
        self.key(k);
        match v {
            Some(x) if x.is_finite() => {
                if x.fract() == 0.0 && x.abs() < 1e15 {
                    let _ = write!(self.s, "{}", x as i64);
                } else {
                    let _ = write!(self.s, "{x:.3}");
                }
            }
            _ => self.s.push_str("null"),
        }
    }
    fn finish(mut self) -> String {
        self.s.push('}');
        self.s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let mut o = Obj::default();
        o.str("mode", "lines");
        o.num("a", Some(2.0));
        o.num("b", Some(1.23456));
        o.num("c", None);
        assert_eq!(o.finish(), r#"{"mode":"lines","a":2,"b":1.235,"c":null}"#);
    }
}
