//! eXpServer's `xps_logger`: `[LEVEL] source : message` lines on stderr.
//!
//! * The shape is the C logger's, so logs read the same as the tutorial's:
//!   `[INFO] main() : Server listening on port 8001`.
//! * Colour only when stderr is a terminal, and never when `NO_COLOR` is set
//!   (<https://no-color.org>).
//! * DEBUG lines only with `XPS_DEBUG=1`, `--log-level debug`, or a `RUST_LOG`
//!   that asks for debug or trace. Per-connection events are DEBUG, so a busy
//!   server does not pay for formatting them: the level check is one relaxed
//!   atomic load, done before any formatting (see the `xps_log!` macro).
//! * With several workers, each line names its worker (`[worker 2]`), set per
//!   thread by [`set_worker`].
//!
//! Each line is formatted into one buffer and written with a single `write` to
//! the locked stderr, so lines from different workers never interleave.

use std::cell::Cell;
use std::fmt;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// Log levels, most severe first (the C logger's `LOG_ERROR` … `LOG_DEBUG`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    /// Something failed; the server may stop.
    Error = 0,
    /// Something is wrong but the server goes on.
    Warning = 1,
    /// Start-up, shutdown and other rare events.
    Info = 2,
    /// Per-connection and per-event detail.
    Debug = 3,
}

impl Level {
    fn tag(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warning => "WARNING",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }

    fn colour(self) -> &'static str {
        match self {
            Level::Error => "\x1b[31m",
            Level::Warning => "\x1b[33m",
            Level::Info => "\x1b[32m",
            Level::Debug => "\x1b[36m",
        }
    }

    /// Parses `error`, `warn`/`warning`, `info`, `debug` (and `trace`, which
    /// this server treats as `debug`), case-insensitively.
    pub fn parse(s: &str) -> Option<Level> {
        match s.trim().to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warning),
            "info" => Some(Level::Info),
            "debug" | "trace" => Some(Level::Debug),
            _ => None,
        }
    }
}

static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
static COLOUR: AtomicBool = AtomicBool::new(false);

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Sets up the logger once at start-up. `cli_level` (from `--log-level`) wins;
/// otherwise `XPS_DEBUG=1` or a `RUST_LOG` naming a level decide; the default is
/// INFO.
pub fn init(cli_level: Option<Level>) {
    set_level(cli_level.unwrap_or_else(level_from_env));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    COLOUR.store(colour, Ordering::Relaxed);
}

/// The level the environment asks for: `XPS_DEBUG=1` → DEBUG; else the last
/// level named in `RUST_LOG` (`debug`, `xps=debug`, `info,xps=trace` …);
/// else INFO.
pub fn level_from_env() -> Level {
    if std::env::var("XPS_DEBUG").is_ok_and(|v| v.trim() == "1") {
        return Level::Debug;
    }
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|spec| {
            spec.split(',')
                .filter_map(|d| Level::parse(d.rsplit('=').next().unwrap_or(d)))
                .max()
        })
        .unwrap_or(Level::Info)
}

/// Changes the maximum level shown.
pub fn set_level(level: Level) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
}

/// Whether a line at `level` would be printed. Cheap: one relaxed load.
#[inline]
pub fn enabled(level: Level) -> bool {
    level as u8 <= MAX_LEVEL.load(Ordering::Relaxed)
}

/// Names the worker this thread runs, for the lines it logs.
pub fn set_worker(id: Option<usize>) {
    WORKER.with(|w| w.set(id));
}

/// Writes one line. Use the `xps_log!` macro, which checks [`enabled`] first.
pub fn write(level: Level, source: &str, args: fmt::Arguments<'_>) {
    use std::fmt::Write as _;
    let mut line = String::with_capacity(96);
    let colour = COLOUR.load(Ordering::Relaxed);
    if colour {
        line.push_str(level.colour());
    }
    let _ = write!(line, "[{}]", level.tag());
    if colour {
        line.push_str("\x1b[0m");
    }
    let _ = write!(line, " {source}");
    if let Some(id) = WORKER.with(Cell::get) {
        let _ = write!(line, " [worker {id}]");
    }
    let _ = writeln!(line, " : {args}");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// `xps_log!(Level::Info, "main()", "Server listening on port {}", port)`.
/// Formats nothing unless the level is enabled.
#[macro_export]
macro_rules! xps_log {
    ($level:expr, $source:expr, $($arg:tt)+) => {{
        let level = $level;
        if $crate::utils::logger::enabled(level) {
            $crate::utils::logger::write(level, $source, format_args!($($arg)+));
        }
    }};
}
