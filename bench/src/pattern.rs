//! Precomputed request lines and the replies they must get.
//!
//! A few distinct lines of `size` bytes (the last one is `\n`) are laid out
//! in a periodic stream: line `i` of any connection is pattern `i % K`. The
//! stream is repeated until one period is at least `min_period` bytes, so a
//! write or a verification is one slice (or two at the wrap) and checking a
//! reply is a `memcmp` against the expected stream at the same offset.

use crate::Verify;

/// Number of distinct line contents.
pub const K: usize = 4;

pub struct Patterns {
    /// Bytes per line, terminator included.
    pub size: usize,
    /// One period of the request stream.
    tx: Vec<u8>,
    /// One period of the expected reply stream (same length as `tx`).
    exp: Vec<u8>,
    verify: Verify,
}

impl Patterns {
    pub fn new(size: usize, verify: Verify, min_period: usize) -> Patterns {
        assert!(size >= 1, "a line has at least its terminator");
        const ALPHABET: &[u8] =
            b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:-_+=!?()[]";
        let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut lines: Vec<Vec<u8>> = Vec::with_capacity(K);
        let mut replies: Vec<Vec<u8>> = Vec::with_capacity(K);
        for k in 0..K {
            let mut line = Vec::with_capacity(size);
            for j in 0..size - 1 {
                // xorshift64*: deterministic, distinct per pattern.
                rng ^= rng >> 12;
                rng ^= rng << 25;
                rng ^= rng >> 27;
                let r = rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33;
                // The first byte names the pattern so no two patterns are equal.
                let b = if j == 0 {
                    b'A' + k as u8
                } else {
                    ALPHABET[(r as usize) % ALPHABET.len()]
                };
                line.push(b);
            }
            line.push(b'\n');
            let reply = match verify {
                Verify::Reverse | Verify::None => {
                    let mut r: Vec<u8> = line[..size - 1].iter().rev().copied().collect();
                    r.push(b'\n');
                    r
                }
                Verify::Echo => line.clone(),
            };
            lines.push(line);
            replies.push(reply);
        }
        let reps = min_period.div_ceil(K * size).max(1);
        let mut tx = Vec::with_capacity(reps * K * size);
        let mut exp = Vec::with_capacity(reps * K * size);
        for _ in 0..reps {
            for k in 0..K {
                tx.extend_from_slice(&lines[k]);
                exp.extend_from_slice(&replies[k]);
            }
        }
        Patterns {
            size,
            tx,
            exp,
            verify,
        }
    }

    fn period(&self) -> usize {
        self.tx.len()
    }

    /// The request bytes at stream position `pos`, at most `max` of them.
    #[inline]
    pub fn tx_slice(&self, pos: u64, max: usize) -> &[u8] {
        let off = (pos % self.period() as u64) as usize;
        let n = max.min(self.period() - off);
        &self.tx[off..off + n]
    }

    /// Request line `k` (`k < K`) alone.
    pub fn line(&self, k: usize) -> &[u8] {
        &self.tx[k * self.size..(k + 1) * self.size]
    }

    /// Expected reply to line `k` (`k < K`) alone.
    pub fn reply(&self, k: usize) -> &[u8] {
        &self.exp[k * self.size..(k + 1) * self.size]
    }

    /// Whether `data` is what the reply stream holds at position `pos`.
    #[inline]
    pub fn check(&self, mut pos: u64, mut data: &[u8]) -> bool {
        if self.verify == Verify::None {
            return true;
        }
        let p = self.period();
        while !data.is_empty() {
            let off = (pos % p as u64) as usize;
            let n = data.len().min(p - off);
            if data[..n] != self.exp[off..off + n] {
                return false;
            }
            pos += n as u64;
            data = &data[n..];
        }
        true
    }

    /// Human-readable description of the first difference (for error reports).
    pub fn describe_mismatch(&self, pos: u64, data: &[u8]) -> String {
        let p = self.period() as u64;
        for (i, &b) in data.iter().enumerate() {
            let at = pos + i as u64;
            let want = self.exp[(at % p) as usize];
            if b != want {
                let line = at / self.size as u64;
                let col = at % self.size as u64;
                let lo = i.saturating_sub(col as usize);
                let hi = (lo + self.size).min(data.len());
                return format!(
                    "wrong reply byte at stream offset {at} (line {line}, column {col}): got {b:#04x}, want {want:#04x}; received line so far: {:?}",
                    String::from_utf8_lossy(&data[lo..hi])
                );
            }
        }
        "no mismatch".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_stream_is_consistent() {
        let p = Patterns::new(8, Verify::Reverse, 100);
        assert_eq!(p.period() % (K * 8), 0);
        assert!(p.period() >= 100);
        for k in 0..K {
            let mut want: Vec<u8> = p.line(k)[..7].iter().rev().copied().collect();
            want.push(b'\n');
            assert_eq!(p.reply(k), &want[..]);
        }
        // Line 5 is pattern 1 and the check works across the wrap.
        let pos = 5 * 8;
        assert!(p.check(pos, p.reply(1)));
        assert!(!p.check(pos, p.reply(2)));
        let wrap = p.period() as u64 - 3;
        let mut data = p.exp[p.period() - 3..].to_vec();
        data.extend_from_slice(&p.exp[..5]);
        assert!(p.check(wrap, &data));
        assert!(p.tx_slice(wrap, 100).len() == 3);
    }

    #[test]
    fn echo_and_single_byte_lines() {
        let p = Patterns::new(1, Verify::Echo, 1);
        assert_eq!(p.line(0), b"\n");
        assert_eq!(p.reply(0), b"\n");
        let e = Patterns::new(16, Verify::Echo, 1);
        assert_eq!(e.line(3), e.reply(3));
        assert!(e.describe_mismatch(0, b"x").contains("offset 0"));
    }
}
