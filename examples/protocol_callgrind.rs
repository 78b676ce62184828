//! A criterion-free driver for instruction counts of the protocol under
//! callgrind (docs/performance.md): feeds `LINES` 64-byte ASCII lines (the LF
//! included) through one `LineReverser` in `CHUNK`-byte reads, clearing the
//! output after each read as a connection does once it has sent it.
//!
//! ```text
//! cargo build --release --example protocol_callgrind
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!     target/release/examples/protocol_callgrind 1000000 16384
//! ```
//!
//! Instructions per line: run it for two line counts and divide the
//! difference of the totals by the difference of the counts, which takes
//! start-up out.

use std::hint::black_box;

use xps::protocol::{DEFAULT_MAX_LINE, LineReverser};

fn main() {
    let mut args = std::env::args().skip(1);
    let lines: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let chunk: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(16 * 1024);
    let mut line: Vec<u8> = (0..63u8).map(|i| b'!' + i % 94).collect();
    line.push(b'\n');
    // One buffer of whole lines that a read of `chunk` bytes walks through
    // cyclically, so lines straddle reads as on a socket.
    let period = line.len() * chunk.max(1);
    let stream = line.repeat(period / line.len());
    let total = lines * line.len();
    let mut r = LineReverser::new(DEFAULT_MAX_LINE);
    let mut out = Vec::with_capacity(chunk + 64);
    let (mut fed, mut at, mut sum) = (0usize, 0usize, 0usize);
    while fed < total {
        let n = chunk.min(total - fed).min(stream.len() - at);
        r.feed(black_box(&stream[at..at + n]), &mut out);
        sum = sum.wrapping_add(out.len());
        out.clear();
        fed += n;
        at = (at + n) % stream.len();
    }
    r.finish(&mut out);
    println!("{} bytes out", black_box(sum + out.len()));
}
