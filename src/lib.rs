//! xps: eXpServer's Stage 6 rebuilt in Rust — a single-process, event-driven
//! TCP server that listens on several ports at once and answers every line
//! with the line reversed.
//!
//! The modules follow eXpServer's source tree, so the C tutorial maps onto
//! them one to one (see `docs/c-to-rust.md`):
//!
//! | eXpServer                  | xps                      | what it is                         |
//! |----------------------------|--------------------------|------------------------------------|
//! | `main.c`                   | `src/main.rs`, [`server`] | start-up, workers                 |
//! | `xps_loop` (in `main.c`)   | [`event_loop`]           | epoll through mio                  |
//! | `network/xps_listener`     | [`network::listener`]    | listening sockets, the accept loop |
//! | `network/xps_connection`   | [`network::connection`]  | read and write handlers, flow control |
//! | (the reversal in the read handler) | [`protocol`]     | the pure line-reversal state machine |
//! | `core/xps_core` (Stage 7)  | [`core`]                 | one worker: dispatch, timers, drain, the hooks |
//! | `xps_config`               | [`config`]               | command line and JSON config       |
//! | `utils/xps_logger`         | [`utils::logger`]        | `[LEVEL] source : message`         |
//! | (beyond Stage 6)           | [`features`], [`policy`], [`observe`], [`control`], [`slots`] | what plugs in through [`core::hooks`] |
//!
//! The first three rows are the spine and name no feature;
//! `examples/stage6.rs` runs them with no feature at all.

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
