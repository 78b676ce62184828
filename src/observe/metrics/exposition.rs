//! The Prometheus text format 0.0.4, written by hand: the xps series summed
//! over the workers' blocks at scrape time, then the standard process
//! series. Why not a client crate: `docs/metrics.md`, "The format".

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::Ordering;

use super::counters::{AcceptError, Metrics, WorkerBlock};
use super::procfs::ProcessStats;
use crate::network::io::CloseReason;
use crate::policy::Refusal;

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Metrics {
    /// The full exposition: the xps series, then the process series.
    pub fn render(&self) -> String {
        let mut out = Exposition(String::with_capacity(4096));
        self.render_xps(&mut out);
        render_process(&ProcessStats::read(), &mut out);
        self.add_carried(out.0)
    }

    /// The xps series (everything but the process series).
    fn render_xps(&self, out: &mut Exposition) {
        let sum = |f: &dyn Fn(&WorkerBlock) -> u64| -> u64 {
            self.workers.iter().fold(0u64, |a, b| a.wrapping_add(f(b)))
        };

        out.family("xps_build_info", "gauge", "The version of xps; always 1.");
        out.sample(
            "xps_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );
        out.single(
            "xps_workers",
            "gauge",
            "Worker threads (event loops).",
            self.workers.len(),
        );

        let mut by_addr: BTreeMap<Box<str>, u64> = BTreeMap::new();
        {
            let entries = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
            for e in entries.iter() {
                let c = by_addr.entry(e.addr.clone()).or_insert(0);
                *c = c.wrapping_add(e.cell.accepted.get());
            }
        }
        out.counter_by(
            "xps_connections_accepted_total",
            "Connections accepted, by listener address.",
            "listener",
            by_addr.iter().map(|(addr, n)| (&**addr, *n)),
        );

        // Per worker the gauge is never negative; as i64 in case a caller
        // broke the accept/end pairing, so the sum shows it instead of 2^64.
        let open = sum(&|b| b.open.get()) as i64;
        out.single(
            "xps_connections_open",
            "gauge",
            "Connections accepted and not yet closed or refused.",
            open,
        );

        out.counter_by(
            "xps_connections_closed_total",
            "Served connections that ended, by reason.",
            "reason",
            CloseReason::LABELS
                .iter()
                .enumerate()
                .map(|(i, l)| (*l, sum(&|b| b.closed[i].get()))),
        );
        out.counter_by(
            "xps_connections_refused_total",
            "Accepted connections turned away before being served, by reason.",
            "reason",
            Refusal::LABELS
                .iter()
                .enumerate()
                .map(|(i, l)| (*l, sum(&|b| b.refused[i].get()))),
        );

        for (name, help, n) in [
            (
                "xps_lines_total",
                "Replies sent: lines and overlong segments.",
                sum(&|b| b.lines.get()),
            ),
            (
                "xps_received_bytes_total",
                "Bytes read from clients, not counting PROXY protocol headers.",
                sum(&|b| b.received.get()),
            ),
            (
                "xps_sent_bytes_total",
                "Bytes written to clients.",
                sum(&|b| b.sent.get()),
            ),
        ] {
            out.single(name, "counter", help, n);
        }

        out.counter_by(
            "xps_accept_errors_total",
            "Failed accept() calls, by error.",
            "error",
            AcceptError::ALL
                .iter()
                .map(|&k| (k.label(), sum(&|b| b.accept_errors[k as usize].get()))),
        );
        out.single(
            "xps_flow_control_pauses_total",
            "counter",
            "Times reading from a client paused because its replies reached the high-water mark.",
            sum(&|b| b.flow_pauses.get()),
        );

        out.counter_by(
            "xps_reloads_total",
            "Configuration reloads, by result.",
            "result",
            [
                ("ok", self.reloads_ok.load(Ordering::Relaxed)),
                ("failed", self.reloads_failed.load(Ordering::Relaxed)),
            ],
        );

        let dropped = sum(&|b| b.access_log_dropped.get())
            .wrapping_add(self.access_log_dropped.load(Ordering::Relaxed));
        out.single(
            "xps_access_log_dropped_total",
            "counter",
            "Access-log lines dropped because the writer fell behind.",
            dropped,
        );
    }
}

/// Text format 0.0.4 being written.
struct Exposition(String);

impl Exposition {
    /// `# HELP` and `# TYPE` lines. `help` is a constant of this module,
    /// written without `\` or newlines, so it needs no escaping.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    /// One sample line, label values escaped.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                self.0.push_str(k);
                self.0.push_str("=\"");
                escape_label_value(v, &mut self.0);
                self.0.push('"');
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// A counter family with one label: a sample per `(value, count)`.
    fn counter_by<'a>(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (&'a str, u64)>,
    ) {
        self.family(name, "counter", help);
        for (value, n) in samples {
            self.sample(name, &[(label, value)], n);
        }
    }

    /// A family of one sample without labels.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// A label value as the text format wants it: `\`, `"` and newline escaped.
fn escape_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The standard process series. A figure that could not be read is left
/// out, with its family, rather than shown as a false zero.
fn render_process(p: &ProcessStats, out: &mut Exposition) {
    fn one(out: &mut Exposition, name: &str, kind: &str, help: &str, v: Option<impl fmt::Display>) {
        if let Some(v) = v {
            out.single(name, kind, help, v);
        }
    }
    one(
        out,
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds,
    );
    one(
        out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        p.resident_bytes,
    );
    one(
        out,
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        p.open_fds,
    );
    one(
        out,
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        p.max_fds,
    );
    one(
        out,
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        p.start_time_seconds,
    );
}

/// The xps part of the exposition, without the process series.
#[cfg(test)]
pub(super) fn xps_text(m: &Metrics) -> String {
    let mut out = Exposition(String::new());
    m.render_xps(&mut out);
    out.0
}

/// The line of series `prefix` (name and labels) in `text`.
#[cfg(test)]
pub(super) fn line_of<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no line {prefix} in\n{text}"))
}

#[cfg(test)]
mod tests {
    use std::io::{self, Write as _};
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn render_exact_for_a_known_state() {
        let m = Metrics::new(1);
        let w = m.take_worker(0).unwrap();
        let l = m.listener("0.0.0.0:8001");
        for _ in 0..3 {
            w.accepted(&l);
        }
        w.closed(&CloseReason::Finished);
        w.refused(Refusal::Denied);
        w.lines(7);
        w.received(70);
        w.sent(69);
        w.accept_error(AcceptError::Emfile);
        w.flow_pause();
        w.access_log_dropped();
        m.access_log_dropped().fetch_add(2, Ordering::Relaxed);
        m.reload(true);
        m.reload(false);
        m.reload(false);
        let version = env!("CARGO_PKG_VERSION");
        let expected = format!(
            "\
# HELP xps_build_info The version of xps; always 1.
# TYPE xps_build_info gauge
xps_build_info{{version=\"{version}\"}} 1
# HELP xps_workers Worker threads (event loops).
# TYPE xps_workers gauge
xps_workers 1
# HELP xps_connections_accepted_total Connections accepted, by listener address.
# TYPE xps_connections_accepted_total counter
xps_connections_accepted_total{{listener=\"0.0.0.0:8001\"}} 3
# HELP xps_connections_open Connections accepted and not yet closed or refused.
# TYPE xps_connections_open gauge
xps_connections_open 1
# HELP xps_connections_closed_total Served connections that ended, by reason.
# TYPE xps_connections_closed_total counter
xps_connections_closed_total{{reason=\"finished\"}} 1
xps_connections_closed_total{{reason=\"reset\"}} 0
xps_connections_closed_total{{reason=\"error\"}} 0
xps_connections_closed_total{{reason=\"idle_timeout\"}} 0
xps_connections_closed_total{{reason=\"line_timeout\"}} 0
xps_connections_closed_total{{reason=\"shutdown\"}} 0
# HELP xps_connections_refused_total Accepted connections turned away before being served, by reason.
# TYPE xps_connections_refused_total counter
xps_connections_refused_total{{reason=\"denied\"}} 1
xps_connections_refused_total{{reason=\"per_source_limit\"}} 0
xps_connections_refused_total{{reason=\"proxy_header\"}} 0
# HELP xps_lines_total Replies sent: lines and overlong segments.
# TYPE xps_lines_total counter
xps_lines_total 7
# HELP xps_received_bytes_total Bytes read from clients, not counting PROXY protocol headers.
# TYPE xps_received_bytes_total counter
xps_received_bytes_total 70
# HELP xps_sent_bytes_total Bytes written to clients.
# TYPE xps_sent_bytes_total counter
xps_sent_bytes_total 69
# HELP xps_accept_errors_total Failed accept() calls, by error.
# TYPE xps_accept_errors_total counter
xps_accept_errors_total{{error=\"EMFILE\"}} 1
xps_accept_errors_total{{error=\"ENFILE\"}} 0
xps_accept_errors_total{{error=\"ENOBUFS\"}} 0
xps_accept_errors_total{{error=\"ENOMEM\"}} 0
xps_accept_errors_total{{error=\"other\"}} 0
# HELP xps_flow_control_pauses_total Times reading from a client paused because its replies reached the high-water mark.
# TYPE xps_flow_control_pauses_total counter
xps_flow_control_pauses_total 1
# HELP xps_reloads_total Configuration reloads, by result.
# TYPE xps_reloads_total counter
xps_reloads_total{{result=\"ok\"}} 1
xps_reloads_total{{result=\"failed\"}} 2
# HELP xps_access_log_dropped_total Access-log lines dropped because the writer fell behind.
# TYPE xps_access_log_dropped_total counter
xps_access_log_dropped_total 3
"
        );
        assert_eq!(xps_text(&m), expected);
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new(0);
        let _a = m.listener("[::1]:8001");
        let _b = m.listener("we\"ird\\host\nname:1");
        let text = xps_text(&m);
        assert!(text.contains("xps_connections_accepted_total{listener=\"[::1]:8001\"} 0\n"));
        assert!(text.contains(
            "xps_connections_accepted_total{listener=\"we\\\"ird\\\\host\\nname:1\"} 0\n"
        ));
        assert!(text.contains("xps_workers 0\n"));
    }

    #[test]
    fn promtool_accepts_the_exposition() {
        // A fresh registry (a family with no sample yet: no listener) …
        let fresh = Metrics::new(1).render();
        // … and one with counts, escaped labels, two workers.
        let m = Metrics::new(2);
        let w = m.take_worker(1).unwrap();
        let l = m.listener("[::1]:8001");
        let _l2 = m.listener("0.0.0.0:8001");
        w.accepted(&l);
        w.closed(&CloseReason::Failed(io::ErrorKind::Other.into()));
        w.sent(5);
        m.reload(true);
        for text in [fresh, m.render()] {
            let child = std::process::Command::new("promtool")
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    eprintln!(
                        "\n*** SKIPPED promtool_accepts_the_exposition: `promtool` is not \
                         installed (Debian: apt-get install prometheus) ***\n"
                    );
                    return;
                }
                Err(e) => panic!("promtool: {e}"),
            };
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(text.as_bytes()).unwrap();
            drop(stdin);
            let out = child.wait_with_output().unwrap();
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "promtool: {said}\n{text}");
            assert!(
                said.trim().is_empty(),
                "promtool complained: {said}\n{text}"
            );
        }
    }
}
