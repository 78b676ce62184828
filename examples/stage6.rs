//! eXpServer Stage 6, and nothing else: the tutorial's server on xps's own
//! event loop, listener and connection code, with none of the features of
//! SPEC §5–§8 (no metrics, access log, admission, memory bound, PROXY
//! protocol, reload or systemd). A learner's entry point:
//!
//! ```text
//! cargo run --release --example stage6 -- [CONFIG]     # ports 8001-8003 without CONFIG
//! nc localhost 8001                                    # type a line, get it reversed
//! cargo run --release --example stage6 -- --log-level trace   # watch the loop work
//! ```
//!
//! It is `xps` with `()` as the core's hooks: the same `Core` the server
//! runs, and the compiler leaves every feature's call out. It reads the
//! same command line and `xps_config.json` as `xps`, and uses the listeners,
//! `workers`, `--max-connections`, `--max-line` and the timeouts.
//!
//! The tutorial's `main()`, step by step:

use std::process::ExitCode;
use std::sync::Arc;
use std::thread;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use xps::config::{Cli, Settings};
use xps::control::signals::Stopper;
use xps::core::{Core, Shared, Target};
use xps::event_loop::EventLoop;
use xps::network::listener;
use xps::utils::logger::{self, Level};
use xps::xps_log;

fn main() -> ExitCode {
    let cli = match Cli::try_parse_ordered(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    logger::init(cli.log_level);
    let settings = match Settings::from_cli(cli) {
        Ok(s) => s,
        Err(e) => {
            xps_log!(Level::Error, "main()", "{e}");
            return ExitCode::from(2);
        }
    };
    match serve(&settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            xps_log!(Level::Error, "main()", "{e}");
            ExitCode::from(1)
        }
    }
}

fn serve(settings: &Settings) -> Result<(), String> {
    // Caught from here on: a signal sent once the server says it listens
    // stops it gracefully.
    let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(|e| format!("signals: {e}"))?;
    // Create the listeners, each listening on its port (for every worker).
    let open =
        listener::create_all(&settings.listeners, settings.workers).map_err(|e| e.to_string())?;
    let shared = Shared::new(settings.max_connections);
    let mut workers = Vec::new();
    let mut wakers = Vec::new();
    for listeners in open.per_worker {
        // Create the event loop, and the core it runs, with no features.
        let event_loop = EventLoop::create().map_err(|e| format!("epoll_create(): {e}"))?;
        let handle = event_loop.handle().map_err(|e| format!("epoll: {e}"))?;
        wakers.push(Arc::new(
            event_loop
                .waker(Target::Waker.token())
                .map_err(|e| format!("eventfd(): {e}"))?,
        ));
        let core = Core::new(
            handle,
            listeners,
            settings.limits(),
            shared.clone(),
            (),
            None,
        )
        .map_err(|e| format!("epoll_ctl(): {e}"))?;
        workers.push((event_loop, core));
    }
    listener::log_listening(&open.bound, "main()");
    // SIGINT/SIGTERM: stop gracefully; a second one exits at once.
    let stopper = Stopper::new(shared, wakers);
    let on_signal = stopper.clone();
    thread::spawn(move || {
        let mut signals = signals.forever();
        if signals.next().is_some() {
            on_signal.stop_all();
        }
        if let Some(sig) = signals.next() {
            std::process::exit(128 + sig);
        }
    });
    // Run the event loops, one per worker thread; if one fails, stop the
    // others.
    let threads: Vec<_> = workers
        .into_iter()
        .map(|(mut event_loop, mut core)| {
            let stopper = stopper.clone();
            thread::spawn(move || {
                let result = event_loop.run(&mut core);
                if result.is_err() {
                    stopper.stop_all();
                }
                result
            })
        })
        .collect();
    let mut failure = Ok(());
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Err(format!("epoll_wait(): {e}")),
            Err(_) => failure = Err("a worker panicked".to_string()),
        }
    }
    failure
}
