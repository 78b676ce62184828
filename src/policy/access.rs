//! Access rules, nginx's `allow` / `deny` (SPEC §6): checked in the order
//! given, the first whose scope contains the client address decides, and an
//! address no rule matches is allowed. Scopes are `all`, an address or a
//! CIDR. A CIDR with host bits set (`10.1.2.3/8`) is refused, naming the
//! network meant, rather than silently widened; IPv4-mapped IPv6 is matched
//! as IPv4. `docs/admission.md` says why each choice.

use std::fmt;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

/// What a matching rule decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Accept the connection (`--allow`, config `{"allow": ...}`).
    Allow,
    /// Close it before reading anything (`--deny`, config `{"deny": ...}`).
    Deny,
}

/// Which client addresses a rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every address (`all`).
    All,
    /// One network, host bits zero. IPv4-mapped IPv6 networks are stored in
    /// their IPv4 form (see the module docs).
    Net(IpNet),
}

impl Scope {
    /// Whether the scope covers `ip`, which must already be canonical
    /// (mapped IPv6 turned into IPv4).
    fn contains(&self, ip: &IpAddr) -> bool {
        match self {
            Scope::All => true,
            Scope::Net(net) => net.contains(ip),
        }
    }
}

impl fmt::Display for Scope {
    /// As the operator would write it: `all`, `10.0.0.0/8`, `::1/128`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::All => f.write_str("all"),
            Scope::Net(net) => write!(f, "{net}"),
        }
    }
}

/// One `allow` or `deny` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    /// What happens when the scope matches.
    pub action: Action,
    /// The addresses it covers.
    pub scope: Scope,
}

impl fmt::Display for Rule {
    /// `allow 10.0.0.0/8`, `deny all`: nginx's spelling.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
        };
        write!(f, "{action} {}", self.scope)
    }
}

/// Parses a rule's scope: `all`, an address (`127.0.0.1`, `::1`, `[::1]`) or
/// a CIDR (`10.0.0.0/8`, `2001:db8::/32`, `[2001:db8::]/32`). A CIDR with host
/// bits set is refused, naming the network meant; mapped IPv6 is turned into
/// IPv4. The error is one line naming the bad text.
pub fn parse_scope(s: &str) -> Result<Scope, String> {
    if s == "all" {
        return Ok(Scope::All);
    }
    let (addr_text, prefix_text) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let bracketed = addr_text
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'));
    let (addr_text, must_be_v6) = match bracketed {
        Some(inner) => (inner, true),
        None => (addr_text, false),
    };
    let addr: IpAddr = addr_text
        .parse()
        .map_err(|_| format!("'{s}' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'"))?;
    if must_be_v6 && addr.is_ipv4() {
        return Err(format!(
            "'{s}': brackets are for IPv6 addresses; write IPv4 without them"
        ));
    }
    let max = match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    let prefix = match prefix_text {
        None => max,
        Some(p) => parse_prefix(p, max).map_err(|why| format!("'{s}': {why}"))?,
    };
    let net = IpNet::new(addr, prefix).map_err(|_| format!("'{s}': bad prefix length"))?;
    if net.trunc() != net {
        return Err(format!(
            "'{s}' has host bits set: write {} (or /{max} for one address)",
            net.trunc()
        ));
    }
    Ok(Scope::Net(canonical_net(net)))
}

/// The prefix length after a `/`: decimal digits only, at most `max`.
fn parse_prefix(p: &str, max: u8) -> Result<u8, String> {
    if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("prefix length '{p}' is not a number in 0-{max}"));
    }
    match p.parse::<u8>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(format!("prefix length '{p}' is not a number in 0-{max}")),
    }
}

/// `::ffff:a.b.c.d/n` with `n ≥ 96` as `a.b.c.d/(n − 96)`; anything else as is.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
        && let Ok(v4net) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(v4net);
    }
    net
}

/// An ordered list of rules: first match decides, no match allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessRules {
    /// In the order given on the command line or in the config.
    rules: Vec<Rule>,
}

impl AccessRules {
    /// The rules, in the order they are checked.
    pub fn new(rules: Vec<Rule>) -> Self {
        AccessRules { rules }
    }

    /// Whether a connection from `ip` may be accepted. Mapped IPv6 is
    /// checked as IPv4.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match self.rules.iter().find(|r| r.scope.contains(&ip)) {
            Some(rule) => rule.action == Action::Allow,
            None => true,
        }
    }

    /// No rules: every address is allowed and the core may skip the check.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules, in order (for `--check` and the start-up log).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// `--proxy-from A --proxy-from B` as rules: allow A, allow B, deny all;
    /// `None` (no scope given) = any peer may send headers.
    pub fn trusted_proxies(scopes: &[Scope]) -> Option<AccessRules> {
        (!scopes.is_empty()).then(|| {
            let allow = scopes.iter().map(|&scope| Rule {
                action: Action::Allow,
                scope,
            });
            let deny_rest = std::iter::once(Rule {
                action: Action::Deny,
                scope: Scope::All,
            });
            AccessRules::new(allow.chain(deny_rest).collect())
        })
    }
}

#[cfg(test)]
mod tests {
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

    fn net(s: &str) -> Scope {
        Scope::Net(s.parse().unwrap())
    }

    #[test]
    fn parses_all_addresses_and_cidrs() {
        assert_eq!(parse_scope("all"), Ok(Scope::All));
        assert_eq!(parse_scope("10.0.0.0/8"), Ok(net("10.0.0.0/8")));
        assert_eq!(parse_scope("127.0.0.1"), Ok(net("127.0.0.1/32")));
        assert_eq!(parse_scope("0.0.0.0/0"), Ok(net("0.0.0.0/0")));
        assert_eq!(parse_scope("::1"), Ok(net("::1/128")));
        assert_eq!(parse_scope("[::1]"), Ok(net("::1/128")));
        assert_eq!(parse_scope("2001:db8::/32"), Ok(net("2001:db8::/32")));
        assert_eq!(parse_scope("[2001:db8::]/32"), Ok(net("2001:db8::/32")));
        assert_eq!(parse_scope("::/0"), Ok(net("::/0")));
        assert_eq!(parse_scope("10.0.0.0/08"), Ok(net("10.0.0.0/8")));
    }

    #[test]
    fn mapped_rules_become_ipv4() {
        assert_eq!(parse_scope("::ffff:10.1.2.3"), Ok(net("10.1.2.3/32")));
        assert_eq!(parse_scope("::ffff:10.0.0.0/104"), Ok(net("10.0.0.0/8")));
        assert_eq!(parse_scope("::ffff:0:0/96"), Ok(net("0.0.0.0/0")));
        // Wider than the mapped range: stays an IPv6 network.
        assert_eq!(parse_scope("::/64"), Ok(net("::/64")));
    }

    #[test]
    fn parse_errors_name_the_text() {
        let cases = [
            (
                "",
                "'' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'",
            ),
            (
                "ALL",
                "'ALL' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'",
            ),
            (
                "10.0.0",
                "'10.0.0' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'",
            ),
            (
                "localhost",
                "'localhost' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'",
            ),
            (
                " 10.0.0.1",
                "' 10.0.0.1' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'",
            ),
            (
                "010.0.0.1",
                "'010.0.0.1' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'",
            ),
            (
                "10.0.0.0/33",
                "'10.0.0.0/33': prefix length '33' is not a number in 0-32",
            ),
            (
                "::/129",
                "'::/129': prefix length '129' is not a number in 0-128",
            ),
            (
                "10.0.0.0/",
                "'10.0.0.0/': prefix length '' is not a number in 0-32",
            ),
            (
                "10.0.0.0/+8",
                "'10.0.0.0/+8': prefix length '+8' is not a number in 0-32",
            ),
            (
                "10.0.0.0/8/8",
                "'10.0.0.0/8/8': prefix length '8/8' is not a number in 0-32",
            ),
            (
                "10.0.0.0/0008",
                "'10.0.0.0/0008': prefix length '0008' is not a number in 0-32",
            ),
            (
                "/8",
                "'/8' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'",
            ),
            (
                "[10.0.0.1]",
                "'[10.0.0.1]': brackets are for IPv6 addresses; write IPv4 without them",
            ),
            (
                "[::1",
                "'[::1' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'",
            ),
            (
                "10.1.2.3/8",
                "'10.1.2.3/8' has host bits set: write 10.0.0.0/8 (or /32 for one address)",
            ),
            (
                "2001:db8::1/32",
                "'2001:db8::1/32' has host bits set: write 2001:db8::/32 (or /128 for one address)",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_scope(text), Err(want.to_string()), "{text:?}");
        }
    }

    #[test]
    fn no_rules_allow_everything() {
        let rules = AccessRules::new(vec![]);
        assert!(rules.is_empty());
        assert!(rules.allows(ip("127.0.0.1")));
        assert!(rules.allows(ip("::1")));
    }

    #[test]
    fn first_match_decides() {
        let rules = AccessRules::new(vec![
            rule(Action::Allow, "127.0.0.1"),
            rule(Action::Deny, "all"),
        ]);
        assert!(!rules.is_empty());
        assert!(rules.allows(ip("127.0.0.1")));
        assert!(!rules.allows(ip("127.0.0.2")));
        assert!(!rules.allows(ip("::1")));

        // The same rules the other way round deny everyone.
        let reversed = AccessRules::new(vec![
            rule(Action::Deny, "all"),
            rule(Action::Allow, "127.0.0.1"),
        ]);
        assert!(!reversed.allows(ip("127.0.0.1")));
    }

    #[test]
    fn no_match_allows() {
        let rules = AccessRules::new(vec![rule(Action::Deny, "127.0.0.0/8")]);
        assert!(!rules.allows(ip("127.0.0.1")));
        assert!(!rules.allows(ip("127.255.255.255")));
        assert!(rules.allows(ip("128.0.0.1")));
        assert!(rules.allows(ip("::1")));
    }

    #[test]
    fn deny_all_covers_ipv6() {
        let rules = AccessRules::new(vec![rule(Action::Deny, "all")]);
        assert!(!rules.allows(ip("::1")));
        assert!(!rules.allows(ip("2001:db8::1")));
        assert!(!rules.allows(ip("10.0.0.1")));
        let v6 = AccessRules::new(vec![rule(Action::Deny, "::1")]);
        assert!(!v6.allows(ip("::1")));
        assert!(v6.allows(ip("127.0.0.1")));
    }

    #[test]
    fn mapped_addresses_match_ipv4_rules() {
        let rules = AccessRules::new(vec![
            rule(Action::Allow, "10.0.0.0/8"),
            rule(Action::Deny, "all"),
        ]);
        assert!(rules.allows(ip("::ffff:10.1.2.3")));
        assert!(!rules.allows(ip("::ffff:11.1.2.3")));
        let deny = AccessRules::new(vec![rule(Action::Deny, "127.0.0.1")]);
        assert!(!deny.allows(ip("::ffff:127.0.0.1")));
        // A rule in mapped form matches plain IPv4 too.
        let mapped = AccessRules::new(vec![rule(Action::Deny, "::ffff:10.0.0.0/104")]);
        assert!(!mapped.allows(ip("10.9.9.9")));
        assert!(!mapped.allows(ip("::ffff:10.9.9.9")));
        // An IPv6 rule covers native IPv6 only, as in nginx.
        let v6all = AccessRules::new(vec![rule(Action::Deny, "::/0")]);
        assert!(!v6all.allows(ip("::1")));
        assert!(v6all.allows(ip("::ffff:10.1.2.3")));
    }

    #[test]
    fn rules_display_as_written() {
        let r = [
            rule(Action::Allow, "10.0.0.0/8"),
            rule(Action::Deny, "all"),
            rule(Action::Deny, "[::1]"),
        ];
        let text: Vec<String> = r.iter().map(|r| r.to_string()).collect();
        assert_eq!(text, ["allow 10.0.0.0/8", "deny all", "deny ::1/128"]);
    }
}
