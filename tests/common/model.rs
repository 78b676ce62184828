//! An independent model of SPEC §2, for differential tests: the proptests in
//! `src/protocol/mod.rs` and the `protocol` fuzz target check `LineReverser`
//! against it. It works on the whole stream at once and favours plainness
//! over speed, so that it can be checked by reading.

use unicode_segmentation::UnicodeSegmentation;

/// SPEC §2, written without looking at how `LineReverser` streams: split the
/// whole stream at LF; in each line cut `max_line`-byte segments off the front
/// while more than `max_line` raw bytes (a trailing CR included) remain; the
/// rest is the line's last piece, answered with its terminator (`\r\n` if it
/// ended with CR, else `\n`), or with none for an unterminated last line.
pub fn model(input: &[u8], max_line: usize) -> Vec<u8> {
    replies(input, max_line).concat()
}

/// [`model`] as the list of its replies, in order: one per segment of an
/// overlong line, one per complete line, and one for a non-empty
/// unterminated last piece (what `LineReverser::feed` and `finish` count).
pub fn replies(input: &[u8], max_line: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut lines: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    // `split` yields one piece more than there are LFs: the unterminated tail
    // (empty when the stream ends with LF or is empty).
    let tail = lines.pop().unwrap_or(&[]);
    for line in lines {
        let last = segments(line, max_line, &mut out);
        let reply = match last.strip_suffix(b"\r") {
            Some(content) => [rev(content), b"\r\n".to_vec()].concat(),
            None => [rev(last), b"\n".to_vec()].concat(),
        };
        out.push(reply);
    }
    let last = segments(tail, max_line, &mut out);
    if !last.is_empty() {
        out.push(rev(last));
    }
    out
}

fn segments<'a>(mut raw: &'a [u8], max_line: usize, out: &mut Vec<Vec<u8>>) -> &'a [u8] {
    while raw.len() > max_line {
        out.push(rev(&raw[..max_line]));
        raw = &raw[max_line..];
    }
    raw
}

/// Grapheme-cluster reversal for valid UTF-8, byte reversal otherwise (for
/// ASCII the two agree: no line content holds a CR LF pair).
fn rev(content: &[u8]) -> Vec<u8> {
    match std::str::from_utf8(content) {
        Ok(s) => s
            .graphemes(true)
            .rev()
            .flat_map(str::as_bytes)
            .copied()
            .collect(),
        Err(_) => content.iter().rev().copied().collect(),
    }
}
