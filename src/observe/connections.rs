//! `GET /api/connections`: the open connections as JSON (HAProxy's `show
//! sess`), from every worker's snapshot (`core::snapshot`), with the
//! listeners and workers they belong to. xps's own shape; the status page
//! reads it. Rows are sorted oldest first and cut at `limit`; `total` still
//! counts every connection.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::core::snapshot::{ConnRow, Snapshot};
use crate::observe::metrics::Totals;

/// The whole answer.
#[derive(Debug, Serialize)]
pub struct Connections {
    /// As in `/api`, so that a reader can line the two up.
    pub uptime_msec: u64,
    /// Every open connection, including those past `limit`.
    pub total: usize,
    /// The live listeners (as the workers report them).
    pub listeners: Vec<ListenerJson>,
    /// Every worker.
    pub workers: Vec<WorkerJson>,
    /// At most `limit` connections, oldest first.
    pub connections: Vec<ConnJson>,
}

/// A listener.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ListenerJson {
    /// Its bound address.
    pub address: String,
    /// Its connections start with a PROXY header.
    pub proxy_protocol: bool,
    /// Its open connections.
    pub open: usize,
    /// Connections it accepted (`xps_connections_accepted_total`).
    pub accepted: u64,
}

/// A worker.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct WorkerJson {
    /// Its index (`xps-worker-N`).
    pub id: usize,
    /// Its open connections.
    pub open: usize,
}

/// A connection.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ConnJson {
    /// Its id, unique within its worker.
    pub id: u64,
    /// The worker serving it.
    pub worker: usize,
    /// The listener it came through ("" if unknown).
    pub listener: String,
    /// The client: after a PROXY header, the address it named.
    pub client: String,
    /// On a PROXY listener, the balancer (the TCP peer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// Milliseconds since it was accepted.
    pub age_msec: u64,
    /// Bytes read from it (after any PROXY header).
    pub received: u64,
    /// Bytes written to it.
    pub sent: u64,
    /// Replies made to it.
    pub lines: u64,
    /// Bytes of replies the socket has not taken yet.
    pub unsent: usize,
    /// `reading`, `paused`, `held`, `proxy_header`, `draining` or
    /// `lingering` (`core::snapshot::State`).
    pub state: &'static str,
}

fn row(worker: usize, c: &ConnRow) -> ConnJson {
    let a = &c.about;
    ConnJson {
        id: c.id,
        worker,
        listener: a.listener.as_deref().unwrap_or("").to_string(),
        client: a
            .client
            .or(c.peer)
            .map_or_else(String::new, |s| s.to_string()),
        proxy: a.proxy.map(|p| p.to_string()),
        age_msec: c.age.map_or(0, |d| d.as_millis() as u64),
        received: a.received,
        sent: a.sent,
        lines: a.lines,
        unsent: c.unsent,
        state: c.state.label(),
    }
}

/// The answer from the workers' snapshots (by worker index) and the
/// registry's totals.
pub fn gather(
    snapshots: &[Snapshot],
    totals: &Totals,
    uptime_msec: u64,
    limit: usize,
) -> Connections {
    let mut rows: Vec<ConnJson> = snapshots
        .iter()
        .enumerate()
        .flat_map(|(w, s)| s.connections.iter().map(move |c| row(w, c)))
        .collect();
    let mut open: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &rows {
        *open.entry(r.listener.as_str()).or_default() += 1;
    }
    let mut listeners: BTreeMap<String, bool> = BTreeMap::new();
    for l in snapshots.iter().flat_map(|s| &s.listeners) {
        *listeners.entry(l.bound.to_string()).or_default() |= l.proxy;
    }
    let listeners = listeners
        .into_iter()
        .map(|(address, proxy_protocol)| ListenerJson {
            open: open.get(address.as_str()).copied().unwrap_or(0),
            accepted: totals
                .accepted_by_listener
                .get(address.as_str())
                .copied()
                .unwrap_or(0),
            address,
            proxy_protocol,
        })
        .collect();
    let workers = snapshots
        .iter()
        .enumerate()
        .map(|(id, s)| WorkerJson {
            id,
            open: s.connections.len(),
        })
        .collect();
    let total = rows.len();
    rows.sort_by(|a, b| {
        b.age_msec
            .cmp(&a.age_msec)
            .then(a.worker.cmp(&b.worker))
            .then(a.id.cmp(&b.id))
    });
    rows.truncate(limit);
    Connections {
        uptime_msec,
        total,
        listeners,
        workers,
        connections: rows,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::core::About;
    use crate::core::snapshot::{ListenerRow, State};

    fn conn(id: u64, age_ms: u64, state: State, proxy: bool) -> ConnRow {
        ConnRow {
            id,
            state,
            age: Some(Duration::from_millis(age_ms)),
            unsent: 0,
            peer: None,
            about: About {
                listener: Some(if proxy { "127.0.0.1:2" } else { "127.0.0.1:1" }.into()),
                client: Some(format!("10.0.0.{id}:5000").parse().unwrap()),
                proxy: proxy.then(|| "127.0.0.1:9".parse().unwrap()),
                since: None,
                received: 6,
                sent: 6,
                lines: 1,
            },
        }
    }

    #[test]
    fn sorted_oldest_first_cut_at_limit_counted_whole() {
        let listeners = vec![
            ListenerRow {
                bound: "127.0.0.1:1".parse().unwrap(),
                proxy: false,
            },
            ListenerRow {
                bound: "127.0.0.1:2".parse().unwrap(),
                proxy: true,
            },
        ];
        let snaps = vec![
            Snapshot {
                listeners: listeners.clone(),
                connections: vec![conn(1, 100, State::Reading, false)],
            },
            Snapshot {
                listeners,
                connections: vec![
                    conn(2, 900, State::Paused, false),
                    conn(3, 500, State::ProxyHeader, true),
                ],
            },
        ];
        let mut totals = Totals::default();
        totals.accepted_by_listener.insert("127.0.0.1:1".into(), 7);
        let c = gather(&snaps, &totals, 1234, 2);
        assert_eq!(c.total, 3);
        let ids: Vec<u64> = c.connections.iter().map(|r| r.id).collect();
        assert_eq!(ids, [2, 3]);
        assert_eq!(c.connections[0].worker, 1);
        assert_eq!(c.connections[0].state, "paused");
        assert_eq!(c.connections[1].proxy.as_deref(), Some("127.0.0.1:9"));
        assert_eq!(
            c.listeners,
            [
                ListenerJson {
                    address: "127.0.0.1:1".into(),
                    proxy_protocol: false,
                    open: 2,
                    accepted: 7
                },
                ListenerJson {
                    address: "127.0.0.1:2".into(),
                    proxy_protocol: true,
                    open: 1,
                    accepted: 0
                }
            ]
        );
        assert_eq!(
            c.workers,
            [WorkerJson { id: 0, open: 1 }, WorkerJson { id: 1, open: 2 }]
        );
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["connections"][0]["client"], "10.0.0.2:5000");
        assert!(v["connections"][0].get("proxy").is_none());
        assert_eq!(v["connections"][1]["age_msec"], 500);
    }
}
