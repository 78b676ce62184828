//! Fuzz target for the PROXY protocol header parser
//! (`xps::policy::proxy_protocol`, SPEC §6).
//!
//! Input layout: byte 0: `n = byte % 16`, the number of chunk-size bytes
//! that follow; the next `n` bytes: chunk sizes (0..=255, used cyclically; a
//! 0 feeds an empty slice), i.e. the way TCP split the stream; the rest: the
//! stream (seeds start with a header, so the fuzzer mutates real ones).
//!
//! Checked, for every input:
//!
//! 1. nothing panics;
//! 2. feeding the chunks to one `HeaderReader` gives what `parse` gives on
//!    the whole stream: the same header with the same remaining bytes, the
//!    same error, or nothing yet;
//! 3. the reader never buffers `MAX_HEADER` bytes or more between feeds, and
//!    is empty after a verdict;
//! 4. a header is at most `MAX_HEADER` bytes and parses alone to itself;
//! 5. when the independent `ppp` crate also reads the header, it finds the
//!    same command and addresses (ppp is laxer in places, so its errors are
//!    not compared).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use xps::policy::proxy_protocol::{Command, HeaderReader, MAX_HEADER, Parsed, ProxyHeader, parse};

type Outcome = Result<Option<(ProxyHeader, Vec<u8>)>, xps::policy::proxy_protocol::ProxyError>;

fn chunked(sizes: &[u8], input: &[u8]) -> Outcome {
    let mut r = HeaderReader::new();
    let mut off = 0;
    let mut k = 0;
    // An all-zero size list would never progress: bound the empty feeds.
    while off < input.len() || k == 0 {
        let size = match sizes.get(k % sizes.len().max(1)) {
            Some(&s) if k < 4 * input.len() + 4 => usize::from(s).min(input.len() - off),
            _ => input.len() - off,
        };
        k += 1;
        let chunk = &input[off..off + size];
        let got = r.feed(chunk);
        match got {
            Ok(Some((h, rest_start))) => {
                assert_eq!(r.buffered(), 0);
                assert!(rest_start <= chunk.len());
                let mut rest = chunk[rest_start..].to_vec();
                rest.extend_from_slice(&input[off + size..]);
                return Ok(Some((h, rest)));
            }
            Ok(None) => assert!(r.buffered() < MAX_HEADER),
            Err(e) => {
                assert_eq!(r.buffered(), 0);
                return Err(e);
            }
        }
        off += size;
    }
    Ok(None)
}

fn ppp_reading(bytes: &[u8]) -> Option<(bool, Option<SocketAddr>, Option<SocketAddr>)> {
    use ppp::HeaderResult;
    let pair = |s: SocketAddr, d: SocketAddr| (Some(s), Some(d));
    match HeaderResult::parse(bytes) {
        HeaderResult::V1(Ok(h)) => Some(match h.addresses {
            ppp::v1::Addresses::Unknown => (false, None, None),
            ppp::v1::Addresses::Tcp4(a) => {
                let (s, d) = pair(
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                );
                (false, s, d)
            }
            ppp::v1::Addresses::Tcp6(a) => {
                let (s, d) = pair(
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                );
                (false, s, d)
            }
        }),
        HeaderResult::V2(Ok(h)) => {
            let local = h.command == ppp::v2::Command::Local;
            let (s, d) = match h.addresses {
                _ if local => (None, None),
                ppp::v2::Addresses::IPv4(a) => pair(
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                ),
                ppp::v2::Addresses::IPv6(a) => pair(
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                ),
                _ => (None, None),
            };
            Some((local, s, d))
        }
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let (sizes, input): (&[u8], &[u8]) = match data.split_first() {
        None => (&[], &[]),
        Some((&b0, rest)) => rest.split_at(usize::from(b0 % 16).min(rest.len())),
    };

    // 2: split vs whole.
    let whole = parse(input);
    let expected: Outcome = match whole {
        Ok(Parsed::Incomplete) => Ok(None),
        Ok(Parsed::Done { header, len }) => Ok(Some((header, input[len..].to_vec()))),
        Err(e) => Err(e),
    };
    assert_eq!(chunked(sizes, input), expected);
    assert_eq!(chunked(&[1], input), expected, "byte by byte");

    if let Ok(Parsed::Done { header, len }) = whole {
        // 4
        assert!(len <= MAX_HEADER);
        assert_eq!(parse(&input[..len]), whole);
        assert!(matches!(header.version, 1 | 2));
        assert_eq!(header.source.is_some(), header.destination.is_some());
        // 5
        if let Some((local, s, d)) = ppp_reading(&input[..len]) {
            assert_eq!(local, header.command == Command::Local);
            assert_eq!((s, d), (header.source, header.destination));
        }
    }
});
