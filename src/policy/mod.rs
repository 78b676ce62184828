//! Policy: what the worker asks before it serves or reads a connection
//! (SPEC §6), each piece with the narrowest interface the hooks need and
//! none of them on the per-line path:
//!
//! | piece                        | asked                                   | cost                 |
//! |------------------------------|-----------------------------------------|----------------------|
//! | [`access::AccessRules`]      | once per accepted connection            | a scan of the rules  |
//! | [`source_limit::SourceLimits`] | at accept, and on close (its permit drops) | one mutex, or nothing at limit 0 |
//! | [`budget::BufferBudget`]     | once per loop turn, and per read pass   | relaxed atomics in padded slots |
//! | [`proxy_protocol`]           | while a PROXY header is read            | a pure parser        |
//!
//! [`admit`] chains the first two in the order that costs least (rules
//! first, so a denied address never takes the per-source lock), and
//! [`Refusal`] is the one reason a connection is turned away, wherever it
//! is decided. The semantics and the memory bound's proof are in
//! `docs/admission.md`.

pub mod access;
pub mod budget;
pub mod proxy_protocol;
pub mod source_limit;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use access::AccessRules;
use proxy_protocol::HeaderFailure;
use source_limit::{SourceLimits, SourcePermit};

/// Why a connection was turned away before it was served (SPEC §6). The
/// label is the `reason` the access log and the refusal counters use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An access rule denied the client address.
    Denied,
    /// The client's source already holds `--max-connections-per-source`
    /// connections.
    PerSourceLimit,
    /// The PROXY header was not received as it must be.
    ProxyHeader(HeaderFailure),
}

impl Refusal {
    /// Every label, in the order of [`index`](Self::index).
    pub const LABELS: [&'static str; 3] = ["denied", "per_source_limit", "proxy_header"];

    /// The reason's place in [`LABELS`](Self::LABELS) (a counter's index).
    pub fn index(self) -> usize {
        match self {
            Refusal::Denied => 0,
            Refusal::PerSourceLimit => 1,
            Refusal::ProxyHeader(_) => 2,
        }
    }

    /// The reason as logged and counted: `denied`, `per_source_limit` or
    /// `proxy_header`.
    pub fn label(self) -> &'static str {
        Self::LABELS[self.index()]
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Denied => f.write_str("denied by the access rules"),
            Refusal::PerSourceLimit => f.write_str("per-source connection limit reached"),
            Refusal::ProxyHeader(why) => why.fmt(f),
        }
    }
}

/// Everything admission asks at accept, in the order that costs least: the
/// access rules (no lock), then the per-source table. `ip` is the client
/// address (from the PROXY header on PROXY listeners). Keep the permit for as
/// long as the connection lives.
pub fn admit(
    rules: &AccessRules,
    limits: &Arc<SourceLimits>,
    ip: IpAddr,
) -> Result<SourcePermit, Refusal> {
    if !rules.allows(ip) {
        return Err(Refusal::Denied);
    }
    limits.try_acquire(ip)
}

#[cfg(test)]
mod tests {
    use super::access::{Action, Rule, parse_scope};
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rule(action: Action, scope: &str) -> Rule {
        Rule {
            action,
            scope: parse_scope(scope).unwrap(),
        }
    }

    #[test]
    fn refusal_labels() {
        assert_eq!(Refusal::Denied.label(), "denied");
        assert_eq!(Refusal::PerSourceLimit.label(), "per_source_limit");
        assert_eq!(
            Refusal::PerSourceLimit.to_string(),
            "per-source connection limit reached"
        );
    }

    #[test]
    fn admit_checks_rules_then_limit() {
        let rules = AccessRules::new(vec![rule(Action::Deny, "10.0.0.0/8")]);
        let limits = SourceLimits::new(1);
        assert_eq!(
            admit(&rules, &limits, ip("10.0.0.1")).unwrap_err(),
            Refusal::Denied
        );
        assert_eq!(limits.tracked(), 0, "a denied address takes no count");
        let p = admit(&rules, &limits, ip("127.0.0.1")).unwrap();
        assert_eq!(
            admit(&rules, &limits, ip("127.0.0.1")).unwrap_err(),
            Refusal::PerSourceLimit
        );
        drop(p);
        assert_eq!(limits.tracked(), 0);
    }
}
