//! The string-reversal protocol (SPEC §2), as a pure state machine: bytes
//! in, bytes out.
//!
//! Nothing here touches a socket, a clock or a log: the connection's read
//! handler feeds whatever `recv()` returned into [`LineReverser::feed`] and
//! sends whatever it appended. Keeping the protocol pure is what lets it be
//! tested with exact bytes, property-tested against every way TCP could split
//! the input, fuzzed, and benchmarked without a network. The only state kept
//! between reads is the unterminated line, and every decision is a function
//! of that line's bytes alone, so a reply never depends on how TCP split the
//! input (the C tutorial reverses each `recv()` instead).
//!
//! This file is the algorithm in its plain form, to be read first; `fast.rs`
//! holds the faster forms of its two byte-level operations, checked against
//! it. `docs/protocol.md` has the rules, their edge cases and the reasons.

use unicode_segmentation::UnicodeSegmentation;

mod fast;

use fast::Fast;

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
    /// to `out`. Replies are appended whole and in request order. Returns how
    /// many replies were appended: complete lines plus segments of overlong
    /// lines.
    ///
    /// ```
    /// use xps::protocol::LineReverser;
    /// let mut r = LineReverser::new(100);
    /// let mut out = Vec::new();
    /// assert_eq!(r.feed(b"he", &mut out), 0); // no LF yet: nothing to send
    /// assert!(out.is_empty());
    /// assert_eq!(r.feed("llo\n\u{1F44B}\u{1F3FD}!\n".as_bytes(), &mut out), 2);
    /// assert_eq!(out, "olleh\n!\u{1F44B}\u{1F3FD}\n".as_bytes());
    /// ```
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        self.feed_with::<Fast>(input, out)
    }

    /// End of input (the client half-closed): answers the unterminated last
    /// line, if any, without a terminator. Returns the number of replies
    /// appended: 1 if there was such a line, else 0.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> usize {
        self.finish_with::<Fast>(out)
    }

    /// The plain reference: [`Self::feed`] with the plain LF search and
    /// reversal of `Plain` instead of the fast ones of `fast.rs`. It gives
    /// exactly the same replies and counts (the proptests and the fuzz target
    /// check it), only slower. For tests and for reading; the server uses
    /// [`Self::feed`].
    pub fn feed_plain(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        self.feed_with::<Plain>(input, out)
    }

    /// The plain reference of [`Self::finish`] (see [`Self::feed_plain`]).
    pub fn finish_plain(&mut self, out: &mut Vec<u8>) -> usize {
        self.finish_with::<Plain>(out)
    }

    /// [`Self::feed`] with the LF search and reversal of `O`.
    #[inline(always)]
    fn feed_with<O: LineOps>(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let lf = O::find_lf(input);
        if lf.is_none() && self.partial.len() + input.len() <= self.max_line {
            // The line goes on and is not overlong yet: nothing to answer.
            self.partial.extend_from_slice(input);
            return 0;
        }
        // Every reply is exactly as long as the bytes it answers, and each
        // byte is answered at most once: the replies to this call fit in
        // (held + new) bytes. Size the output once, fill it in place, cut
        // it to what was written.
        let start = out.len();
        out.resize(start + self.partial.len() + input.len(), 0);
        let mut sink = Sink {
            buf: &mut out[start..],
            len: 0,
            segments: 0,
        };
        let lines = self.feed_into::<O>(input, lf, &mut sink);
        let (written, segments) = (sink.len, sink.segments);
        out.truncate(start + written);
        lines + segments
    }

    /// [`Self::feed`] into the sized output; `lf` is the first LF of `input`.
    /// Returns the number of complete lines answered (the sink counts the
    /// segments).
    fn feed_into<O: LineOps>(
        &mut self,
        input: &[u8],
        mut lf: Option<usize>,
        out: &mut Sink<'_>,
    ) -> usize {
        let mut lines = 0;
        let mut rest = input;
        if !self.partial.is_empty() {
            // Finish the line already started.
            let Some(i) = lf else {
                self.push_unterminated::<O>(rest, out);
                return 0;
            };
            self.push_unterminated::<O>(&rest[..i], out);
            emit_line::<O>(&self.partial, self.max_line, out);
            lines += 1;
            self.partial.clear();
            rest = &rest[i + 1..];
            lf = O::find_lf(rest);
        }
        // Whole lines straight from the input, without copying them.
        while let Some(i) = lf {
            emit_line::<O>(&rest[..i], self.max_line, out);
            lines += 1;
            rest = &rest[i + 1..];
            lf = O::find_lf(rest);
        }
        // Usually the read ended with a LF: nothing is left over.
        if !rest.is_empty() {
            self.push_unterminated::<O>(rest, out);
        }
        self.release_if_large();
        lines
    }

    /// Adds bytes of a line whose LF has not arrived, cutting a segment each
    /// time more than `max_line` bytes are held. `partial` never grows past
    /// `max_line`: segments are cut from the input as it comes.
    fn push_unterminated<O: LineOps>(&mut self, mut bytes: &[u8], out: &mut Sink<'_>) {
        while self.partial.len() + bytes.len() > self.max_line {
            if self.partial.is_empty() {
                let keep = emit_segments::<O>(bytes, self.max_line, out);
                bytes = &bytes[bytes.len() - keep..];
                break;
            }
            let need = self.max_line - self.partial.len();
            self.partial.extend_from_slice(&bytes[..need]);
            bytes = &bytes[need..];
            O::reverse(&self.partial, out.take_segment(self.max_line));
            self.partial.clear();
        }
        self.partial.extend_from_slice(bytes);
    }

    /// [`Self::finish`] with the reversal of `O`.
    fn finish_with<O: LineOps>(&mut self, out: &mut Vec<u8>) -> usize {
        if self.partial.is_empty() {
            return 0;
        }
        let start = out.len();
        out.resize(start + self.partial.len(), 0);
        O::reverse(&self.partial, &mut out[start..]);
        self.partial = Vec::new();
        1
    }

    /// A reverser that resumes a stream whose unterminated line so far is
    /// `partial` (a connection moved from another process): the same as
    /// [`Self::new`] fed those bytes. `partial` is at most `max_line` bytes
    /// and holds no LF.
    pub fn resume(max_line: usize, partial: Vec<u8>) -> Self {
        let mut r = Self::new(max_line);
        debug_assert!(partial.len() <= r.max_line && !partial.contains(&b'\n'));
        r.partial = partial;
        r
    }

    /// Takes the unterminated line out (to move it with its connection).
    pub fn take_partial(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.partial)
    }

    /// Bytes of the unterminated line currently held.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }

    /// The length past which an unterminated line is cut into a segment
    /// reply (`--max-line`; at least 1).
    pub fn max_line(&self) -> usize {
        self.max_line
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

/// The unwritten rest of an output region sized in advance; replies are
/// written front to back.
struct Sink<'a> {
    /// The whole region.
    buf: &'a mut [u8],
    /// Bytes written so far.
    len: usize,
    /// Segments of overlong lines taken so far (complete lines are counted
    /// by the loop over them, where the count stays in a register: counting
    /// them here cost 5 instructions per line under callgrind).
    segments: usize,
}

impl Sink<'_> {
    /// The next `n` bytes of the region, for one reply to be written by the
    /// caller.
    fn take(&mut self, n: usize) -> &mut [u8] {
        let at = self.len;
        self.len += n;
        &mut self.buf[at..at + n]
    }

    /// [`Self::take`] for a segment of an overlong line, counted.
    fn take_segment(&mut self, n: usize) -> &mut [u8] {
        self.segments += 1;
        self.take(n)
    }
}

/// Cuts `max_line`-byte segments off the front of `raw` (bytes of a line with
/// no LF yet) while more than `max_line` bytes remain, writing each reversed
/// segment to `out`. Returns how many bytes at the end were not emitted.
/// Inlined into [`emit_line`], like it.
#[inline(always)]
fn emit_segments<O: LineOps>(mut raw: &[u8], max_line: usize, out: &mut Sink<'_>) -> usize {
    while raw.len() > max_line {
        O::reverse(&raw[..max_line], out.take_segment(max_line));
        raw = &raw[max_line..];
    }
    raw.len()
}

/// Emits the reply to one whole line: `raw` is everything before the LF (a
/// trailing CR included). Overlong lines go out in segments exactly as
/// [`LineReverser::feed`] would have cut them while streaming. Inlined: this
/// is the body of the loop over the lines of every read.
#[inline(always)]
fn emit_line<O: LineOps>(raw: &[u8], max_line: usize, out: &mut Sink<'_>) {
    let keep = emit_segments::<O>(raw, max_line, out);
    let raw = &raw[raw.len() - keep..];
    let reply = out.take(raw.len() + 1);
    // The reply ends as the request did: LF, or CR LF.
    reply[raw.len()] = b'\n';
    let content = match raw.split_last() {
        Some((b'\r', content)) => {
            reply[content.len()] = b'\r';
            content
        }
        _ => raw,
    };
    O::reverse(content, &mut reply[..content.len()]);
}

/// The two byte-level operations the algorithm is built on. [`Plain`] is the
/// form to read; [`fast::Fast`] is the form the server runs. Both must give
/// the same results for every input.
trait LineOps {
    /// Position of the first LF in `bytes`.
    fn find_lf(bytes: &[u8]) -> Option<usize>;

    /// Writes a line's `content` (no terminator) reversed to `dst`, which has
    /// the same length: by extended grapheme clusters if it is valid UTF-8,
    /// by bytes otherwise. `content` holds no LF, so no CR LF cluster: that
    /// is what lets the fast form reverse ASCII by bytes.
    fn reverse(content: &[u8], dst: &mut [u8]);
}

/// The plain forms of [`LineOps`]: the reference the fast path is checked
/// against.
struct Plain;

impl LineOps for Plain {
    fn find_lf(bytes: &[u8]) -> Option<usize> {
        bytes.iter().position(|&b| b == b'\n')
    }

    fn reverse(content: &[u8], dst: &mut [u8]) {
        match std::str::from_utf8(content) {
            Ok(text) => reverse_graphemes(text, dst),
            Err(_) => {
                for (d, s) in dst.iter_mut().zip(content.iter().rev()) {
                    *d = *s;
                }
            }
        }
    }
}

/// Writes `text`'s extended grapheme clusters to `dst` (as long as `text`)
/// in reverse order, each cluster's bytes kept in order.
fn reverse_graphemes(text: &str, dst: &mut [u8]) {
    let mut at = 0;
    for g in text.graphemes(true).rev() {
        dst[at..at + g.len()].copy_from_slice(g.as_bytes());
        at += g.len();
    }
}

/// Writes `content` reversed to `dst`, which has the same length: by
/// extended grapheme clusters for valid UTF-8, by bytes otherwise (the fast
/// form, as the server runs it). `content` is a line's content: with a LF in
/// it, ASCII is still reversed by bytes, which splits a CR LF cluster.
///
/// ```
/// let mut dst = [0u8; 8];
/// xps::protocol::reverse_into("añb!".as_bytes(), &mut dst[..5]);
/// assert_eq!(&dst[..5], "!bña".as_bytes());
/// ```
///
/// # Panics
///
/// If `dst` is not as long as `content`.
pub fn reverse_into(content: &[u8], dst: &mut [u8]) {
    assert_eq!(content.len(), dst.len(), "reverse_into: lengths differ");
    Fast::reverse(content, dst);
}

/// Convenience for tests, benchmarks and the fuzzer: the whole reply to a
/// complete input stream that then half-closes.
///
/// ```
/// use xps::protocol::reverse_stream;
/// // CR LF is kept; the unterminated last line is answered without one.
/// assert_eq!(reverse_stream(b"abc\r\nxy", 100), b"cba\r\nyx");
/// // Lines longer than max_line come back in max_line-byte segments.
/// assert_eq!(reverse_stream(b"abcdef\n", 4), b"dcbafe\n");
/// ```
pub fn reverse_stream(input: &[u8], max_line: usize) -> Vec<u8> {
    let mut r = LineReverser::new(max_line);
    let mut out = Vec::with_capacity(input.len());
    r.feed(input, &mut out);
    r.finish(&mut out);
    out
}

/// The plain model of SPEC §2 the proptests compare with (shared with the
/// fuzz target).
#[cfg(test)]
#[path = "../../tests/common/model.rs"]
mod model;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rev(input: &[u8]) -> Vec<u8> {
        let mut r = LineReverser::new(DEFAULT_MAX_LINE);
        let mut out = Vec::new();
        r.feed(input, &mut out);
        out
    }

    #[test]
    fn lf_line() {
        assert_eq!(rev(b"abc\n"), b"cba\n");
    }

    #[test]
    fn crlf_line_keeps_crlf() {
        assert_eq!(rev(b"abc\r\n"), b"cba\r\n");
    }

    #[test]
    fn empty_lines() {
        assert_eq!(rev(b"\n"), b"\n");
        assert_eq!(rev(b"\r\n"), b"\r\n");
        assert_eq!(rev(b"\n\n\r\n"), b"\n\n\r\n");
    }

    #[test]
    fn cr_inside_a_line_is_content() {
        assert_eq!(rev(b"a\rb\n"), b"b\ra\n");
        assert_eq!(rev(b"\r\r\n"), b"\r\r\n");
    }

    #[test]
    fn several_lines_in_order() {
        assert_eq!(rev(b"one\ntwo\r\nthree\n"), b"eno\nowt\r\neerht\n");
    }

    #[test]
    fn unterminated_line_waits() {
        let mut r = LineReverser::new(100);
        let mut out = Vec::new();
        r.feed(b"abc", &mut out);
        assert!(out.is_empty());
        assert_eq!(r.pending(), 3);
        r.feed(b"d\n", &mut out);
        assert_eq!(out, b"dcba\n");
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn half_close_answers_the_last_line_without_terminator() {
        let mut r = LineReverser::new(100);
        let mut out = Vec::new();
        r.feed(b"abc\ndef", &mut out);
        r.finish(&mut out);
        assert_eq!(out, b"cba\nfed");
        // A trailing CR with no LF is content.
        assert_eq!(reverse_stream(b"xy\r", 100), b"\ryx");
        // Nothing unterminated: nothing more.
        assert_eq!(reverse_stream(b"ab\n", 100), b"ba\n");
        assert_eq!(reverse_stream(b"", 100), b"");
    }

    #[test]
    fn combining_accent_stays_on_its_letter() {
        // "he\u{301}llo": e + COMBINING ACUTE is one grapheme.
        let input = "he\u{301}llo\n".as_bytes();
        assert_eq!(rev(input), "olle\u{301}h\n".as_bytes());
    }

    #[test]
    fn precomposed_and_emoji_family_stay_whole() {
        let family = "\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}";
        let input = format!("a{family}b\u{e9}\n");
        let want = format!("\u{e9}b{family}a\n");
        assert_eq!(rev(input.as_bytes()), want.as_bytes());
        // Flags (regional-indicator pairs) too.
        let flag = "\u{1F1EE}\u{1F1F3}";
        assert_eq!(
            rev(format!("x{flag}y\r\n").as_bytes()),
            format!("y{flag}x\r\n").as_bytes()
        );
    }

    #[test]
    fn invalid_utf8_is_reversed_by_bytes() {
        assert_eq!(rev(b"\xff\xfeab\n"), b"ba\xfe\xff\n");
        // A valid multi-byte char next to an invalid byte: the whole line is
        // not UTF-8, so its bytes are reversed.
        assert_eq!(rev(b"\xc3\xa9\xff\n"), b"\xff\xa9\xc3\n");
    }

    #[test]
    fn nul_and_binary_bytes_are_content() {
        assert_eq!(rev(b"a\0b\n"), b"b\0a\n");
        assert_eq!(rev(b"\0\x01\x02\r\n"), b"\x02\x01\0\r\n");
    }

    #[test]
    fn overlong_line_goes_out_in_segments() {
        let mut r = LineReverser::new(4);
        let mut out = Vec::new();
        r.feed(b"abcdefghij\n", &mut out);
        assert_eq!(out, b"dcbahgfeji\n");
        // Streaming, segments leave as soon as they are known to be full.
        let mut r = LineReverser::new(4);
        let mut out = Vec::new();
        r.feed(b"abcde", &mut out);
        assert_eq!(out, b"dcba");
        assert_eq!(r.pending(), 1);
        r.feed(b"f\n", &mut out);
        assert_eq!(out, b"dcbafe\n");
    }

    #[test]
    fn line_of_exactly_max_line_is_one_reply() {
        assert_eq!(reverse_stream(b"abcd\n", 4), b"dcba\n");
        assert_eq!(reverse_stream(b"abcd\r\n", 4), b"dcba\r\n");
        // Streamed one byte at a time, the same bytes come out.
        for input in [&b"abcd\r\n"[..], b"abcd\n", b"abcde\r\n", b"abc\r\r\n"] {
            let mut r = LineReverser::new(4);
            let mut out = Vec::new();
            for b in input {
                r.feed(std::slice::from_ref(b), &mut out);
            }
            r.finish(&mut out);
            assert_eq!(out, reverse_stream(input, 4), "input {input:?}");
        }
    }

    #[test]
    fn unterminated_input_is_bounded_by_max_line() {
        let mut r = LineReverser::new(1000);
        let mut out = Vec::new();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..64 {
            r.feed(&chunk, &mut out);
            assert!(r.pending() <= 1000);
            assert!(r.capacity() <= 70 * 1024);
            out.clear();
        }
    }

    #[test]
    #[should_panic(expected = "lengths differ")]
    fn reverse_into_wants_equal_lengths() {
        reverse_into(b"abc", &mut [0u8; 2]);
    }

    #[test]
    fn max_line_zero_is_treated_as_one() {
        assert_eq!(reverse_stream(b"ab\n", 0), b"ab\n");
    }

    #[test]
    fn the_tutorials_per_recv_bug_is_absent() {
        // eXpServer's C read handler reverses each recv(): "ab" + "c\n"
        // comes back as "ba" + "\nc". Here it is one line.
        let mut r = LineReverser::new(100);
        let mut out = Vec::new();
        r.feed(b"ab", &mut out);
        r.feed(b"c\n", &mut out);
        assert_eq!(out, b"cba\n");
    }

    #[test]
    fn reply_counts_are_exact() {
        let mut out = Vec::new();
        let mut r = LineReverser::new(100);
        assert_eq!(r.feed(b"", &mut out), 0);
        assert_eq!(r.feed(b"one\ntwo\r\n\n", &mut out), 3);
        assert_eq!(r.feed(b"thr", &mut out), 0);
        assert_eq!(r.feed(b"ee\nfo", &mut out), 1);
        assert_eq!(r.finish(&mut out), 1);
        // Nothing held: finish appends nothing and counts nothing.
        assert_eq!(r.finish(&mut out), 0);
        assert_eq!(out, b"eno\nowt\r\n\neerht\nof");
        // Segments count one each: "dcba" "hgfe" "ji\n".
        let mut r = LineReverser::new(4);
        assert_eq!(r.feed(b"abcdefghij\n", &mut out), 3);
        // Streamed: a segment as soon as it is full, then the rest.
        assert_eq!(r.feed(b"abcde", &mut out), 1);
        assert_eq!(r.feed(b"fghij", &mut out), 1);
        assert_eq!(r.feed(b"\n", &mut out), 1);
        // max_line content + CR LF: a segment, then an empty CRLF line, both
        // whole and streamed.
        assert_eq!(r.feed(b"abcd\r\n", &mut out), 2);
        assert_eq!(r.feed(b"abcd\r", &mut out), 1);
        assert_eq!(r.feed(b"\n", &mut out), 1);
        // The plain reference counts the same.
        let mut p = LineReverser::new(4);
        assert_eq!(p.feed_plain(b"abcdefghij\nxy", &mut out), 3);
        assert_eq!(p.finish_plain(&mut out), 1);
    }

    /// Feeds `input` in the chunks `cuts` describes, then half-closes.
    fn feed_split(input: &[u8], cuts: &[usize], max_line: usize) -> Vec<u8> {
        feed_split_counted(input, cuts, max_line).0
    }

    /// [`feed_split`], also returning the sum of the reply counts.
    fn feed_split_counted(input: &[u8], cuts: &[usize], max_line: usize) -> (Vec<u8>, usize) {
        let mut r = LineReverser::new(max_line);
        let mut out = Vec::new();
        let mut replies = 0;
        for chunk in chunks(input, cuts) {
            replies += r.feed(chunk, &mut out);
        }
        replies += r.finish(&mut out);
        (out, replies)
    }

    /// `input` cut into the pieces `cuts` describes (each cut taken modulo
    /// what is left, so a cut may give an empty piece); the rest is the last.
    fn chunks<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut pieces = Vec::new();
        let mut rest = input;
        for &c in cuts {
            if rest.is_empty() {
                break;
            }
            let (a, b) = rest.split_at(c % (rest.len() + 1));
            pieces.push(a);
            rest = b;
        }
        pieces.push(rest);
        pieces
    }

    /// Any bytes: the structured [`stream`], plain random bytes, and random
    /// bytes dense in LF and CR with lines around the fast path's 16- and
    /// 64-byte steps.
    fn any_bytes() -> impl Strategy<Value = Vec<u8>> {
        let dense = prop_oneof![
            4 => any::<u8>(),
            2 => Just(b'\n'),
            1 => Just(b'\r'),
            4 => b' '..=b'~',
        ];
        prop_oneof![
            stream(),
            prop::collection::vec(any::<u8>(), 0..600),
            prop::collection::vec(dense, 0..600),
        ]
    }

    /// Lines that mix ASCII, CR, LF, multi-byte UTF-8, combining marks,
    /// emoji and invalid bytes.
    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"a".to_vec()),
            Just(b"Z9 ".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"\r".to_vec()),
            Just("\u{e9}".as_bytes().to_vec()),
            Just("e\u{301}".as_bytes().to_vec()),
            Just("\u{1F468}\u{200D}\u{1F469}".as_bytes().to_vec()),
            Just(b"\xff".to_vec()),
            Just(b"\xc3".to_vec()),
            Just(b"\0".to_vec()),
            any::<u8>().prop_map(|b| vec![b]),
            // Long ASCII runs, so lines reach past 64 bytes too.
            prop::collection::vec(b' '..=b'~', 0..100),
        ];
        prop::collection::vec(piece, 0..200).prop_map(|v| v.concat())
    }

    /// Text made of whole grapheme clusters that each start with a base
    /// character, so reversing by clusters can be undone.
    fn reversible_line() -> impl Strategy<Value = Vec<u8>> {
        let cluster = prop_oneof![
            "[a-zA-Z0-9 ,.!?]".prop_map(String::from),
            Just("\u{e9}".to_string()),
            Just("e\u{301}".to_string()),
            Just("\u{4e2d}".to_string()),
            Just("\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}".to_string()),
            Just("\u{1F1EE}\u{1F1F3}".to_string()),
        ];
        prop::collection::vec(cluster, 0..60).prop_map(|v| v.concat().into_bytes())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever way TCP splits the stream, the replies are the same.
        #[test]
        fn output_is_independent_of_splitting(
            input in stream(),
            cuts in prop::collection::vec(any::<usize>(), 0..20),
            max_line in 1usize..40,
        ) {
            let whole = reverse_stream(&input, max_line);
            prop_assert_eq!(feed_split(&input, &cuts, max_line), whole);
        }

        /// The output is what the plain model of SPEC §2 gives, for any
        /// split; line lengths span the 16-byte steps of the byte reversal
        /// and the 64-byte hand-over of the LF search.
        #[test]
        fn matches_the_spec_model(
            input in stream(),
            cuts in prop::collection::vec(any::<usize>(), 0..20),
            max_line in prop_oneof![1usize..40, Just(DEFAULT_MAX_LINE)],
        ) {
            prop_assert_eq!(feed_split(&input, &cuts, max_line), model::model(&input, max_line));
        }

        /// The fast path gives exactly the plain reference's bytes: the same
        /// replies after every read, the same counts, the same bytes held.
        #[test]
        fn fast_path_matches_plain_reference(
            input in any_bytes(),
            cuts in prop::collection::vec(any::<usize>(), 0..20),
            max_line in prop_oneof![1usize..40, 40usize..200, Just(DEFAULT_MAX_LINE)],
        ) {
            let mut fast = LineReverser::new(max_line);
            let mut plain = LineReverser::new(max_line);
            let (mut fast_out, mut plain_out) = (Vec::new(), Vec::new());
            for chunk in chunks(&input, &cuts) {
                let n_fast = fast.feed(chunk, &mut fast_out);
                let n_plain = plain.feed_plain(chunk, &mut plain_out);
                prop_assert_eq!(n_fast, n_plain);
                prop_assert_eq!(&fast_out, &plain_out);
                prop_assert_eq!(fast.pending(), plain.pending());
            }
            prop_assert_eq!(fast.finish(&mut fast_out), plain.finish_plain(&mut plain_out));
            prop_assert_eq!(fast_out, plain_out);
        }

        /// `reverse_into` (fast) against the plain reversal, on any line
        /// content (anything without a LF).
        #[test]
        fn fast_reversal_matches_plain(line in any_bytes()) {
            let content: Vec<u8> = line.into_iter().filter(|&b| b != b'\n').collect();
            let (mut fast, mut plain) = (vec![0; content.len()], vec![0; content.len()]);
            reverse_into(&content, &mut fast);
            Plain::reverse(&content, &mut plain);
            prop_assert_eq!(fast, plain);
        }

        /// The counts `feed` and `finish` return add up to exactly the
        /// number of replies in the model, for any split.
        #[test]
        fn reply_count_matches_the_model(
            input in any_bytes(),
            cuts in prop::collection::vec(any::<usize>(), 0..20),
            max_line in prop_oneof![1usize..40, Just(DEFAULT_MAX_LINE)],
        ) {
            let (out, replies) = feed_split_counted(&input, &cuts, max_line);
            let want = model::replies(&input, max_line);
            prop_assert_eq!(replies, want.len());
            prop_assert_eq!(out, want.concat());
        }

        /// Byte by byte too (the extreme split).
        #[test]
        fn byte_by_byte_equals_whole(input in stream(), max_line in 1usize..40) {
            let cuts = vec![1; input.len()];
            prop_assert_eq!(feed_split(&input, &cuts, max_line), reverse_stream(&input, max_line));
        }

        /// Bytes out equal bytes in: same length, same multiset of bytes.
        #[test]
        fn bytes_out_equal_bytes_in(input in stream(), max_line in 1usize..40) {
            let out = reverse_stream(&input, max_line);
            prop_assert_eq!(out.len(), input.len());
            let (mut a, mut b) = (input.clone(), out);
            a.sort_unstable();
            b.sort_unstable();
            prop_assert_eq!(a, b);
        }

        /// Every LF in gives exactly one reply terminator out, in order:
        /// the output has as many LFs, and CRLF lines stay CRLF.
        #[test]
        fn one_reply_per_line(lines in prop::collection::vec(reversible_line(), 0..20), crlf in any::<bool>()) {
            let term: &[u8] = if crlf { b"\r\n" } else { b"\n" };
            let input: Vec<u8> = lines.iter().flat_map(|l| [l.as_slice(), term].concat()).collect();
            let out = reverse_stream(&input, DEFAULT_MAX_LINE);
            let replies: Vec<&[u8]> = out.split_inclusive(|&b| b == b'\n').collect();
            prop_assert_eq!(replies.len(), lines.len());
            for (reply, line) in replies.iter().zip(&lines) {
                prop_assert!(reply.ends_with(term));
                prop_assert_eq!(reply.len(), line.len() + term.len());
            }
        }

        /// Reversing a line twice restores it: for ASCII, for text made of
        /// whole grapheme clusters, and for lines reversed by bytes whose
        /// reversal is still not UTF-8. (It cannot hold for every input: a
        /// line starting with a lone combining mark, or invalid bytes whose
        /// reversal happens to be valid UTF-8, are segmented differently the
        /// second time. docs/protocol.md lists these.)
        #[test]
        fn reversing_twice_restores_ascii(line in "[ -~]{0,200}") {
            let once = reverse_stream(line.as_bytes(), DEFAULT_MAX_LINE);
            prop_assert_eq!(reverse_stream(&once, DEFAULT_MAX_LINE), line.as_bytes());
        }

        #[test]
        fn reversing_twice_restores_graphemes(line in reversible_line()) {
            let mut input = line.clone();
            input.push(b'\n');
            let once = reverse_stream(&input, DEFAULT_MAX_LINE);
            prop_assert_eq!(reverse_stream(&once, DEFAULT_MAX_LINE), input);
        }

        #[test]
        fn reversing_twice_restores_binary(line in prop::collection::vec(any::<u8>().prop_filter("no LF", |b| *b != b'\n'), 0..200)) {
            let mut once = vec![0; line.len()];
            reverse_into(&line, &mut once);
            prop_assume!(std::str::from_utf8(&line).is_err() && std::str::from_utf8(&once).is_err());
            let mut twice = vec![0; line.len()];
            reverse_into(&once, &mut twice);
            prop_assert_eq!(twice, line);
        }
    }
}
