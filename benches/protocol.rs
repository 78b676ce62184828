//! Criterion micro-benchmarks of the pure reversal protocol (`src/protocol/`).
//!
//! Three kinds of line content, each at three line lengths (64 B, 1 KiB and
//! 64 KiB, the terminating `\n` included):
//!
//! * `ascii`  — printable ASCII: the byte-reversal fast path;
//! * `utf8`   — mixed UTF-8 (Latin with combining marks, CJK, emoji with ZWJ
//!   sequences and skin-tone modifiers, flags): grapheme-cluster reversal;
//! * `binary` — bytes that are not valid UTF-8 (a 0xFF in every line): the
//!   byte-by-byte fallback after a failed UTF-8 check.
//!
//! Every iteration feeds about 256 KiB of such lines through one
//! [`LineReverser`] in 16 KiB chunks (the way a connection feeds `recv()`
//! results), so lines straddle chunk boundaries as they would on a socket.
//! Throughput is reported in input bytes.
//!
//! Run: `cargo bench --bench protocol` (about a minute with the defaults below;
//! criterion's own options still apply, e.g. `-- feed/utf8` or
//! `-- --measurement-time 5`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use xps::protocol::{DEFAULT_MAX_LINE, LineReverser, reverse_into};

/// Bytes of input per iteration (rounded to whole lines, at least one line).
const BATCH: usize = 256 * 1024;
/// Bytes handed to `feed` at a time, like one `recv()` into the shared buffer.
const CHUNK: usize = 16 * 1024;
/// Line lengths, terminator included.
const SIZES: [(usize, &str); 3] = [(64, "64B"), (1024, "1KiB"), (64 * 1024, "64KiB")];

/// A mixed UTF-8 alphabet: ASCII, a combining accent, CJK, ZWJ family emoji,
/// a skin-tone modifier, a flag, Devanagari with a virama.
const UTF8_PIECES: [&str; 10] = [
    "hello ",
    "e\u{301}",
    "漢字",
    "👨‍👩‍👧‍👦",
    "👍🏽",
    "🇫🇷",
    "नमस्ते",
    "ñ",
    " world",
    "a\u{308}\u{332}",
];

/// One line of `len` bytes (the `\n` included) of the given kind.
fn line(kind: &str, len: usize) -> Vec<u8> {
    let body = len - 1;
    let mut v = Vec::with_capacity(len);
    match kind {
        "ascii" => {
            let mut c = b'!';
            while v.len() < body {
                v.push(c);
                c = if c == b'~' { b'!' } else { c + 1 };
            }
        }
        "utf8" => {
            // Whole pieces only, padded with ASCII, so the line stays valid UTF-8.
            let mut i = 0;
            loop {
                let p = UTF8_PIECES[i % UTF8_PIECES.len()].as_bytes();
                if v.len() + p.len() > body {
                    break;
                }
                v.extend_from_slice(p);
                i += 1;
            }
            v.resize(body, b'.');
            assert!(std::str::from_utf8(&v).is_ok());
        }
        "binary" => {
            // Pseudo-random bytes with no LF, with a 0xFF (never valid in
            // UTF-8) at both ends, so the UTF-8 check fails and the line is
            // reversed byte by byte.
            let mut x: u32 = 0x9E37_79B9;
            while v.len() < body {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let b = (x >> 24) as u8;
                v.push(if b == b'\n' { 0 } else { b });
            }
            v[0] = 0xFF;
            v[body - 1] = 0xFF;
            assert!(std::str::from_utf8(&v).is_err());
        }
        _ => unreachable!(),
    }
    v.push(b'\n');
    assert_eq!(v.len(), len);
    v
}

/// About `BATCH` bytes of identical lines.
fn batch(kind: &str, len: usize) -> Vec<u8> {
    let one = line(kind, len);
    let n = (BATCH / len).max(1);
    one.repeat(n)
}

fn bench_feed(c: &mut Criterion) {
    for kind in ["ascii", "utf8", "binary"] {
        let mut group = c.benchmark_group(format!("feed/{kind}"));
        for (len, name) in SIZES {
            let input = batch(kind, len);
            group.throughput(Throughput::Bytes(input.len() as u64));
            let mut out = Vec::with_capacity(input.len() + 64);
            group.bench_with_input(BenchmarkId::from_parameter(name), &input, |b, input| {
                b.iter(|| {
                    let mut r = LineReverser::new(DEFAULT_MAX_LINE);
                    out.clear();
                    for chunk in input.chunks(CHUNK) {
                        r.feed(black_box(chunk), &mut out);
                    }
                    r.finish(&mut out);
                    black_box(&out);
                });
            });
        }
        group.finish();
    }
}

/// `reverse_into` alone on one line's content (no line splitting), for the
/// cost of the three reversal paths themselves.
fn bench_reverse_into(c: &mut Criterion) {
    for kind in ["ascii", "utf8", "binary"] {
        let mut group = c.benchmark_group(format!("reverse_into/{kind}"));
        for (len, name) in SIZES {
            let l = line(kind, len);
            let content = &l[..l.len() - 1];
            group.throughput(Throughput::Bytes(content.len() as u64));
            let mut out = vec![0; content.len()];
            group.bench_with_input(BenchmarkId::from_parameter(name), content, |b, content| {
                b.iter(|| {
                    reverse_into(black_box(content), &mut out);
                    black_box(&out);
                });
            });
        }
        group.finish();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
        // Fewer bootstrap resamples and no plots: the analysis, not the
        // measurement, dominated the run time on a 2-core machine.
        .nresamples(10_000)
        .without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_feed, bench_reverse_into
}
criterion_main!(benches);
