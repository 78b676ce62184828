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
//! 5. between calls the reverser never holds more than `max_line` bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unicode_segmentation::UnicodeSegmentation;
use xps::protocol::{DEFAULT_MAX_LINE, LineReverser, reverse_stream};

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
    let mut left = input;
    if sizes.iter().all(|&s| s == 0) {
        // No usable split (an all-zero list would never make progress): one
        // empty feed, then everything at once.
        r.feed(&[], &mut out);
        r.feed(left, &mut out);
        left = &[];
        assert!(r.pending() <= max_line);
    }
    let mut i = 0;
    while !left.is_empty() {
        let n = usize::from(sizes[i % sizes.len()]).min(left.len());
        i += 1;
        let (chunk, tail) = left.split_at(n);
        r.feed(chunk, &mut out);
        left = tail;
        assert!(
            r.pending() <= max_line,
            "holds {} bytes > max_line {max_line}",
            r.pending()
        );
    }
    r.finish(&mut out);
    assert_eq!(r.pending(), 0);

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

/// SPEC §2, written without looking at how `LineReverser` streams: split the
/// whole stream at LF; in each line cut `max_line`-byte segments off the front
/// while more than `max_line` raw bytes (a trailing CR included) remain; the
/// rest is the line's last piece, answered with its terminator (`\r\n` if it
/// ended with CR, else `\n`), or with none for an unterminated last line.
fn model(input: &[u8], max_line: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut lines: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    // `split` yields one piece more than there are LFs: the unterminated tail
    // (empty when the stream ends with LF or is empty).
    let tail = lines.pop().unwrap_or(&[]);
    for line in lines {
        let last = segments(line, max_line, &mut out);
        match last.strip_suffix(b"\r") {
            Some(content) => {
                rev(content, &mut out);
                out.extend_from_slice(b"\r\n");
            }
            None => {
                rev(last, &mut out);
                out.push(b'\n');
            }
        }
    }
    let last = segments(tail, max_line, &mut out);
    rev(last, &mut out);
    out
}

fn segments<'a>(mut raw: &'a [u8], max_line: usize, out: &mut Vec<u8>) -> &'a [u8] {
    while raw.len() > max_line {
        rev(&raw[..max_line], out);
        raw = &raw[max_line..];
    }
    raw
}

/// Grapheme-cluster reversal for valid UTF-8, byte reversal otherwise (for
/// ASCII the two agree: no line content holds a CR LF pair).
fn rev(content: &[u8], out: &mut Vec<u8>) {
    match std::str::from_utf8(content) {
        Ok(s) => {
            for g in s.graphemes(true).rev() {
                out.extend_from_slice(g.as_bytes());
            }
        }
        Err(_) => out.extend(content.iter().rev()),
    }
}
