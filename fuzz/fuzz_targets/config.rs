//! Fuzz target for the config-file parser: `xps::config::parse_file` must
//! never panic on any UTF-8 text, and what it returns must hold its contract:
//!
//! * `Ok`: at least one listener, every port in 1..=65535, a non-empty host
//!   (the parser rejects an empty one itself), no duplicate listener,
//!   `workers` (if any) in 1..=MAX_WORKERS;
//! * `Err`: a non-empty message on one line (it becomes one log line).
//!
//! Seeds in `fuzz/seeds/config/` and the dictionary `fuzz/config.dict` steer
//! the fuzzer past the JSON syntax into the validation code.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xps::config::{MAX_WORKERS, parse_file};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_file(text) {
        Ok(cfg) => {
            assert!(!cfg.listeners.is_empty());
            for (i, l) in cfg.listeners.iter().enumerate() {
                assert!(l.port >= 1);
                assert!(!l.host.is_empty());
                assert!(!cfg.listeners[..i].contains(l), "duplicate listener");
            }
            if let Some(w) = cfg.workers {
                assert!((1..=MAX_WORKERS).contains(&w));
            }
        }
        Err(msg) => {
            assert!(!msg.is_empty());
            assert!(!msg.contains('\n'), "multi-line error: {msg:?}");
        }
    }
});
