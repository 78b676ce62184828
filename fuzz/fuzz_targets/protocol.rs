//! Fuzz target for the pure reversal protocol (`xps::protocol`).
//!
//! Input layout (everything is derived from the fuzzer's bytes):
//!
//! * byte 0: `max_line = byte % 64 + 1` (1..=64), small so that overlong-line
//!   segmentation, CR at a segment edge and UTF-8 sequences cut by a segment
//!   are all reached quickly; from 0xC0 up, the server's default
//!   (`DEFAULT_MAX_LINE`), so that whole lines of any fuzzed length are
//!   reversed in one piece too;
//! * byte 1: `n = byte % 16`, the number of chunk-size bytes that follow;
//! * the next `n` bytes: chunk sizes (0..=255, used cyclically; a 0 feeds an
//!   empty slice), i.e. the way TCP split the stream;
//! * the rest: the stream itself.
//!
//! Checked, for every input:
//!
//! 1. nothing panics;
//! 2. the output fed in those chunks equals `reverse_stream(whole, max_line)`
//!    (the reply depends only on the bytes, not on how they were split);
//! 3. the output also equals an independent reference model written here
//!    from SPEC §2 (line by line, overlong lines cut into `max_line` segments);
//! 4. output length == input length, and the sorted output bytes equal the
//!    sorted input bytes (every byte comes back exactly once);
//! 5. between calls the reverser never holds more than `max_line` bytes;
//! 6. the fast path (`feed`) gives, after every chunk, exactly the bytes, the
//!    reply count and the held bytes of the plain reference (`feed_plain`),
//!    and the counts add up to the number of replies in the model.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xps::protocol::{DEFAULT_MAX_LINE, LineReverser, reverse_stream};

/// The SPEC model, shared with the unit tests' proptests.
#[path = "../../tests/common/model.rs"]
mod model;
use model::{model, replies};

fuzz_target!(|data: &[u8]| {
    let Some((&b0, rest)) = data.split_first() else {
        return;
    };
    let max_line = if b0 >= 0xC0 {
        DEFAULT_MAX_LINE
    } else {
        usize::from(b0 % 64) + 1
    };
    let (sizes, input): (&[u8], &[u8]) = match rest.split_first() {
        None => (&[], &[]),
        Some((&b1, rest)) => {
            let n = usize::from(b1 % 16).min(rest.len());
            rest.split_at(n)
        }
    };

    // 1 + 2 + 5: feed in the fuzzer-chosen chunks.
    let mut r = LineReverser::new(max_line);
    let mut out = Vec::new();
    // 6: the plain reference, fed the same chunks.
    let mut plain = LineReverser::new(max_line);
    let mut plain_out = Vec::new();
    let mut count = 0;
    let mut feed = |chunk: &[u8], r: &mut LineReverser, out: &mut Vec<u8>| {
        let n = r.feed(chunk, out);
        assert_eq!(n, plain.feed_plain(chunk, &mut plain_out), "reply count");
        assert_eq!(*out, plain_out, "fast path differs from plain");
        assert_eq!(r.pending(), plain.pending());
        count += n;
    };
    let mut left = input;
    if sizes.iter().all(|&s| s == 0) {
        // No usable split (an all-zero list would never make progress): one
        // empty feed, then everything at once.
        feed(&[], &mut r, &mut out);
        feed(left, &mut r, &mut out);
        left = &[];
        assert!(r.pending() <= max_line);
    }
    let mut i = 0;
    while !left.is_empty() {
        let n = usize::from(sizes[i % sizes.len()]).min(left.len());
        i += 1;
        let (chunk, tail) = left.split_at(n);
        feed(chunk, &mut r, &mut out);
        left = tail;
        assert!(
            r.pending() <= max_line,
            "holds {} bytes > max_line {max_line}",
            r.pending()
        );
    }
    let n = r.finish(&mut out);
    assert_eq!(n, plain.finish_plain(&mut plain_out));
    assert_eq!(out, plain_out);
    count += n;
    assert_eq!(r.pending(), 0);
    assert_eq!(count, replies(input, max_line).len(), "reply count");

    let whole = reverse_stream(input, max_line);
    assert_eq!(out, whole, "split-dependent output (max_line {max_line})");

    // 3: the independent model.
    assert_eq!(
        out,
        model(input, max_line),
        "differs from the SPEC model (max_line {max_line})"
    );

    // 4: a permutation of the input.
    assert_eq!(out.len(), input.len());
    let mut a = out.clone();
    let mut b = input.to_vec();
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b, "output is not a permutation of the input");
});
