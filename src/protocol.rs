//! The string-reversal protocol, as a pure state machine: bytes in, bytes out.
//!
//! Nothing here touches a socket, a clock or a log. The connection module feeds
//! whatever bytes `recv()` returned into [`LineReverser::feed`] and sends whatever
//! it appended to the output buffer. Keeping the protocol pure is what lets it be
//! unit-tested with exact bytes, property-tested against every way TCP could split
//! the input, fuzzed, and benchmarked without a network.
//!
//! # The rules (SPEC §2)
//!
//! * Input is split into lines at `\n`. Each complete line is answered by its
//!   content reversed, followed by the same terminator: `\n`, or `\r\n` when the
//!   line ended with CR LF.
//! * Content that is valid UTF-8 is reversed by extended grapheme clusters (so a
//!   combining accent stays on its letter and an emoji family stays whole); pure
//!   ASCII takes a byte-reversal fast path, which gives the same result; anything
//!   else is reversed byte by byte.
//! * On half-close, an unterminated last line is answered without a terminator
//!   ([`LineReverser::finish`]).
//! * A line longer than `max_line` bytes is answered in `max_line`-sized segments
//!   as they fill, so unterminated input never costs more than `max_line + 1`
//!   bytes of memory.
//!
//! # Why the output never depends on how TCP split the input
//!
//! The C tutorial reverses whatever one `recv()` returned, so `abc` sent as `ab`
//! then `c` comes back as `bac`. Here the only state carried between reads is
//! the unfinished line, and every decision is a function of the bytes of that
//! line alone:
//!
//! * a segment is cut only when more than `max_line` raw bytes (CR included) are
//!   buffered without a LF, and then exactly the first `max_line` bytes go out;
//! * a complete line is cut the same way ([`emit_line`] applies the same rule to
//!   the whole line at once), so receiving it in one read or in a thousand gives
//!   the same bytes.
//!
//! A line of exactly `max_line` content bytes followed by CR LF shows why the
//! rule counts raw bytes: streamed, the buffered `content + CR` is `max_line + 1`
//! bytes, so `content` goes out as a segment and the `CR LF` left over is an
//! empty CRLF line (`\r\n`); whole, the same rule cuts the same segment. Either
//! way the client receives `reverse(content) + "\r\n"`.

use unicode_segmentation::UnicodeSegmentation;

/// The default `--max-line`: the C tutorial's `DEFAULT_BUFFER_SIZE` (100 KB).
pub const DEFAULT_MAX_LINE: usize = 100_000;

/// Per-connection protocol state: the bytes of the line not yet terminated.
#[derive(Debug)]
pub struct LineReverser {
    /// Raw bytes of the current, unterminated line (no LF; a trailing CR may be
    /// the first half of a CR LF). Never longer than `max_line` between calls.
    partial: Vec<u8>,
    /// Segment size for overlong lines; at least 1.
    max_line: usize,
}

impl LineReverser {
    /// A reverser that cuts overlong lines into `max_line`-byte segments.
    /// `max_line` of 0 is treated as 1.
    pub fn new(max_line: usize) -> Self {
        Self {
            partial: Vec::new(),
            max_line: max_line.max(1),
        }
    }

    /// Feeds the next bytes of the stream, appending every reply they complete
    /// to `out`. Replies are appended whole and in request order.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut rest = input;
        if !self.partial.is_empty() {
            match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    self.partial.extend_from_slice(&rest[..i]);
                    emit_line(&self.partial, true, self.max_line, out);
                    self.partial.clear();
                    rest = &rest[i + 1..];
                }
                None => {
                    self.partial.extend_from_slice(rest);
                    let keep = emit_segments(&self.partial, self.max_line, out);
                    let cut = self.partial.len() - keep;
                    self.partial.drain(..cut);
                    self.release_if_large();
                    return;
                }
            }
        }
        let mut start = 0;
        for i in memchr::memchr_iter(b'\n', rest) {
            emit_line(&rest[start..i], true, self.max_line, out);
            start = i + 1;
        }
        let tail = &rest[start..];
        if !tail.is_empty() {
            let keep = emit_segments(tail, self.max_line, out);
            self.partial.extend_from_slice(&tail[tail.len() - keep..]);
        }
        self.release_if_large();
    }

    /// End of input (the client half-closed): answers the unterminated last
    /// line, if any, without a terminator.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.partial.is_empty() {
            reverse_into(&self.partial, out);
            self.partial = Vec::new();
        }
    }

    /// Bytes of the unterminated line currently held.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }

    /// Heap bytes this reverser holds (for memory accounting).
    pub fn capacity(&self) -> usize {
        self.partial.capacity()
    }

    /// An idle connection should cost little: once the partial line is gone,
    /// give back a buffer that grew past a few KiB.
    fn release_if_large(&mut self) {
        if self.partial.is_empty() && self.partial.capacity() > 4096 {
            self.partial = Vec::new();
        }
    }
}

/// Cuts `max_line`-byte segments off the front of `raw` (bytes of a line with
/// no LF yet) while more than `max_line` bytes remain, appending each reversed
/// segment to `out`. Returns how many bytes at the end were not emitted.
fn emit_segments(mut raw: &[u8], max_line: usize, out: &mut Vec<u8>) -> usize {
    while raw.len() > max_line {
        reverse_into(&raw[..max_line], out);
        raw = &raw[max_line..];
    }
    raw.len()
}

/// Emits one whole line: `raw` is everything before the LF (a trailing CR
/// included). Overlong lines go out in segments exactly as [`LineReverser::feed`]
/// would have cut them while streaming.
fn emit_line(raw: &[u8], terminated: bool, max_line: usize, out: &mut Vec<u8>) {
    let keep = emit_segments(raw, max_line, out);
    let raw = &raw[raw.len() - keep..];
    if !terminated {
        reverse_into(raw, out);
        return;
    }
    match raw.split_last() {
        Some((b'\r', content)) => {
            reverse_into(content, out);
            out.extend_from_slice(b"\r\n");
        }
        _ => {
            reverse_into(raw, out);
            out.push(b'\n');
        }
    }
}

/// Appends `content` reversed to `out`: by bytes for ASCII (the fast path), by
/// extended grapheme clusters for other valid UTF-8, by bytes otherwise.
pub fn reverse_into(content: &[u8], out: &mut Vec<u8>) {
    if content.is_ascii() {
        // In ASCII every byte is its own grapheme cluster (CR LF, the one
        // exception, cannot occur inside a line), so this equals the
        // grapheme reversal.
        push_reversed_bytes(content, out);
        return;
    }
    match std::str::from_utf8(content) {
        Ok(text) => {
            out.reserve(content.len());
            for g in text.graphemes(true).rev() {
                out.extend_from_slice(g.as_bytes());
            }
        }
        Err(_) => push_reversed_bytes(content, out),
    }
}

/// Appends `bytes` in reverse order (copy, then the slice's in-place reverse,
/// which the compiler vectorises).
fn push_reversed_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(bytes);
    out[start..].reverse();
}

/// Convenience for tests, benchmarks and the fuzzer: the whole reply to a
/// complete input stream that then half-closes.
pub fn reverse_stream(input: &[u8], max_line: usize) -> Vec<u8> {
    let mut r = LineReverser::new(max_line);
    let mut out = Vec::with_capacity(input.len());
    r.feed(input, &mut out);
    r.finish(&mut out);
    out
}
