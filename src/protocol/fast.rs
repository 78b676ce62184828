//! The fast path: the same two operations as the plain ones in [`super`]
//! (find the next LF, reverse a line's content), written for speed: an SSE2
//! compare mask finds a LF in the first 64 bytes (`memchr` past them), and
//! the byte reversal walks inwards 16 bytes at a time, noting on the way
//! whether the content was ASCII.
//!
//! At 64-byte lines the server spends most of its user time in these two
//! loops. They must give exactly the plain form's bytes, and that is tested,
//! not argued: the proptest `fast_path_matches_plain_reference` feeds
//! arbitrary input through both ([`super::LineReverser::feed`] and
//! [`super::LineReverser::feed_plain`]), and the fuzz target does the same.
//! `docs/protocol.md` ("The fast path") has the measurements and the details.

use super::{LineOps, reverse_graphemes};

/// The fast forms of [`LineOps`], used by [`super::LineReverser::feed`].
pub(super) struct Fast;

impl LineOps for Fast {
    #[inline(always)]
    fn find_lf(bytes: &[u8]) -> Option<usize> {
        find_lf(bytes)
    }

    #[inline(always)]
    fn reverse(content: &[u8], dst: &mut [u8]) {
        // Reverse by bytes first, noting on the way whether any byte was
        // non-ASCII: one pass instead of an `is_ascii` pass plus a copy pass.
        // In ASCII every byte is its own grapheme cluster (CR LF, the one
        // exception, cannot occur inside a line), so that is the answer.
        if !reverse_bytes(content, dst) {
            reverse_non_ascii(content, dst);
        }
    }
}

/// Position of the first LF in `bytes`.
///
/// Most lines are short, and for them `memchr`'s set-up (a call through a
/// function pointer, alignment handling for 32-byte vectors) costs more than
/// the search: on x86-64 the first 64 bytes are searched here with SSE2 (one
/// mask for all 64, so a 64-byte line costs one test, not four), and
/// `memchr` takes over only for longer lines, where its wider vectors win.
#[cfg(target_arch = "x86_64")]
#[inline]
fn find_lf(bytes: &[u8]) -> Option<usize> {
    const INLINE_SCAN: usize = 64;
    if let Some(block) = bytes.first_chunk::<INLINE_SCAN>() {
        let mut mask = 0u64;
        for (k, chunk) in block.chunks_exact(16).enumerate() {
            mask |= u64::from(lf_mask(chunk.try_into().expect("16 bytes"))) << (16 * k);
        }
        if mask != 0 {
            return Some(mask.trailing_zeros() as usize);
        }
        return memchr::memchr(b'\n', &bytes[INLINE_SCAN..]).map(|i| INLINE_SCAN + i);
    }
    // Fewer than 64 bytes: 16 at a time, the last chunk padded with zeros
    // (which are not LF).
    for (k, chunk) in bytes.chunks(16).enumerate() {
        let mut padded = [0u8; 16];
        padded[..chunk.len()].copy_from_slice(chunk);
        let mask = lf_mask(&padded);
        if mask != 0 {
            return Some(16 * k + mask.trailing_zeros() as usize);
        }
    }
    None
}

/// Bit `i` set where byte `i` of `chunk` is LF (SSE2 `pcmpeqb` + `pmovmskb`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lf_mask(chunk: &[u8; 16]) -> u16 {
    use std::arch::x86_64::{_mm_cmpeq_epi8, _mm_movemask_epi8, _mm_set_epi64x, _mm_set1_epi8};
    let (lo, hi) = chunk.split_at(8);
    let lo = u64::from_le_bytes(lo.try_into().expect("8 bytes"));
    let hi = u64::from_le_bytes(hi.try_into().expect("8 bytes"));
    // SAFETY: SSE2 is part of the x86-64 baseline, so these intrinsics are
    // always available; none of them touches memory.
    let mask = unsafe {
        let v = _mm_set_epi64x(hi as i64, lo as i64);
        _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'\n' as i8)))
    };
    mask as u16
}

/// Position of the first LF in `bytes`.
#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn find_lf(bytes: &[u8]) -> Option<usize> {
    memchr::memchr(b'\n', bytes)
}

/// The rest of [`Fast::reverse`] for content that is not all ASCII, after
/// the byte reversal: valid UTF-8 is redone by extended grapheme clusters;
/// for anything else the byte reversal stands. Kept out of line, so that the
/// segmenter's state does not make every ASCII line save and restore
/// registers.
#[inline(never)]
fn reverse_non_ascii(content: &[u8], dst: &mut [u8]) {
    if let Ok(text) = std::str::from_utf8(content) {
        reverse_graphemes(text, dst);
    }
}

/// Mask of the high bit of every byte of a `u128`: zero in ASCII.
const HIGH_BITS: u128 = u128::from_ne_bytes([0x80; 16]);

/// Writes `src` in reverse byte order to `dst` (the same length) and returns
/// whether every byte was ASCII, in one pass and without a byte-by-byte
/// tail: it works inwards from both ends a word at a time, like an in-place
/// reversal. Each step loads the next word from the front and the next from
/// the back, byte-swaps them (`bswap`) and stores each at the other end; the
/// last step's two words overlap in the middle unless the length is a
/// multiple of twice the word, and overlapping stores write the same bytes.
/// The word is the widest of 16, 8, 4 and 2 bytes that fits. (A copy
/// followed by `<[u8]>::reverse` reads and writes everything twice.)
#[inline(always)]
fn reverse_bytes(src: &[u8], dst: &mut [u8]) -> bool {
    let n = src.len();
    debug_assert_eq!(n, dst.len());
    macro_rules! inwards {
        ($size:literal, $word:ty) => {{
            // Invariant: `k` bytes are done at each end, and k + $size <= n.
            let mut seen: $word = 0;
            let mut k = 0;
            loop {
                let front = <$word>::from_le_bytes(src[k..k + $size].try_into().expect("word"));
                let back =
                    <$word>::from_le_bytes(src[n - k - $size..n - k].try_into().expect("word"));
                dst[k..k + $size].copy_from_slice(&back.swap_bytes().to_le_bytes());
                dst[n - k - $size..n - k].copy_from_slice(&front.swap_bytes().to_le_bytes());
                seen |= front | back;
                if n - 2 * k <= 2 * $size {
                    break;
                }
                k += $size;
            }
            u128::from(seen) & HIGH_BITS == 0
        }};
    }
    match n {
        16.. => inwards!(16, u128),
        8.. => inwards!(8, u64),
        4.. => inwards!(4, u32),
        2.. => inwards!(2, u16),
        _ => {
            dst.copy_from_slice(src);
            src.is_ascii()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_reversal_of_every_length() {
        for len in 0..300usize {
            let line: Vec<u8> = (0..len).map(|i| (i * 7 + 1) as u8).collect();
            let mut out = vec![b'#'; len + 2];
            let ascii = reverse_bytes(&line, &mut out[1..=len]);
            assert_eq!(ascii, line.is_ascii(), "len {len}");
            let mut want = line.clone();
            want.reverse();
            // Exactly the region is written, nothing around it.
            assert_eq!(out[0], b'#');
            assert_eq!(out[len + 1], b'#');
            assert_eq!(&out[1..=len], &want[..], "len {len}");
            // The ASCII verdict, at every length and every position.
            let mut text: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let mut dst = vec![0; len];
            assert!(reverse_bytes(&text, &mut dst), "len {len}");
            for pos in 0..len {
                text[pos] = 0x80;
                assert!(!reverse_bytes(&text, &mut dst), "len {len} at {pos}");
                text[pos] = b'a';
            }
        }
    }

    #[test]
    fn line_end_found_at_every_position() {
        // Every line length around the 16-byte steps and the hand-over to
        // memchr at 64 bytes, with and without a second LF after it.
        for len in 0..200usize {
            let mut bytes = vec![b'x'; len];
            assert_eq!(find_lf(&bytes), None, "len {len}");
            bytes.push(b'\n');
            bytes.extend_from_slice(b"ab\ncd");
            assert_eq!(find_lf(&bytes), Some(len), "len {len}");
            assert_eq!(find_lf(&bytes[..=len]), Some(len), "len {len}");
        }
        // Bytes that differ from LF in one bit are not LF.
        assert_eq!(find_lf(&[0x0b, 0x08, 0x8a, 0x0e, 0x1a, 0x4a]), None);
    }
}
