//! Counters carried over an upgrade (SPEC §7): the new process's `_total`
//! series start from the old one's values, so no counter resets when the
//! binary is replaced.
//!
//! The old process hands over its exposition's `_total` samples as text
//! ([`Metrics::total_samples`]), after its last connection moved; the new one
//! keeps them as a base added at render time ([`Metrics::carry_over`]):
//! the same series (name and labels) gets the old value plus its own.
//! Nothing changes for the workers' counting. A listener the new
//! configuration no longer has keeps its series, with the old count.

use super::counters::{ListenerCell, ListenerEntry, Metrics};
use super::totals::Totals;
use crate::network::io::CloseReason;
use crate::policy::Refusal;

/// The accepted counter's series for one listener starts so.
const LISTENER_SERIES: &str = "xps_connections_accepted_total{listener=\"";

impl Metrics {
    /// Every `_total` sample of the exposition now: (series as exposed,
    /// value as exposed), in order.
    pub fn total_samples(&self) -> Vec<(String, String)> {
        self.render()
            .lines()
            .filter_map(sample)
            .filter(|(series, _)| name(series).ends_with("_total"))
            .map(|(s, v)| (s.to_string(), v.to_string()))
            .collect()
    }

    /// Adds an old process's [`total_samples`](Self::total_samples) to every series of
    /// the same name and labels, from now on.
    pub fn carry_over(&self, base: Vec<(String, String)>) {
        let mut entries = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        for (series, _) in &base {
            let Some(addr) = series
                .strip_prefix(LISTENER_SERIES)
                .and_then(|rest| rest.strip_suffix("\"}"))
            else {
                continue;
            };
            if !entries.iter().any(|e| &*e.addr == addr) {
                entries.push(ListenerEntry {
                    addr: addr.into(),
                    cell: std::sync::Arc::new(ListenerCell::default()),
                });
            }
        }
        drop(entries);
        let mut carried = self.carried.lock().unwrap_or_else(|e| e.into_inner());
        for (series, value) in base {
            carried.insert(series, value);
        }
    }

    /// `t` (the summed counters of `/api` and the status page) with the
    /// carried values added, so they do not reset either.
    pub(super) fn add_carried_totals(&self, t: &mut Totals) {
        let carried = self.carried.lock().unwrap_or_else(|e| e.into_inner());
        for (series, value) in carried.iter() {
            let Ok(v) = value.parse::<u64>() else {
                continue;
            };
            let label = |prefix: &str| {
                series
                    .strip_prefix(prefix)
                    .and_then(|rest| rest.strip_suffix("\"}"))
                    .map(str::to_owned)
            };
            let slot: Option<&mut u64> = match name(series) {
                "xps_connections_accepted_total" => label(LISTENER_SERIES)
                    .map(|addr| t.accepted_by_listener.entry(addr.into()).or_insert(0)),
                "xps_connections_closed_total" => label("xps_connections_closed_total{reason=\"")
                    .and_then(|r| CloseReason::LABELS.iter().position(|l| *l == r))
                    .map(|i| &mut t.closed[i]),
                "xps_connections_refused_total" => label("xps_connections_refused_total{reason=\"")
                    .and_then(|r| Refusal::LABELS.iter().position(|l| *l == r))
                    .map(|i| &mut t.refused[i]),
                "xps_accept_errors_total" => Some(&mut t.accept_errors),
                "xps_lines_total" => Some(&mut t.lines),
                "xps_received_bytes_total" => Some(&mut t.received),
                "xps_sent_bytes_total" => Some(&mut t.sent),
                _ => None,
            };
            if let Some(slot) = slot {
                *slot = slot.wrapping_add(v);
            }
        }
    }

    /// `text` with the carried values added.
    pub(super) fn add_carried(&self, text: String) -> String {
        let carried = self.carried.lock().unwrap_or_else(|e| e.into_inner());
        if carried.is_empty() {
            return text;
        }
        let mut out = String::with_capacity(text.len());
        for line in text.lines() {
            match sample(line).and_then(|(s, v)| Some((s, v, carried.get(s)?))) {
                Some((series, own, base)) => {
                    out.push_str(series);
                    out.push(' ');
                    out.push_str(&add(own, base));
                }
                None => out.push_str(line),
            }
            out.push('\n');
        }
        out
    }
}

/// A sample line's series and value.
fn sample(line: &str) -> Option<(&str, &str)> {
    if line.starts_with('#') {
        return None;
    }
    line.rsplit_once(' ')
}

/// A series' metric name (before its labels).
fn name(series: &str) -> &str {
    series.split('{').next().unwrap_or(series)
}

/// Two sample values added: exactly for integers, else as floats.
fn add(a: &str, b: &str) -> String {
    if let (Ok(x), Ok(y)) = (a.parse::<u64>(), b.parse::<u64>()) {
        return x.wrapping_add(y).to_string();
    }
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => (x + y).to_string(),
        _ => a.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::exposition::line_of;
    use super::*;

    #[test]
    fn totals_carry_over_and_gauges_do_not() {
        let old = Metrics::new(1);
        let w = old.take_worker(0).unwrap();
        let l = old.listener("127.0.0.1:8001");
        let gone = old.listener("127.0.0.1:9000");
        for _ in 0..3 {
            w.accepted(&l);
        }
        w.accepted(&gone);
        w.lines(5);
        w.closed(&CloseReason::Finished);
        let base = old.total_samples();
        assert!(base.iter().all(|(s, _)| name(s).ends_with("_total")));
        assert!(base.iter().any(|(s, v)| s == "xps_lines_total" && v == "5"));

        let new = Metrics::new(2);
        let w = new.take_worker(1).unwrap();
        let l = new.listener("127.0.0.1:8001");
        w.accepted(&l);
        w.lines(1);
        new.carry_over(base);
        let text = new.render();
        for (series, v) in [
            ("xps_lines_total", "6"),
            (
                "xps_connections_accepted_total{listener=\"127.0.0.1:8001\"}",
                "4",
            ),
            // Removed by the new configuration: still there.
            (
                "xps_connections_accepted_total{listener=\"127.0.0.1:9000\"}",
                "1",
            ),
            ("xps_connections_closed_total{reason=\"finished\"}", "1"),
            // A gauge is the new process's own.
            ("xps_connections_open", "1"),
        ] {
            assert_eq!(line_of(&text, series), format!("{series} {v}"));
        }
        // /api's sums carry over too.
        let t = new.totals();
        assert_eq!(t.lines, 6);
        assert_eq!(t.accepted(), 5);
        assert_eq!(t.closed("finished"), 1);
        assert_eq!(t.open, 1);
        assert_eq!(add("0.25", "1.5"), "1.75");
    }
}
