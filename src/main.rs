//! `xps [CONFIG] [OPTIONS]`: eXpServer's `main()`.
//!
//! Parses the command line, sets up the logger, and runs the server. Every
//! failure is one line on stderr and an exit status, never a panic:
//! 0 after a clean shutdown, 1 when a listener cannot be opened (or the
//! server fails at run time), 2 for a bad config file or bad options.

use std::process::ExitCode;

use xps::config::{Cli, Settings};
use xps::server::{self, ServerError};
use xps::utils::logger::{self, Level};
use xps::xps_log;

fn main() -> ExitCode {
    let cli = match Cli::try_parse_ordered(std::env::args_os()) {
        Ok(cli) => cli,
        // --help and --version print and exit 0; bad options exit 2.
        Err(e) => e.exit(),
    };
    logger::init(cli.log_level);
    // A panic is a bug; still, say it in the log's shape, naming the thread.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("a thread");
        xps_log!(Level::Error, "main()", "{name} panicked: {info}");
    }));
    let check = cli.check;
    let settings = match Settings::from_cli(cli.clone()) {
        Ok(s) => s,
        Err(e) => {
            xps_log!(Level::Error, "main()", "{e}");
            return ExitCode::from(2);
        }
    };
    if check {
        // `nginx -t`: validate exactly as start-up does, resolve every host,
        // bind nothing.
        return match server::check(&settings) {
            Ok(()) => {
                xps_log!(
                    Level::Info,
                    "main()",
                    "configuration OK: {} listener(s), {} worker(s)",
                    settings.listeners.len(),
                    settings.workers
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                xps_log!(Level::Error, "main()", "{e}");
                ExitCode::from(1)
            }
        };
    }
    limit_allocator_slack();
    match server::run(&settings, cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ ServerError::Listen(_)) | Err(e @ ServerError::Fatal(_)) => {
            xps_log!(Level::Error, "main()", "{e}");
            ExitCode::from(1)
        }
    }
}

/// Buffers of 64 KiB and more (a slow reader's pending replies) are mapped
/// on their own and given back to the kernel when freed, so the process's
/// resident memory follows the bytes actually held — what `--max-buffered`
/// bounds — instead of keeping the high-water mark of a fragmented heap.
/// glibc raises this threshold by itself after the first large `free`
/// (up to 32 MiB), which would put exactly those buffers back on the heap;
/// setting it fixes it. The line path never allocates, so it pays nothing.
fn limit_allocator_slack() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any
    // thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
}
