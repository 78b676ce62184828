//! xps: eXpServer's Stage 6 rebuilt in Rust — a single-process, event-driven
//! TCP server that listens on several ports at once and answers every line
//! with the line reversed.
//!
//! The modules follow eXpServer's source tree, so the C tutorial maps onto
//! them one to one (see `docs/c-to-rust.md`):
//!
//! | eXpServer                  | xps                      | what it is                         |
//! |----------------------------|--------------------------|------------------------------------|
//! | `main.c`                   | `src/main.rs`            | start-up, workers, signals         |
//! | `xps_loop` (in `main.c`)   | [`event_loop`]           | epoll through mio                  |
//! | `core/xps_core`            | [`core`]                 | one worker's listeners, connections, timers |
//! | `network/xps_listener`     | [`network::listener`]    | listening sockets, accept errors   |
//! | `network/xps_connection`   | [`network::connection`]  | per-connection I/O and flow control|
//! | (the reversal in the read handler) | [`protocol`]     | the pure line-reversal state machine |
//! | `xps_config`               | [`config`]               | command line and JSON config       |
//! | (beyond Stage 6)           | [`slots`]                | `--max-connections` slots as guards |
//! | `utils/xps_logger`         | [`utils::logger`]        | `[LEVEL] source : message`         |

pub mod config;
pub mod control;
pub mod core;
pub mod event_loop;
pub mod features;
pub mod network;
pub mod observe;
pub mod policy;
pub mod protocol;
pub mod server;
pub mod slots;
pub mod utils;

/// An OS error as a short reason: "Address already in use" rather than
/// "Address already in use (os error 98)".
pub fn os_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
