//! eXpServer's `xps_logger`: `[LEVEL] source : message` lines on stderr.
//!
//! * The shape is the C logger's, so logs read the same as the tutorial's:
//!   `[INFO] main() : Server listening on port 8001`.
//! * Levels ERROR to DEBUG as in C, plus TRACE: the loop narrated for a
//!   learner (`--log-level trace`). The level check is one relaxed atomic
//!   load before any formatting (the `xps_log!` macro), and the writer is
//!   cold, so a level that is off costs the hot paths nothing.
//! * One `write` per line to the locked stderr: workers' lines never
//!   interleave; with several workers each names its own ([`set_worker`]).
//! * Text xps did not write (host names, key names, OS errors) is escaped
//!   into the line as it is formatted, so no message can forge a line or
//!   send the terminal a control sequence.
//!
//! `docs/logging.md` has the levels, the sources, the trace and the
//! escaping rules.

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
    /// The loop narrated for a learner: every event, accept, read, write,
    /// `WouldBlock`, pause and close (`--log-level trace`).
    Trace = 4,
}

impl Level {
    fn tag(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warning => "WARNING",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        }
    }

    fn colour(self) -> &'static str {
        match self {
            Level::Error => "\x1b[31m",
            Level::Warning => "\x1b[33m",
            Level::Info => "\x1b[32m",
            Level::Debug => "\x1b[36m",
            Level::Trace => "\x1b[35m",
        }
    }

    /// Parses `error`, `warn`/`warning`, `info`, `debug` and `trace`,
    /// case-insensitively.
    pub fn parse(s: &str) -> Option<Level> {
        match s.trim().to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warning),
            "info" => Some(Level::Info),
            "debug" => Some(Level::Debug),
            "trace" => Some(Level::Trace),
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
/// Cold: the event loop's hot paths hold trace calls that are off.
#[cold]
#[inline(never)]
pub fn write(level: Level, source: &str, args: fmt::Arguments<'_>) {
    let line = format_line(level, source, args, COLOUR.load(Ordering::Relaxed));
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// One whole log line, its LF included: the logger's own parts (level,
/// colour codes, worker, separators) as they are, `source` and the message
/// escaped into it.
fn format_line(level: Level, source: &str, args: fmt::Arguments<'_>, colour: bool) -> String {
    use std::fmt::Write as _;
    let mut line = String::with_capacity(96);
    if colour {
        line.push_str(level.colour());
    }
    let _ = write!(line, "[{}]", level.tag());
    if colour {
        line.push_str("\x1b[0m");
    }
    line.push(' ');
    let _ = Escaped(&mut line).write_str(source);
    if let Some(id) = WORKER.with(Cell::get) {
        let _ = write!(line, " [worker {id}]");
    }
    line.push_str(" : ");
    let _ = Escaped(&mut line).write_fmt(args);
    line.push('\n');
    line
}

/// A [`fmt::Write`] into a log line that escapes control characters on the
/// way in (`docs/logging.md` has the rules). Formatting a message through
/// it hands every piece, literal or argument, to its `write_str`.
struct Escaped<'a>(&'a mut String);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // The common case: nothing to escape, one copy. 0xC2 is the first
        // byte of every code point U+0080..=U+00BF, the C1 controls among
        // them; the slow path looks closer.
        if !s.bytes().any(|b| b < 0x20 || b == 0x7f || b == 0xc2) {
            self.0.push_str(s);
            return Ok(());
        }
        for c in s.chars() {
            match c {
                '\n' => self.0.push_str("\\n"),
                '\r' => self.0.push_str("\\r"),
                '\t' => self.0.push_str("\\t"),
                '\0'..='\x1f' | '\x7f' => {
                    let _ = write!(self.0, "\\x{:02x}", c as u32);
                }
                '\u{80}'..='\u{9f}' => {
                    let _ = write!(self.0, "\\u{{{:x}}}", c as u32);
                }
                _ => self.0.push(c),
            }
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The message part of a line as `write` builds it.
    fn escaped(args: fmt::Arguments<'_>) -> String {
        use std::fmt::Write as _;
        let mut line = String::new();
        Escaped(&mut line).write_fmt(args).unwrap();
        line
    }

    #[test]
    fn a_forged_line_stays_on_its_line() {
        let host = "x\n[INFO] main() : Server listening on port 1";
        let msg = escaped(format_args!("cannot resolve host '{host}'"));
        assert_eq!(
            msg,
            "cannot resolve host 'x\\n[INFO] main() : Server listening on port 1'"
        );
        assert_eq!(msg.lines().count(), 1);
        assert_eq!(escaped(format_args!("a\r\nb\tc")), "a\\r\\nb\\tc");
    }

    #[test]
    fn control_characters_are_escaped() {
        let key = "gzip\x1b[2Jlevel";
        assert_eq!(
            escaped(format_args!("ignored: {key}")),
            "ignored: gzip\\x1b[2Jlevel"
        );
        assert_eq!(escaped(format_args!("{}", "\0\x07\x7f")), "\\x00\\x07\\x7f");
        // C1 controls (U+009B is CSI on some terminals), but not the
        // printable characters that share their first UTF-8 byte.
        assert_eq!(
            escaped(format_args!("{}", "\u{9b}31m \u{85} \u{a0}\u{e9}\u{bf}")),
            "\\u{9b}31m \\u{85} \u{a0}\u{e9}\u{bf}"
        );
        // Backslashes and other text are left alone.
        assert_eq!(
            escaped(format_args!("{}", "a\\nb \u{1F44B} 漢")),
            "a\\nb \u{1F44B} 漢"
        );
    }

    #[test]
    fn a_line_is_one_line_with_only_the_loggers_own_colour_codes() {
        let host = "\n[INFO] main() : Server listening on port 1";
        let key = "k\x1b]0;pwned\x07";
        for colour in [false, true] {
            let line = format_line(
                Level::Warning,
                "xps_config_load()",
                format_args!("host '{host}', key {key}"),
                colour,
            );
            assert_eq!(line.matches('\n').count(), 1, "{line:?}");
            assert!(line.ends_with('\n'));
            let plain = "[WARNING] xps_config_load() : host '\\n[INFO] main() : \
                         Server listening on port 1', key k\\x1b]0;pwned\\x07\n";
            if colour {
                // The logger's two colour codes are raw; nothing else is.
                assert_eq!(line, format!("\x1b[33m[WARNING]\x1b[0m{}", &plain[9..]));
                assert_eq!(line.matches('\x1b').count(), 2);
            } else {
                assert_eq!(line, plain);
            }
        }
    }
}
