//! `xps-bench`: a single-threaded, edge-triggered (mio) load generator for
//! the line-reversal protocol of xps and for the comparison peers.
//!
//! Modes (see `--help`):
//! * `lines`: C connections, each keeping P lines of N bytes in flight;
//!   every reply is verified; per-line latency (send → reply complete).
//! * `bulk`: C connections streaming N-byte lines as fast as the sockets
//!   take them; every reply byte verified; MB/s.
//! * `churn`: C slots, each connect → one line → reply → close, repeated;
//!   connections/s and connect → reply latency.
//! * `idle`: open C connections (at most `--max-connecting` at once), verify
//!   each with one round trip, hold them, verify again; RSS per connection.
//! * `upgrade`: C idle and `--busy` ping-ponging connections and a 5 ms
//!   pinger while the server at `--pid-file` upgrades its binary (SIGUSR2);
//!   ms to the old process's exit and the longest waits for replies.
//!
//! Prints one JSON line on stdout. Exits 1 on any wrong reply or connection
//! error, 2 on bad arguments.

mod churn;
mod idle;
mod net;
mod pattern;
mod report;
mod stream;
mod sys;
mod upgrade;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Lines,
    Bulk,
    Churn,
    Idle,
    Upgrade,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Lines => "lines",
            Mode::Bulk => "bulk",
            Mode::Churn => "churn",
            Mode::Idle => "idle",
            Mode::Upgrade => "upgrade",
        }
    }
}

/// How replies are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Verify {
    /// reply = reverse(line without '\n') + '\n' (xps, tokio-peer).
    Reverse,
    /// reply = line (a plain echo server such as c-echo).
    Echo,
    /// Only count bytes.
    None,
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Load generator for xps (line reversal) and its peers"
)]
pub struct Args {
    /// What to measure.
    #[arg(value_enum)]
    pub mode: Mode,
    /// Server address(es), loopback only; repeat or comma-separate to spread
    /// connections round-robin.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8001")]
    pub addr: Vec<SocketAddr>,
    /// Concurrent connections (slots for churn).
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
    /// lines: lines in flight per connection.
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,
    /// Bytes per line including the '\n' (default 64; bulk 1024).
    #[arg(long)]
    pub size: Option<usize>,
    /// Measured window in seconds (after the warm-up).
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Warm-up in seconds, not measured.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// idle: seconds to hold the connections open.
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
    /// How replies are verified.
    #[arg(long, value_enum, default_value_t = Verify::Reverse)]
    pub verify: Verify,
    /// Server PID: report its CPU time over the measured window and its RSS.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// bulk: most unreplied bytes per connection (0 = as much as the socket takes).
    #[arg(long, default_value_t = 0)]
    pub window: usize,
    /// churn/idle: most connections in the handshake + first round trip at once.
    #[arg(long, default_value_t = 256)]
    pub max_connecting: usize,
    /// Rotate IPv4 loopback source addresses over 127.0.0.1..=127.0.0.N
    /// (more ephemeral ports for churn).
    #[arg(long, default_value_t = 8)]
    pub src_spread: u8,
    /// churn: start every connection with a PROXY protocol v2 header (for
    /// a server's `--listen-proxy` listener).
    #[arg(long)]
    pub proxy_v2: bool,
    /// idle: bound in seconds on the connect phase and on the final check
    /// (upgrade: on the old process's exit, and on each reply).
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
    /// upgrade: connections that ping-pong lines back to back meanwhile.
    #[arg(long, default_value_t = 0)]
    pub busy: usize,
    /// upgrade: the server's --pid-file (whose pid gets SIGUSR2).
    #[arg(long)]
    pub pid_file: Option<std::path::PathBuf>,
}

impl Args {
    pub fn size(&self) -> usize {
        self.size
            .unwrap_or(if self.mode == Mode::Bulk { 1024 } else { 64 })
    }
}

pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    if let Some(a) = args.addr.iter().find(|a| !a.ip().is_loopback()) {
        eprintln!("xps-bench: only loopback targets are allowed, not {a}");
        return ExitCode::from(2);
    }
    if (args.conns == 0 && args.mode != Mode::Upgrade) || args.pipeline == 0 || args.size() == 0 {
        eprintln!("xps-bench: --conns, --pipeline and --size must be at least 1");
        return ExitCode::from(2);
    }
    if !(args.duration.is_finite() && args.warmup.is_finite() && args.hold.is_finite()) {
        eprintln!("xps-bench: durations must be finite numbers of seconds");
        return ExitCode::from(2);
    }
    let nofile = sys::raise_nofile();
    if (nofile as usize) < args.conns + 64 {
        eprintln!(
            "xps-bench: warning: RLIMIT_NOFILE is {nofile}, fewer than --conns {} needs",
            args.conns
        );
    }
    let result = match args.mode {
        Mode::Lines | Mode::Bulk => stream::run(&args),
        Mode::Churn => churn::run(&args),
        Mode::Idle => idle::run(&args),
        Mode::Upgrade => return upgrade::main(&args),
    };
    let rep = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("xps-bench: {e}");
            return ExitCode::from(1);
        }
    };
    println!("{}", rep.to_json());
    if rep.failed() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
