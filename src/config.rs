//! Command line and the eXpServer JSON config file, merged into [`Settings`].
//!
//! Precedence is option > config file > default (SPEC §1). Everything that can
//! be wrong with the user's input is found here, before any socket is opened,
//! and reported as a [`ConfigError`] naming the file or option and what is wrong;
//! `main` turns it into exit status 2. Listener addresses are only *parsed* here;
//! resolving and binding them is the listener module's job (exit status 1).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::policy::access::{AccessRules, Action, Rule, Scope, parse_scope};
use crate::policy::budget::DEFAULT_MAX_BUFFERED;
use crate::protocol::DEFAULT_MAX_LINE;
use crate::utils::logger::Level;

/// Ports opened when neither `--listen` nor a config file names any: the C
/// tutorial's three.
pub const DEFAULT_PORTS: [u16; 3] = [8001, 8002, 8003];
/// Default `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default `--idle-timeout`, in seconds.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 300;
/// Default `--line-timeout`, in seconds.
pub const DEFAULT_LINE_TIMEOUT_SECS: u64 = 60;
/// Upper bound for `--workers`, far above any sensible value, so that a typo
/// cannot ask for a million threads.
pub const MAX_WORKERS: usize = 1024;

/// `xps [CONFIG] [OPTIONS]`: the command line, as clap parses it.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "xps",
    version,
    about = "eXpServer Stage 6 in Rust: a multi-port, event-driven line-reversal server",
    long_about = "eXpServer Stage 6 in Rust: a single-process, event-driven TCP server that \
listens on several ports at once and answers every line with the line reversed.\n\n\
Without a CONFIG or --listen it listens on 0.0.0.0:8001, 0.0.0.0:8002 and 0.0.0.0:8003.",
    after_help = "Exit status: 0 after a clean shutdown (SIGINT/SIGTERM), 1 when a listener \
cannot be opened, 2 for a bad config file or bad options, 128+N when a second signal N \
cuts a graceful shutdown short."
)]
pub struct Cli {
    /// eXpServer JSON config file (xps_config.json): every listener of every
    /// server is opened.
    #[arg(value_name = "CONFIG")]
    pub config: Option<PathBuf>,

    /// Listen on HOST:PORT (repeatable; replaces the config's or default
    /// listeners). IPv6 as `[::1]:8001`. Port 0 picks a free port, logged at start.
    #[arg(short, long, value_name = "HOST:PORT", value_parser = parse_listen_arg)]
    pub listen: Vec<ListenAddr>,

    /// Event loops (threads), each with its own SO_REUSEPORT listening sockets
    /// [default: the config's "workers", else 1].
    #[arg(short, long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_WORKERS as u64))]
    pub workers: Option<u64>,

    /// Connections served at once, over all workers; more wait in the listen
    /// backlog until a slot frees [default: 10000].
    #[arg(short = 'c', long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_connections: Option<u64>,

    /// Longest line held in memory; longer lines are answered in segments of
    /// this many bytes [default: 100000].
    #[arg(short = 'm', long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..=(1 << 30)))]
    pub max_line: Option<u64>,

    /// Close connections with no traffic for this long; 0 = never
    /// [default: 300].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=(1 << 32)))]
    pub idle_timeout: Option<u64>,

    /// Close a connection whose unterminated line is not completed within
    /// this long of reading (time paused by flow control does not count; a
    /// segment of an overlong line restarts it); 0 = never [default: 60].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=(1 << 32)))]
    pub line_timeout: Option<u64>,

    /// Check the options and the config (resolving every host, binding
    /// nothing) and exit: 0 if they are good, else the start-up error and
    /// status.
    #[arg(short = 't', long)]
    pub check: bool,

    /// Serve Prometheus metrics on HOST:PORT (GET /metrics)
    /// [default: the config's "metrics", else off].
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_listen_arg)]
    pub metrics: Option<ListenAddr>,

    /// Write one JSON line per ended connection to PATH ("-" = stdout)
    /// [default: the config's "access_log", else off]. SIGUSR1 and SIGHUP
    /// reopen it.
    #[arg(long, value_name = "PATH")]
    pub access_log: Option<PathBuf>,

    /// Write the server's pid to PATH once every listener is open (and,
    /// after a SIGUSR2 upgrade, the new process's); removed at exit
    /// [default: the config's "pid_file", else none].
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,

    /// error, warn, info, debug, or trace (the event loop narrated, one line
    /// per event, accept, read and write) [default: info, or debug with
    /// XPS_DEBUG=1 or RUST_LOG=debug].
    #[arg(short = 'L', long, value_name = "LEVEL", value_parser = parse_level)]
    pub log_level: Option<Level>,

    /// Listen on HOST:PORT behind a load balancer: every connection must
    /// start with a PROXY protocol v1 or v2 header (repeatable; with
    /// --listen, replaces the config's or default listeners).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_listen_proxy_arg)]
    pub listen_proxy: Vec<ListenAddr>,

    /// Only peers in CIDR may send PROXY headers; others are refused
    /// (repeatable) [default: the config's "proxy_from", else any peer].
    #[arg(long, value_name = "CIDR", value_parser = parse_scope)]
    pub proxy_from: Vec<Scope>,

    /// Accept clients in CIDR (or "all"); --allow and --deny are checked in
    /// the order given, the first match decides, no match allows
    /// (repeatable; replaces the config's "access").
    #[arg(long, value_name = "CIDR|all", value_parser = parse_scope)]
    pub allow: Vec<Scope>,

    /// Refuse clients in CIDR (or "all") before reading anything; see --allow.
    #[arg(long, value_name = "CIDR|all", value_parser = parse_scope)]
    pub deny: Vec<Scope>,

    /// Open connections per source over all workers (IPv4 by address, IPv6
    /// by /64); 0 = no limit [default: the config's, else 0].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub max_connections_per_source: Option<u64>,

    /// Bytes held for clients (unsent replies and unterminated lines) over
    /// all connections; past it, the connections holding most are not read
    /// until it falls; 0 = no bound [default: 268435456 (256 MiB)].
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64))]
    pub max_buffered: Option<u64>,

    /// --allow and --deny in command-line order (filled by
    /// [`Cli::try_parse_ordered`]; clap's derive keeps each flag's values
    /// apart).
    #[arg(skip)]
    pub access: Vec<Rule>,
}

impl Cli {
    /// Parses `args` like `Cli::try_parse_from`, and also records the order
    /// of `--allow` and `--deny` across both flags (first match decides, so
    /// the order is the meaning).
    pub fn try_parse_ordered<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Cli::command().try_get_matches_from(args)?;
        let mut cli = Cli::from_arg_matches(&matches)?;
        let mut rules: Vec<(usize, Rule)> = Vec::new();
        for (id, action) in [("allow", Action::Allow), ("deny", Action::Deny)] {
            if let (Some(at), Some(scopes)) =
                (matches.indices_of(id), matches.get_many::<Scope>(id))
            {
                rules.extend(
                    at.zip(scopes)
                        .map(|(i, &scope)| (i, Rule { action, scope })),
                );
            }
        }
        rules.sort_by_key(|&(i, _)| i);
        cli.access = rules.into_iter().map(|(_, r)| r).collect();
        Ok(cli)
    }
}

/// One address to listen on, as the user wrote it: the host is resolved later
/// (first address, like the tutorial's `xps_getaddrinfo()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr {
    /// IP address or host name, without IPv6 brackets.
    pub host: String,
    /// TCP port; 0 only from `--listen` (an ephemeral port).
    pub port: u16,
    /// A PROXY-protocol listener (`--listen-proxy`, config
    /// `"proxy_protocol": true`): every connection starts with a header.
    pub proxy: bool,
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Limits a worker applies to the connections it accepts (a reload changes
/// them for new connections only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `--max-line`.
    pub max_line: usize,
    /// `--idle-timeout` and `--line-timeout`.
    pub timeouts: Timeouts,
}

/// The per-connection timeouts; `None` = off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// `--idle-timeout`: no byte moved either way for this long.
    pub idle: Option<Duration>,
    /// `--line-timeout`: an unterminated line held this long while reading.
    pub line: Option<Duration>,
}

/// What the server runs with, after merging options, config file and defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Addresses to open, in order, without duplicates.
    pub listeners: Vec<ListenAddr>,
    /// Number of event loops (threads).
    pub workers: usize,
    /// Connection cap over all workers.
    pub max_connections: usize,
    /// Segment size for overlong lines.
    pub max_line: usize,
    /// Idle timeout; `None` = never.
    pub idle_timeout: Option<Duration>,
    /// Line timeout; `None` = never.
    pub line_timeout: Option<Duration>,
    /// Config keys accepted but not served by this release, for one warning.
    pub ignored_keys: Vec<String>,
    /// `--metrics`: where to serve the Prometheus endpoint.
    pub metrics: Option<ListenAddr>,
    /// `--access-log`: where to write the access log (`-` = stdout).
    pub access_log: Option<PathBuf>,
    /// `--pid-file`: where to write the pid.
    pub pid_file: Option<PathBuf>,
    /// The CONFIG file, if one was given (SIGHUP reloads it).
    pub config: Option<PathBuf>,
    /// `--allow` / `--deny` (config `"access"`), in order.
    pub access: AccessRules,
    /// `--proxy-from` (config `"proxy_from"`): peers allowed to send PROXY
    /// headers; empty = any peer.
    pub proxy_from: Vec<Scope>,
    /// `--max-connections-per-source`; 0 = no limit.
    pub max_connections_per_source: usize,
    /// `--max-buffered`; 0 = no bound.
    pub max_buffered: usize,
}

/// A bad config file or option value: exit status 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file at fault, if the error is in a config file.
    pub file: Option<PathBuf>,
    /// What is wrong, in one line.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(p) => write!(f, "config file {}: {}", p.display(), self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

fn parse_level(s: &str) -> Result<Level, String> {
    Level::parse(s).ok_or_else(|| format!("'{s}' is not one of error, warn, info, debug, trace"))
}

/// Parses `HOST:PORT`, `[V6]:PORT` or `:PORT` (all interfaces). Port 0 is
/// allowed here: the kernel picks a free port. The host part is checked by
/// [`parse_host`], as the config file's hosts are.
pub fn parse_listen_arg(s: &str) -> Result<ListenAddr, String> {
    // Split off the port at the last colon, or after the closing bracket of
    // a bracketed host (whose colons are the address's). The host part keeps
    // its brackets, for `parse_host`.
    let (host, port) = match s.trim_start().strip_prefix('[') {
        Some(rest) => {
            let close = rest
                .find("]:")
                .ok_or_else(|| format!("'{s}' is not [IPV6]:PORT"))?;
            let at = s.len() - rest.len() + close + 1;
            (&s[..at], &s[at + 1..])
        }
        None => s
            .rsplit_once(':')
            .ok_or_else(|| format!("'{s}' is not HOST:PORT"))?,
    };
    let host = parse_host(host, HostSource::ListenArg).map_err(|e| format!("'{s}': host {e}"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("'{s}': port '{port}' is not a number in 0-65535"))?;
    Ok(ListenAddr {
        host,
        port,
        proxy: false,
    })
}

/// `--listen-proxy HOST:PORT`: as [`parse_listen_arg`], marked PROXY.
pub fn parse_listen_proxy_arg(s: &str) -> Result<ListenAddr, String> {
    parse_listen_arg(s).map(|a| ListenAddr { proxy: true, ..a })
}

/// Where a host was written. One rule set serves both, with two
/// differences that come from the syntax of each place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostSource {
    /// `--listen HOST:PORT`: an empty host (`:8001`, no brackets) means all
    /// interfaces, and an IPv6 address needs its brackets, or its colons
    /// would be taken for the port's.
    ListenArg,
    /// A config file's `"host"`: a field of its own, so a bare IPv6 address
    /// is unambiguous; an empty host is an error.
    ConfigFile,
}

/// Why a host was rejected; displayed as the rest of a sentence that starts
/// with "host" (`host is empty`), after the place that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    /// Nothing but spaces, with or without brackets (`""`, `[]`, `[ ]`).
    Empty,
    /// Brackets around something that is not an IPv6 address (`[localhost]`).
    BracketsNotIpv6(String),
    /// A bracket left over once one enclosing pair is removed (`[::1`, `a]`).
    StrayBracket(String),
    /// An IPv6 address without brackets in `--listen` (`::1:8001`).
    Ipv6WithoutBrackets(String),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::Empty => f.write_str("is empty"),
            HostError::BracketsNotIpv6(h) => write!(
                f,
                "'[{h}]' is not an IPv6 address: brackets are only for IPv6, as [::1]"
            ),
            HostError::StrayBracket(h) => write!(f, "'{h}' has an unmatched bracket"),
            HostError::Ipv6WithoutBrackets(h) => {
                write!(f, "'{h}': write IPv6 addresses in brackets, as [::1]:8001")
            }
        }
    }
}

/// Validates and normalises a host as the user wrote it, for `--listen`
/// and for the config file alike: trims spaces, removes one pair of
/// enclosing brackets (which must hold an IPv6 address, i.e. something with
/// a colon) and the spaces inside them, and rejects an empty host and any
/// other bracket. Returns the host to resolve, without brackets: `0.0.0.0`
/// for an empty host without brackets in `--listen` (`:8001`).
pub fn parse_host(raw: &str, source: HostSource) -> Result<String, HostError> {
    let trimmed = raw.trim();
    let (host, bracketed) = match trimmed.strip_prefix('[') {
        Some(rest) => match rest.strip_suffix(']') {
            Some(inner) => (inner.trim(), true),
            None => return Err(HostError::StrayBracket(trimmed.to_string())),
        },
        None => (trimmed, false),
    };
    if host.contains(['[', ']']) {
        return Err(HostError::StrayBracket(trimmed.to_string()));
    }
    let ipv6 = host.contains(':');
    match (host.is_empty(), bracketed, source) {
        (true, false, HostSource::ListenArg) => return Ok("0.0.0.0".to_string()),
        (true, _, _) => return Err(HostError::Empty),
        _ => {}
    }
    if bracketed && !ipv6 {
        return Err(HostError::BracketsNotIpv6(host.to_string()));
    }
    if ipv6 && !bracketed && source == HostSource::ListenArg {
        return Err(HostError::Ipv6WithoutBrackets(host.to_string()));
    }
    Ok(host.to_string())
}

/// The `xps_config.json` shape this release reads. Unknown keys at any level
/// land in `other` and are reported once, not rejected.
#[derive(Debug, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    #[allow(dead_code)] // read for validation only; nothing serves it yet
    server_name: Option<String>,
    #[serde(default)]
    workers: Option<u64>,
    #[serde(default)]
    metrics: Option<String>,
    #[serde(default)]
    access_log: Option<String>,
    #[serde(default)]
    pid_file: Option<String>,
    #[serde(default)]
    max_connections: Option<u64>,
    #[serde(default)]
    max_line: Option<u64>,
    #[serde(default)]
    idle_timeout: Option<u64>,
    #[serde(default)]
    line_timeout: Option<u64>,
    access: Option<Vec<Map<String, Value>>>,
    #[serde(default)]
    proxy_from: Option<Vec<String>>,
    #[serde(default)]
    max_connections_per_source: Option<u64>,
    #[serde(default)]
    max_buffered: Option<u64>,
    servers: Vec<ServerSection>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct ServerSection {
    listeners: Vec<ListenerSection>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct ListenerSection {
    host: String,
    port: i64,
    #[serde(default)]
    proxy_protocol: bool,
    #[serde(flatten)]
    other: Map<String, Value>,
}

/// What a config file contributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileConfig {
    /// Every listener of every server, in file order.
    pub listeners: Vec<ListenAddr>,
    /// `workers`, if present.
    pub workers: Option<usize>,
    /// Names of keys accepted but not served (deduplicated, sorted).
    pub ignored_keys: Vec<String>,
    /// `metrics`, if present.
    pub metrics: Option<ListenAddr>,
    /// `access_log`, if present.
    pub access_log: Option<PathBuf>,
    /// `pid_file`, if present.
    pub pid_file: Option<PathBuf>,
    /// `max_connections`, `max_line`, `idle_timeout`, `line_timeout` (in
    /// seconds), each if present: the same limits as the options of those
    /// names, which win over them.
    pub limits: FileLimits,
    /// `access`, if present, in order.
    pub access: Option<Vec<Rule>>,
    /// `proxy_from`, if present.
    pub proxy_from: Option<Vec<Scope>>,
    /// `max_connections_per_source`, if present.
    pub max_connections_per_source: Option<usize>,
    /// `max_buffered`, if present.
    pub max_buffered: Option<usize>,
}

/// The limits a config file may set (top-level keys named like the
/// options).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileLimits {
    /// `max_connections`.
    pub max_connections: Option<u64>,
    /// `max_line`.
    pub max_line: Option<u64>,
    /// `idle_timeout`, seconds (0 = never).
    pub idle_timeout: Option<u64>,
    /// `line_timeout`, seconds (0 = never).
    pub line_timeout: Option<u64>,
}

/// `value` if it is within `range`, else the error naming `key`.
fn in_range(
    key: &str,
    value: Option<u64>,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, String> {
    match value {
        Some(v) if !range.contains(&v) => Err(format!(
            "{key}: {v} is out of range {}-{}",
            range.start(),
            range.end()
        )),
        v => Ok(v),
    }
}

/// The config's `"access"` list: each entry one `{"allow": SCOPE}` or
/// `{"deny": SCOPE}`; errors name the entry (`access[1].deny: ...`).
fn parse_access(list: &[Map<String, Value>]) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let mut keys = entry.iter();
        let (key, value) = match (keys.next(), keys.next()) {
            (Some(kv), None) => kv,
            _ => {
                return Err(format!(
                    "access[{i}]: must be one {{\"allow\": CIDR}} or {{\"deny\": CIDR}}"
                ));
            }
        };
        let action = match key.as_str() {
            "allow" => Action::Allow,
            "deny" => Action::Deny,
            other => {
                return Err(format!(
                    "access[{i}]: '{other}' is not \"allow\" or \"deny\""
                ));
            }
        };
        let text = value
            .as_str()
            .ok_or_else(|| format!("access[{i}].{key}: must be a string (a CIDR or \"all\")"))?;
        let scope = parse_scope(text).map_err(|e| format!("access[{i}].{key}: {e}"))?;
        rules.push(Rule { action, scope });
    }
    Ok(rules)
}
/// Reads and checks a config file.
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: Some(path.to_path_buf()),
        message: format!("cannot read it: {}", crate::os_reason(&e)),
    })?;
    parse_file(&text).map_err(|message| ConfigError {
        file: Some(path.to_path_buf()),
        message,
    })
}

/// Parses config text; the error is one line, with line:column for JSON and
/// type errors and a path like `servers[0].listeners[1].port` for bad values.
pub fn parse_file(text: &str) -> Result<FileConfig, String> {
    let file: ConfigFile = serde_json::from_str(text).map_err(|e| {
        let what = e.to_string();
        // serde_json ends its messages with " at line L column C"; say it our way.
        let what = what
            .rsplit_once(" at line ")
            .map_or(what.as_str(), |(head, _)| head)
            .to_string();
        format!("line {}:{}: {}", e.line(), e.column(), what)
    })?;
    let mut ignored = BTreeSet::new();
    ignored.extend(file.other.keys().cloned());
    let workers = match file.workers {
        None => None,
        Some(n) if (1..=MAX_WORKERS as u64).contains(&n) => Some(n as usize),
        Some(n) => return Err(format!("workers: {n} is out of range 1-{MAX_WORKERS}")),
    };
    let mut listeners = Vec::new();
    for (si, server) in file.servers.iter().enumerate() {
        ignored.extend(server.other.keys().cloned());
        for (li, l) in server.listeners.iter().enumerate() {
            ignored.extend(l.other.keys().cloned());
            let at = format!("servers[{si}].listeners[{li}]");
            if !(1..=65535).contains(&l.port) {
                return Err(format!("{at}.port: {} is out of range 1-65535", l.port));
            }
            let host = parse_host(&l.host, HostSource::ConfigFile)
                .map_err(|e| format!("{at}.host {e}"))?;
            push_unique(
                &mut listeners,
                ListenAddr {
                    host,
                    port: l.port as u16,
                    proxy: l.proxy_protocol,
                },
            )
            .map_err(|e| format!("{at}: {e}"))?;
        }
    }
    if listeners.is_empty() {
        return Err("no listeners: servers[].listeners[] names none".to_string());
    }
    let metrics = file
        .metrics
        .as_deref()
        .map(|m| parse_listen_arg(m).map_err(|e| format!("metrics: {e}")))
        .transpose()?;
    let access_log = match file.access_log.as_deref() {
        Some("") => return Err("access_log is empty".to_string()),
        other => other.map(PathBuf::from),
    };
    let pid_file = match file.pid_file.as_deref() {
        Some("") => return Err("pid_file is empty".to_string()),
        other => other.map(PathBuf::from),
    };
    let limits = FileLimits {
        max_connections: in_range("max_connections", file.max_connections, 1..=10_000_000)?,
        max_line: in_range("max_line", file.max_line, 1..=(1 << 30))?,
        idle_timeout: in_range("idle_timeout", file.idle_timeout, 0..=(1 << 32))?,
        line_timeout: in_range("line_timeout", file.line_timeout, 0..=(1 << 32))?,
    };
    let access = file.access.as_deref().map(parse_access).transpose()?;
    let proxy_from = file
        .proxy_from
        .as_ref()
        .map(|list| {
            list.iter()
                .enumerate()
                .map(|(i, s)| parse_scope(s).map_err(|e| format!("proxy_from[{i}]: {e}")))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let max_connections_per_source = match file.max_connections_per_source {
        Some(n) if n > 10_000_000 => {
            return Err(format!(
                "max_connections_per_source: {n} is out of range 0-10000000"
            ));
        }
        other => other.map(|n| n as usize),
    };
    let max_buffered = file
        .max_buffered
        .map(|n| usize::try_from(n).map_err(|_| format!("max_buffered: {n} is too large")))
        .transpose()?;
    Ok(FileConfig {
        listeners,
        workers,
        ignored_keys: ignored.into_iter().collect(),
        metrics,
        access_log,
        pid_file,
        limits,
        access,
        proxy_from,
        max_connections_per_source,
        max_buffered,
    })
}

/// Adds `addr` unless it is already listed. Port 0 ("any free port") is
/// never a duplicate: each one is a listener of its own. The same address
/// asked for as a plain and as a PROXY listener is an error: one socket
/// cannot be both.
fn push_unique(list: &mut Vec<ListenAddr>, addr: ListenAddr) -> Result<(), String> {
    if addr.port == 0 {
        list.push(addr);
        return Ok(());
    }
    match list
        .iter()
        .find(|a| a.host == addr.host && a.port == addr.port)
    {
        None => list.push(addr),
        Some(a) if a.proxy != addr.proxy => {
            return Err(format!(
                "{addr} is both a plain and a PROXY-protocol listener"
            ));
        }
        Some(_) => {}
    }
    Ok(())
}

impl Settings {
    /// The limits a worker applies to new connections.
    pub fn limits(&self) -> Limits {
        Limits {
            max_line: self.max_line,
            timeouts: Timeouts {
                idle: self.idle_timeout,
                line: self.line_timeout,
            },
        }
    }

    /// Merges the command line with its config file (if any) and the defaults.
    pub fn from_cli(cli: Cli) -> Result<Settings, ConfigError> {
        let file = cli.config.as_deref().map(load_file).transpose()?;
        let listeners = if !cli.listen.is_empty() || !cli.listen_proxy.is_empty() {
            let mut v = Vec::new();
            for a in cli.listen.into_iter().chain(cli.listen_proxy) {
                push_unique(&mut v, a).map_err(|message| ConfigError {
                    file: None,
                    message: format!("--listen-proxy: {message}"),
                })?;
            }
            v
        } else if let Some(f) = &file {
            f.listeners.clone()
        } else {
            DEFAULT_PORTS
                .iter()
                .map(|&port| ListenAddr {
                    host: "0.0.0.0".to_string(),
                    port,
                    proxy: false,
                })
                .collect()
        };
        let workers = cli
            .workers
            .map(|n| n as usize)
            .or(file.as_ref().and_then(|f| f.workers))
            .unwrap_or(1);
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        let fl = file.as_ref().map(|f| f.limits).unwrap_or_default();
        let access = if !cli.access.is_empty() {
            cli.access
        } else if cli.allow.is_empty() || cli.deny.is_empty() {
            // One kind of rule only: the order within a flag is kept.
            let allow = cli.allow.iter().map(|&scope| Rule {
                action: Action::Allow,
                scope,
            });
            let deny = cli.deny.iter().map(|&scope| Rule {
                action: Action::Deny,
                scope,
            });
            allow.chain(deny).collect()
        } else {
            // Both flags, parsed without their relative order: refuse to
            // guess an access policy.
            return Err(ConfigError {
                file: None,
                message: "--allow and --deny together need Cli::try_parse_ordered".to_string(),
            });
        };
        let access = match access.is_empty() {
            false => access,
            true => file
                .as_ref()
                .and_then(|f| f.access.clone())
                .unwrap_or_default(),
        };
        let proxy_from = match cli.proxy_from.is_empty() {
            false => cli.proxy_from,
            true => file
                .as_ref()
                .and_then(|f| f.proxy_from.clone())
                .unwrap_or_default(),
        };
        let max_buffered = match cli.max_buffered {
            Some(n) => usize::try_from(n).map_err(|_| ConfigError {
                file: None,
                message: format!("--max-buffered: {n} is too large"),
            })?,
            None => file
                .as_ref()
                .and_then(|f| f.max_buffered)
                .unwrap_or(DEFAULT_MAX_BUFFERED),
        };
        Ok(Settings {
            access: AccessRules::new(access),
            proxy_from,
            max_connections_per_source: cli
                .max_connections_per_source
                .map(|n| n as usize)
                .or(file.as_ref().and_then(|f| f.max_connections_per_source))
                .unwrap_or(0),
            max_buffered,
            listeners,
            workers,
            max_connections: cli
                .max_connections
                .or(fl.max_connections)
                .map_or(DEFAULT_MAX_CONNECTIONS, |n| n as usize),
            max_line: cli
                .max_line
                .or(fl.max_line)
                .map_or(DEFAULT_MAX_LINE, |n| n as usize),
            idle_timeout: secs(
                cli.idle_timeout
                    .or(fl.idle_timeout)
                    .unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS),
            ),
            line_timeout: secs(
                cli.line_timeout
                    .or(fl.line_timeout)
                    .unwrap_or(DEFAULT_LINE_TIMEOUT_SECS),
            ),
            config: cli.config.clone(),
            metrics: cli
                .metrics
                .or_else(|| file.as_ref().and_then(|f| f.metrics.clone())),
            access_log: cli
                .access_log
                .or_else(|| file.as_ref().and_then(|f| f.access_log.clone())),
            pid_file: cli
                .pid_file
                .or_else(|| file.as_ref().and_then(|f| f.pid_file.clone())),
            ignored_keys: file.map(|f| f.ignored_keys).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TESTER: &str = r#"{
        "server_name": "eXpServer",
        "workers": 4,
        "servers": [
            {
                "listeners": [
                    { "host": "0.0.0.0", "port": 8001 },
                    { "host": "0.0.0.0", "port": 8002 },
                    { "host": "0.0.0.0", "port": 8003 },
                    { "host": "0.0.0.0", "port": 8004 }
                ],
                "routes": [
                    { "req_path": "/", "type": "file_serve", "dir_path": "../public",
                      "index": ["index.html"] }
                ],
                "gzip_enable": true,
                "gzip_level": 8
            }
        ]
    }"#;

    fn cli(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_ordered(std::iter::once("xps").chain(args.iter().copied()))
    }

    #[test]
    fn tester_config_opens_8001_to_8004_and_names_ignored_keys() {
        let f = parse_file(TESTER).unwrap();
        let ports: Vec<u16> = f.listeners.iter().map(|l| l.port).collect();
        assert_eq!(ports, [8001, 8002, 8003, 8004]);
        assert!(f.listeners.iter().all(|l| l.host == "0.0.0.0"));
        assert_eq!(f.workers, Some(4));
        assert_eq!(f.ignored_keys, ["gzip_enable", "gzip_level", "routes"]);
    }

    #[test]
    fn json_errors_give_line_and_column() {
        let e = parse_file("{\n  \"servers\": [\n").unwrap_err();
        assert!(e.starts_with("line 3:0: "), "{e}");
        let e = parse_file("{ \"servers\": 5 }").unwrap_err();
        assert!(e.contains("line 1:") && e.contains("invalid type"), "{e}");
        let e =
            parse_file(r#"{"servers":[{"listeners":[{"host":"a","port":"80"}]}]}"#).unwrap_err();
        assert!(e.contains("invalid type: string \"80\""), "{e}");
    }

    #[test]
    fn bad_values_are_named_by_path() {
        let e = parse_file(r#"{"servers":[{"listeners":[{"host":"a","port":0}]}]}"#).unwrap_err();
        assert_eq!(e, "servers[0].listeners[0].port: 0 is out of range 1-65535");
        let e =
            parse_file(r#"{"servers":[{"listeners":[{"host":"a","port":70000}]}]}"#).unwrap_err();
        assert_eq!(
            e,
            "servers[0].listeners[0].port: 70000 is out of range 1-65535"
        );
        let e = parse_file(r#"{"servers":[{"listeners":[{"host":" ","port":1}]}]}"#).unwrap_err();
        assert_eq!(e, "servers[0].listeners[0].host is empty");
        // Found by the config fuzzer: brackets around nothing.
        let e = parse_file(r#"{"servers":[{"listeners":[{"host":"[ ]","port":1}]}]}"#).unwrap_err();
        assert_eq!(e, "servers[0].listeners[0].host is empty");
        let e = parse_file(r#"{"servers":[]}"#).unwrap_err();
        assert!(e.starts_with("no listeners"), "{e}");
        let e = parse_file(r#"{"servers":[{"listeners":[]}]}"#).unwrap_err();
        assert!(e.starts_with("no listeners"), "{e}");
        let e = parse_file(r#"{"workers":0,"servers":[{"listeners":[{"host":"a","port":1}]}]}"#)
            .unwrap_err();
        assert_eq!(e, "workers: 0 is out of range 1-1024");
        assert!(
            parse_file("{}")
                .unwrap_err()
                .contains("missing field `servers`")
        );
    }

    #[test]
    fn duplicate_listeners_open_once_and_brackets_are_accepted() {
        let f = parse_file(
            r#"{"servers":[{"listeners":[{"host":"[::1]","port":9}]},
                           {"listeners":[{"host":"::1","port":9}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            f.listeners,
            [ListenAddr {
                host: "::1".into(),
                port: 9,
                proxy: false,
            }]
        );
        assert_eq!(f.listeners[0].to_string(), "[::1]:9");
    }

    #[test]
    fn repeated_port_zero_is_several_listeners() {
        let s = Settings::from_cli(
            cli(&[
                "-l",
                "127.0.0.1:0",
                "-l",
                "127.0.0.1:0",
                "-l",
                "127.0.0.1:9",
                "-l",
                "127.0.0.1:9",
            ])
            .unwrap(),
        )
        .unwrap();
        let ports: Vec<u16> = s.listeners.iter().map(|l| l.port).collect();
        assert_eq!(ports, [0, 0, 9]);
    }

    #[test]
    fn listen_argument_forms() {
        let p = |s| parse_listen_arg(s);
        assert_eq!(p("127.0.0.1:80").unwrap().to_string(), "127.0.0.1:80");
        assert_eq!(p("[::1]:8001").unwrap().host, "::1");
        assert_eq!(p(":8001").unwrap().host, "0.0.0.0");
        assert_eq!(p("localhost:0").unwrap().port, 0);
        assert!(p("8001").is_err());
        assert!(p("::1:8001").is_err());
        assert!(p("host:99999").is_err());
        assert!(p("[::1]8001").is_err());
        assert_eq!(p(" [::1]:9").unwrap().host, "::1");
        assert_eq!(p("[ ::1 ]:9").unwrap().host, "::1");
    }

    /// Issue 8, defect 10: `--listen '[]:0'` bound 0.0.0.0, while the config
    /// rejected the same host. One function decides for both now.
    #[test]
    fn empty_bracketed_host_is_rejected_by_both_parsers() {
        for arg in ["[]:0", "[ ]:0", "[]:8001"] {
            assert_eq!(
                parse_listen_arg(arg).unwrap_err(),
                format!("'{arg}': host is empty"),
            );
        }
        for host in ["", " ", "[]", "[ ]"] {
            let text = format!(r#"{{"servers":[{{"listeners":[{{"host":"{host}","port":1}}]}}]}}"#);
            assert_eq!(
                parse_file(&text).unwrap_err(),
                "servers[0].listeners[0].host is empty",
                "host {host:?}"
            );
        }
        // An empty host without brackets is still "all interfaces" in --listen.
        assert_eq!(parse_listen_arg(":8001").unwrap().host, "0.0.0.0");
        assert_eq!(parse_listen_arg(" :8001").unwrap().host, "0.0.0.0");
    }

    #[test]
    fn hosts_are_checked_the_same_way_in_both_places() {
        use HostSource::{ConfigFile, ListenArg};
        for source in [ListenArg, ConfigFile] {
            let h = |raw| parse_host(raw, source);
            assert_eq!(h(" localhost ").unwrap(), "localhost");
            assert_eq!(h("[::1]").unwrap(), "::1");
            assert_eq!(h(" [ fe80::1 ] ").unwrap(), "fe80::1");
            assert_eq!(h("[]"), Err(HostError::Empty));
            assert_eq!(h("[  ]"), Err(HostError::Empty));
            assert_eq!(
                h("[localhost]"),
                Err(HostError::BracketsNotIpv6("localhost".into()))
            );
            assert_eq!(
                h("[127.0.0.1]"),
                Err(HostError::BracketsNotIpv6("127.0.0.1".into()))
            );
            for stray in ["[::1", "::1]", "[[::1]]", "a]b", "[a[b]"] {
                assert_eq!(
                    h(stray),
                    Err(HostError::StrayBracket(stray.into())),
                    "{stray}"
                );
            }
        }
        // The two differences.
        assert_eq!(parse_host("", ListenArg).unwrap(), "0.0.0.0");
        assert_eq!(parse_host("", ConfigFile), Err(HostError::Empty));
        assert_eq!(parse_host("::1", ConfigFile).unwrap(), "::1");
        assert_eq!(
            parse_host("::1", ListenArg),
            Err(HostError::Ipv6WithoutBrackets("::1".into()))
        );
        // The messages read as sentences after the place.
        assert_eq!(
            parse_listen_arg("[localhost]:80").unwrap_err(),
            "'[localhost]:80': host '[localhost]' is not an IPv6 address: brackets are only for IPv6, as [::1]"
        );
        assert_eq!(
            parse_listen_arg("::1:8001").unwrap_err(),
            "'::1:8001': host '::1': write IPv6 addresses in brackets, as [::1]:8001"
        );
        let e = parse_file(r#"{"servers":[{"listeners":[{"host":"[a.b]","port":1}]}]}"#);
        assert_eq!(
            e.unwrap_err(),
            "servers[0].listeners[0].host '[a.b]' is not an IPv6 address: brackets are only for IPv6, as [::1]"
        );
    }

    #[test]
    fn defaults_are_the_tutorials() {
        let s = Settings::from_cli(cli(&[]).unwrap()).unwrap();
        let l: Vec<String> = s.listeners.iter().map(ToString::to_string).collect();
        assert_eq!(l, ["0.0.0.0:8001", "0.0.0.0:8002", "0.0.0.0:8003"]);
        assert_eq!(s.workers, 1);
        assert_eq!(s.max_connections, 10_000);
        assert_eq!(s.max_line, 100_000);
        assert_eq!(s.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(s.line_timeout, Some(Duration::from_secs(60)));
        let s = Settings::from_cli(cli(&["--line-timeout", "0"]).unwrap()).unwrap();
        assert_eq!(s.line_timeout, None);
    }

    #[test]
    fn options_beat_the_file() {
        let path = std::env::temp_dir().join(format!("xps-cfg-{}.json", std::process::id()));
        std::fs::write(&path, TESTER).unwrap();
        let p = path.to_str().unwrap();
        let s = Settings::from_cli(cli(&[p]).unwrap()).unwrap();
        assert_eq!(s.listeners.len(), 4);
        assert_eq!(s.workers, 4);
        let s = Settings::from_cli(
            cli(&[
                p,
                "--listen",
                "127.0.0.1:1",
                "-w",
                "2",
                "--idle-timeout",
                "0",
                "-m",
                "10",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(s.listeners.len(), 1);
        assert_eq!(s.workers, 2);
        assert_eq!(s.idle_timeout, None);
        assert_eq!(s.max_line, 10);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bad_options_are_usage_errors() {
        for args in [
            &["--workers", "0"][..],
            &["--max-line", "0"],
            &["--max-connections", "0"],
            &["--listen", "nope"],
            &["--log-level", "loud"],
            &["--idle-timeout", "-1"],
            &["--line-timeout", "x"],
            &["--frobnicate"],
        ] {
            let e = cli(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn limits_come_from_the_file_unless_an_option_says_otherwise() {
        let text = r#"{"idle_timeout":7,"line_timeout":0,"max_line":10,"max_connections":5,
                       "servers":[{"listeners":[{"host":"a","port":1}]}]}"#;
        let path = temp_config(text);
        let p = path.to_str().unwrap();
        let s = Settings::from_cli(cli(&[p]).unwrap()).unwrap();
        assert_eq!(s.idle_timeout, Some(Duration::from_secs(7)));
        assert_eq!(s.line_timeout, None);
        assert_eq!((s.max_line, s.max_connections), (10, 5));
        let s = Settings::from_cli(cli(&[p, "--idle-timeout", "9"]).unwrap()).unwrap();
        assert_eq!(s.idle_timeout, Some(Duration::from_secs(9)));
        std::fs::remove_file(&path).unwrap();
        let e = parse_file(r#"{"max_line":0,"servers":[{"listeners":[{"host":"a","port":1}]}]}"#)
            .unwrap_err();
        assert_eq!(e, "max_line: 0 is out of range 1-1073741824");
    }

    fn temp_config(text: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("xps-cfg-{}-{n}.json", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn metrics_and_access_log_come_from_options_or_the_file() {
        let f = parse_file(
            r#"{"metrics":"127.0.0.1:9100","access_log":"/tmp/a.log",
                "servers":[{"listeners":[{"host":"a","port":1}]}]}"#,
        )
        .unwrap();
        assert_eq!(f.metrics.unwrap().to_string(), "127.0.0.1:9100");
        assert_eq!(f.access_log.unwrap(), PathBuf::from("/tmp/a.log"));
        assert!(f.ignored_keys.is_empty(), "{:?}", f.ignored_keys);
        let e =
            parse_file(r#"{"metrics":"nope","servers":[{"listeners":[{"host":"a","port":1}]}]}"#)
                .unwrap_err();
        assert_eq!(e, "metrics: 'nope' is not HOST:PORT");
        let s = Settings::from_cli(cli(&["--metrics", "[::1]:0", "--access-log", "-"]).unwrap())
            .unwrap();
        assert_eq!(s.metrics.unwrap().to_string(), "[::1]:0");
        assert_eq!(s.access_log.unwrap(), PathBuf::from("-"));
        let f = parse_file(
            r#"{"pid_file":"/run/xps/xps.pid","servers":[{"listeners":[{"host":"a","port":1}]}]}"#,
        )
        .unwrap();
        assert_eq!(f.pid_file.unwrap(), PathBuf::from("/run/xps/xps.pid"));
        let s = Settings::from_cli(cli(&["--pid-file", "x.pid"]).unwrap()).unwrap();
        assert_eq!(s.pid_file.unwrap(), PathBuf::from("x.pid"));
        assert!(cli(&["-t"]).unwrap().check, "-t is --check, as nginx -t");
    }

    fn rules_of(s: &Settings) -> Vec<String> {
        s.access.rules().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn listen_proxy_is_a_listener_marked_proxy() {
        let s = Settings::from_cli(
            cli(&[
                "--listen",
                "127.0.0.1:1",
                "--listen-proxy",
                "127.0.0.1:2",
                "--listen-proxy",
                "[::1]:0",
            ])
            .unwrap(),
        )
        .unwrap();
        let l: Vec<(String, bool)> = s
            .listeners
            .iter()
            .map(|l| (l.to_string(), l.proxy))
            .collect();
        assert_eq!(
            l,
            [
                ("127.0.0.1:1".to_string(), false),
                ("127.0.0.1:2".to_string(), true),
                ("[::1]:0".to_string(), true),
            ]
        );
        // --listen-proxy alone also replaces the defaults.
        let s = Settings::from_cli(cli(&["--listen-proxy", "127.0.0.1:3"]).unwrap()).unwrap();
        assert_eq!(s.listeners.len(), 1);
        assert!(s.listeners[0].proxy);
        // One address cannot be both.
        let e = Settings::from_cli(
            cli(&["--listen", "127.0.0.1:4", "--listen-proxy", "127.0.0.1:4"]).unwrap(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--listen-proxy: 127.0.0.1:4 is both a plain and a PROXY-protocol listener"
        );
        assert_eq!(cli(&["--listen-proxy", "nope"]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn config_listeners_can_ask_for_the_proxy_protocol() {
        let f = parse_file(
            r#"{"servers":[{"listeners":[{"host":"a","port":1,"proxy_protocol":true},
                                         {"host":"a","port":2}]}]}"#,
        )
        .unwrap();
        assert!(f.listeners[0].proxy && !f.listeners[1].proxy);
        assert!(f.ignored_keys.is_empty(), "{:?}", f.ignored_keys);
        let e = parse_file(
            r#"{"servers":[{"listeners":[{"host":"a","port":1,"proxy_protocol":"yes"}]}]}"#,
        )
        .unwrap_err();
        assert!(
            e.starts_with("line 1:") && e.contains("expected a boolean"),
            "{e}"
        );
        let e = parse_file(
            r#"{"servers":[{"listeners":[{"host":"a","port":1,"proxy_protocol":true}]},
                           {"listeners":[{"host":"a","port":1}]}]}"#,
        )
        .unwrap_err();
        assert_eq!(
            e,
            "servers[1].listeners[0]: a:1 is both a plain and a PROXY-protocol listener"
        );
    }

    #[test]
    fn allow_and_deny_keep_their_order_across_both_flags() {
        let s = Settings::from_cli(
            cli(&[
                "--allow",
                "127.0.0.1",
                "--deny",
                "10.0.0.0/8",
                "--allow",
                "10.1.0.0/16",
                "--deny",
                "all",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            rules_of(&s),
            [
                "allow 127.0.0.1/32",
                "deny 10.0.0.0/8",
                "allow 10.1.0.0/16",
                "deny all"
            ]
        );
        assert!(s.access.allows("127.0.0.1".parse().unwrap()));
        assert!(!s.access.allows("10.1.2.3".parse().unwrap()));
        assert!(!s.access.allows("127.0.0.2".parse().unwrap()));
        let s =
            Settings::from_cli(cli(&["--deny", "all", "--allow", "127.0.0.1"]).unwrap()).unwrap();
        assert_eq!(rules_of(&s), ["deny all", "allow 127.0.0.1/32"]);
        // Parsed by clap's derive alone, the relative order is lost: refused,
        // not guessed.
        let plain = Cli::try_parse_from(["xps", "--deny", "all", "--allow", "::1"]).unwrap();
        assert!(Settings::from_cli(plain).is_err());
        let plain = Cli::try_parse_from(["xps", "--deny", "10.0.0.0/8", "--deny", "all"]).unwrap();
        assert_eq!(
            rules_of(&Settings::from_cli(plain).unwrap()),
            ["deny 10.0.0.0/8", "deny all"]
        );
        // Bad scopes are usage errors (exit 2) naming the text.
        for bad in [
            &["--allow", "10.1.2.3/8"][..],
            &["--deny", "nope"],
            &["--proxy-from", "1.2.3.4/33"],
        ] {
            let e = cli(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
        let e = cli(&["--allow", "10.1.2.3/8"]).unwrap_err().to_string();
        assert!(e.contains("host bits set"), "{e}");
    }

    #[test]
    fn access_and_proxy_from_come_from_the_file_unless_given() {
        let text = r#"{"access":[{"allow":"10.0.0.0/8"},{"deny":"all"}],
                       "proxy_from":["127.0.0.1","::1"],
                       "max_connections_per_source":3,"max_buffered":1048576,
                       "servers":[{"listeners":[{"host":"a","port":1}]}]}"#;
        let f = parse_file(text).unwrap();
        assert!(f.ignored_keys.is_empty(), "{:?}", f.ignored_keys);
        let path = temp_config(text);
        let p = path.to_str().unwrap();
        let s = Settings::from_cli(cli(&[p]).unwrap()).unwrap();
        assert_eq!(rules_of(&s), ["allow 10.0.0.0/8", "deny all"]);
        let from: Vec<String> = s.proxy_from.iter().map(ToString::to_string).collect();
        assert_eq!(from, ["127.0.0.1/32", "::1/128"]);
        assert_eq!(s.max_connections_per_source, 3);
        assert_eq!(s.max_buffered, 1 << 20);
        let s = Settings::from_cli(
            cli(&[
                p,
                "--deny",
                "127.0.0.0/8",
                "--proxy-from",
                "10.0.0.0/8",
                "--max-connections-per-source",
                "0",
                "--max-buffered",
                "0",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(rules_of(&s), ["deny 127.0.0.0/8"]);
        assert_eq!(s.proxy_from.len(), 1);
        assert_eq!(s.max_connections_per_source, 0);
        assert_eq!(s.max_buffered, 0);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bad_access_entries_are_named_by_path() {
        let with = |extra: &str| {
            parse_file(&format!(
                r#"{{{extra},"servers":[{{"listeners":[{{"host":"a","port":1}}]}}]}}"#
            ))
        };
        assert_eq!(
            with(r#""access":[{"allow":"all"},{"deny":"10.1.2.3/8"}]"#).unwrap_err(),
            "access[1].deny: '10.1.2.3/8' has host bits set: write 10.0.0.0/8 (or /32 for one address)"
        );
        assert_eq!(
            with(r#""access":[{"permit":"all"}]"#).unwrap_err(),
            "access[0]: 'permit' is not \"allow\" or \"deny\""
        );
        assert_eq!(
            with(r#""access":[{"allow":"all","deny":"all"}]"#).unwrap_err(),
            "access[0]: must be one {\"allow\": CIDR} or {\"deny\": CIDR}"
        );
        assert_eq!(
            with(r#""access":[{}]"#).unwrap_err(),
            "access[0]: must be one {\"allow\": CIDR} or {\"deny\": CIDR}"
        );
        assert_eq!(
            with(r#""access":[{"allow":8}]"#).unwrap_err(),
            "access[0].allow: must be a string (a CIDR or \"all\")"
        );
        assert!(
            with(r#""access":{"allow":"all"}"#)
                .unwrap_err()
                .starts_with("line 1:")
        );
        assert_eq!(
            with(r#""proxy_from":["10.0.0.1","x"]"#).unwrap_err(),
            "proxy_from[1]: 'x' is not an IP address, a CIDR (as 10.0.0.0/8) or 'all'"
        );
        assert_eq!(
            with(r#""max_connections_per_source":20000000"#).unwrap_err(),
            "max_connections_per_source: 20000000 is out of range 0-10000000"
        );
        assert!(
            with(r#""max_buffered":-1"#)
                .unwrap_err()
                .starts_with("line 1:")
        );
        for bad in [
            &["--max-buffered", "-1"][..],
            &["--max-buffered", "lots"],
            &["--max-connections-per-source", "x"],
        ] {
            assert_eq!(cli(bad).unwrap_err().exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn admission_defaults_are_the_specs() {
        let s = Settings::from_cli(cli(&[]).unwrap()).unwrap();
        assert!(s.access.is_empty());
        assert!(s.proxy_from.is_empty());
        assert_eq!(s.max_connections_per_source, 0);
        assert_eq!(s.max_buffered, 256 << 20);
        assert!(s.listeners.iter().all(|l| !l.proxy));
    }

    #[test]
    fn missing_file_names_the_file() {
        let e = Settings::from_cli(cli(&["/nonexistent/xps.json"]).unwrap()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config file /nonexistent/xps.json: cannot read it: No such file or directory"
        );
    }
}
