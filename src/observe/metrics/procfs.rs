//! The standard `process_*` series (as the Go client names them), read from
//! `/proc` at each scrape. The parsers are pure functions of the files' text,
//! so they are tested on samples; only [`ProcessStats::read`] opens files.

/// The standard process series, from `/proc/self`. A figure that cannot be
/// read is left out (with its family) rather than shown as a false zero.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct ProcessStats {
    /// User plus system CPU time.
    pub(super) cpu_seconds: Option<f64>,
    /// Resident set size.
    pub(super) resident_bytes: Option<u64>,
    /// Open file descriptors (the directory listing's own included, as the
    /// Go client counts them).
    pub(super) open_fds: Option<u64>,
    /// The soft `RLIMIT_NOFILE`.
    pub(super) max_fds: Option<u64>,
    /// When the process started, in seconds since the Unix epoch.
    pub(super) start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Reads `/proc/self` (and `/proc/stat` for the boot time).
    pub(super) fn read() -> ProcessStats {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        // SAFETY: sysconf only reads a configuration value.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let ticks = (ticks > 0).then_some(ticks as f64);
        let stat = read("/proc/self/stat").and_then(|s| parse_stat(&s));
        let btime = read("/proc/stat").and_then(|s| parse_btime(&s));
        ProcessStats {
            cpu_seconds: stat.zip(ticks).map(|(s, t)| (s.utime + s.stime) as f64 / t),
            resident_bytes: read("/proc/self/statm")
                .and_then(|s| parse_statm_resident(&s))
                .zip((page > 0).then_some(page as u64))
                .map(|(pages, size)| pages.saturating_mul(size)),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
            max_fds: read("/proc/self/limits").and_then(|s| parse_max_open_files(&s)),
            start_time_seconds: stat
                .zip(ticks)
                .zip(btime)
                .map(|((s, t), b)| b as f64 + s.starttime as f64 / t),
        }
    }
}

/// User plus system CPU time, in clock ticks, of a process's or a thread's
/// `stat` text (`/proc/self/stat`, `/proc/self/task/TID/stat`).
pub(crate) fn cpu_ticks(stat: &str) -> Option<u64> {
    parse_stat(stat).map(|s| s.utime + s.stime)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub(crate) fn ticks_per_second() -> Option<u64> {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then_some(ticks as u64)
}

/// This process's CPU time (user plus system) in milliseconds, truncated.
pub(crate) fn process_cpu_msec() -> Option<u64> {
    let ticks = cpu_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    Some(ticks * 1000 / ticks_per_second()?)
}

/// The resident set size of this process, from `/proc/self/statm`.
pub(crate) fn resident_bytes() -> Option<u64> {
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let pages = parse_statm_resident(&std::fs::read_to_string("/proc/self/statm").ok()?)?;
    (page > 0).then(|| pages.saturating_mul(page as u64))
}

/// The fields of `/proc/self/stat` used here, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    utime: u64,
    stime: u64,
    starttime: u64,
}

/// Fields 14, 15 and 22 of `/proc/<pid>/stat` (proc(5)). The command name,
/// field 2, is in parentheses and may itself hold spaces and `)`, so the
/// fields are counted from the last `)`.
fn parse_stat(s: &str) -> Option<Stat> {
    let rest = &s[s.rfind(')')? + 1..];
    // rest starts with field 3 (state).
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        starttime: field(22)?,
    })
}

/// The resident size in pages: the second field of `/proc/<pid>/statm`.
fn parse_statm_resident(s: &str) -> Option<u64> {
    s.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// Boot time in seconds since the epoch: `/proc/stat`'s `btime` line.
fn parse_btime(s: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// The soft limit on the `Max open files` line of `/proc/<pid>/limits`
/// (`None` if it is `unlimited`).
fn parse_max_open_files(s: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix("Max open files"))?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::super::counters::Metrics;
    use super::super::exposition::line_of;
    use super::*;

    #[test]
    fn stat_fields_counted_from_the_last_paren() {
        // comm with spaces and a ')' inside; from field 4 on, each field
        // holds its own number.
        let fields: Vec<String> = (4..=52).map(|n| n.to_string()).collect();
        let s = format!("42 (a b) c) S {}\n", fields.join(" "));
        assert_eq!(
            parse_stat(&s),
            Some(Stat {
                utime: 14,
                stime: 15,
                starttime: 22
            })
        );
        assert_eq!(parse_stat("42 (x) S 1 2"), None);
        assert_eq!(parse_stat("no paren"), None);
    }

    #[test]
    fn statm_btime_limits() {
        assert_eq!(parse_statm_resident("1000 250 30 1 0 80 0\n"), Some(250));
        assert_eq!(parse_statm_resident(""), None);
        assert_eq!(
            parse_btime("cpu  1 2 3\nintr 5\nbtime 1767225600\nprocesses 9\n"),
            Some(1_767_225_600)
        );
        assert_eq!(parse_btime("cpu 1\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_open_files(limits), Some(1024));
        assert_eq!(
            parse_max_open_files(
                "Max open files            unlimited            unlimited            files\n"
            ),
            None
        );
    }

    #[test]
    fn process_series_present_and_plausible() {
        let p = ProcessStats::read();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let cpu = p.cpu_seconds.expect("cpu");
        assert!((0.0..1e6).contains(&cpu), "{cpu}");
        let rss = p.resident_bytes.expect("rss");
        assert!(rss > 100_000 && rss < (1 << 40), "{rss}");
        let open = p.open_fds.expect("open fds");
        let max = p.max_fds.expect("max fds");
        assert!(open >= 3 && open <= max, "{open} {max}");
        let start = p.start_time_seconds.expect("start");
        // Started after 2020 and not in the future (ticks round down).
        assert!(start > 1.5e9 && start <= now + 1.0, "{start} vs {now}");
        let text = Metrics::new(1).render();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
            line_of(&text, name);
        }
    }
}
