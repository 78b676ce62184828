//! The PROXY protocol header (HAProxy's `doc/proxy-protocol.txt`, v1 and v2)
//! as a pure, incremental parser: bytes in, then *need more*, a header, or an
//! error (SPEC §6).
//!
//! A listener opened with `--listen-proxy` sits behind an L4 balancer that
//! prepends one header to every connection, naming the real client. The
//! production hooks ([`crate::features`]) feed what each read returned to a
//! [`HeaderReader`] while the connection is in its preface
//! ([`crate::core::session`]); the bytes after the header are the client's
//! first lines. [`parse`] depends only on the bytes so far (split byte by
//! byte, a header gives what it gives whole), fails at the first byte no
//! continuation could make valid, and never buffers more than
//! [`MAX_HEADER`]. `docs/proxy-protocol.md` lists the accepted forms, the
//! limits, and why this is not the `ppp` crate.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// v1: the most bytes a header can take, CR LF included (the spec's 107).
pub const V1_MAX: usize = 107;
/// v2: the fixed part (signature, version/command, family, length).
pub const V2_FIXED: usize = 16;
/// v2: the largest declared length (address block + TLVs) accepted.
pub const V2_MAX_BLOCK: usize = 2048;
/// The most bytes ever buffered for one header, v1 or v2 (2064).
pub const MAX_HEADER: usize = V2_FIXED + V2_MAX_BLOCK;

/// The v2 signature, bytes 0..12 of every v2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The v1 line starts with these bytes, single space included.
const V1_PREFIX: &[u8] = b"PROXY ";

/// How long a connection on a PROXY listener may take to send its header
/// (SPEC §6).
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What was wrong with a PROXY-protocol connection's header (SPEC §6: each
/// refuses the connection with reason `proxy_header`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderFailure {
    /// The bytes can never become a valid header.
    Malformed(ProxyError),
    /// The client closed before the header was complete (or sent none).
    Closed,
    /// Not complete within [`HEADER_TIMEOUT`].
    Timeout,
    /// The peer is not in `--proxy-from`.
    Untrusted,
}

impl fmt::Display for HeaderFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderFailure::Malformed(e) => write!(f, "bad PROXY header ({e})"),
            HeaderFailure::Closed => f.write_str("closed before a complete PROXY header"),
            HeaderFailure::Timeout => write!(
                f,
                "no complete PROXY header within {} s",
                HEADER_TIMEOUT.as_secs()
            ),
            HeaderFailure::Untrusted => {
                f.write_str("peer not allowed by --proxy-from to send PROXY headers")
            }
        }
    }
}

/// What the header asks the receiver to do with the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// v2 `LOCAL`: the balancer's own connection (a health check); use the
    /// socket's addresses.
    Local,
    /// Relayed for a client: the header's addresses (if any) are the client's.
    /// Every v1 header is a `Proxy`.
    Proxy,
}

/// A complete, valid PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// Protocol version: 1 (text) or 2 (binary).
    pub version: u8,
    /// `Local` only for a v2 `LOCAL` header.
    pub command: Command,
    /// The real client's address; `None` for v1 `UNKNOWN`, v2 `LOCAL`, and
    /// v2 `PROXY` over `UNSPEC` or a UNIX socket (use the socket's own then).
    pub source: Option<SocketAddr>,
    /// The address the client connected to (the balancer's front end);
    /// `None` exactly when `source` is.
    pub destination: Option<SocketAddr>,
}

/// Why a prefix can never become a valid header. Each variant names one
/// failure; [`fmt::Display`] gives a short line that quotes none of the
/// client's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// Starts with neither `PROXY ` (v1) nor the v2 signature.
    BadSignature,
    /// v1: the protocol is not `TCP4`, `TCP6` or `UNKNOWN`.
    V1BadProtocol,
    /// v1: an address is not a valid address of the line's family.
    V1BadAddress,
    /// v1: a port is not a decimal 0..=65535 without leading zero.
    V1BadPort,
    /// v1: the line ends (CR) before the destination port.
    V1MissingField,
    /// v1: something follows the destination port before the CR.
    V1ExtraField,
    /// v1: a LF not preceded by CR, or a CR not followed by LF.
    V1BadLineEnding,
    /// v1: no CR LF within 107 bytes (or the fields cannot fit in them).
    V1TooLong,
    /// v2: the version nibble is not 2.
    V2BadVersion,
    /// v2: the command nibble is neither LOCAL (0) nor PROXY (1).
    V2BadCommand,
    /// v2: the family/protocol byte is not one the spec defines.
    V2BadFamily,
    /// v2: PROXY over UDP, refused (xps serves TCP).
    V2Datagram,
    /// v2: the declared length is shorter than the family's address block.
    V2ShortAddresses,
    /// v2: the declared length is over [`V2_MAX_BLOCK`].
    V2TooLong,
}

impl ProxyError {
    /// The one-line description, also usable as a static label.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyError::BadSignature => "not a PROXY protocol header",
            ProxyError::V1BadProtocol => "PROXY v1: protocol is not TCP4, TCP6 or UNKNOWN",
            ProxyError::V1BadAddress => "PROXY v1: invalid address",
            ProxyError::V1BadPort => "PROXY v1: invalid port",
            ProxyError::V1MissingField => "PROXY v1: line ends before the destination port",
            ProxyError::V1ExtraField => "PROXY v1: extra field after the destination port",
            ProxyError::V1BadLineEnding => "PROXY v1: line not ended by CR LF",
            ProxyError::V1TooLong => "PROXY v1: no CR LF within 107 bytes",
            ProxyError::V2BadVersion => "PROXY v2: version is not 2",
            ProxyError::V2BadCommand => "PROXY v2: command is neither LOCAL nor PROXY",
            ProxyError::V2BadFamily => "PROXY v2: undefined address family or protocol",
            ProxyError::V2Datagram => "PROXY v2: PROXY over UDP refused",
            ProxyError::V2ShortAddresses => "PROXY v2: address block shorter than its family needs",
            ProxyError::V2TooLong => "PROXY v2: declared length over 2048 bytes",
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for ProxyError {}

/// The verdict on a prefix that is still a possible header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Valid so far; more bytes are needed.
    Incomplete,
    /// A complete header: `prefix[..len]` is the header, the rest belongs to
    /// the client's protocol.
    Done {
        /// The header read.
        header: ProxyHeader,
        /// Header bytes consumed (at most [`MAX_HEADER`]).
        len: usize,
    },
}

/// Parses the bytes received so far (stateless: call it again with more).
///
/// `Ok(Incomplete)` only while some continuation can still give a valid
/// header; `Err` as soon as none can. Never panics, reads at most
/// [`MAX_HEADER`] bytes of `prefix`.
pub fn parse(prefix: &[u8]) -> Result<Parsed, ProxyError> {
    match prefix.first() {
        None => Ok(Parsed::Incomplete),
        Some(b'P') => parse_v1(&prefix[..prefix.len().min(V1_MAX)]),
        Some(b'\r') => parse_v2(prefix),
        Some(_) => Err(ProxyError::BadSignature),
    }
}

/// One connection's header accumulator. Idle (nothing buffered) it holds no
/// heap memory; it never buffers more than [`MAX_HEADER`] bytes.
///
/// After it returns `Ok(Some(..))` or `Err`, it is empty again (as from
/// [`HeaderReader::new`]); the hooks drop it then.
#[derive(Debug, Default)]
pub struct HeaderReader {
    /// The header bytes received so far, when they came in several reads
    /// (empty while idle and when a header arrives in one read).
    buf: Vec<u8>,
}

impl HeaderReader {
    /// An empty reader.
    pub fn new() -> Self {
        HeaderReader { buf: Vec::new() }
    }

    /// Header bytes buffered now (0 when idle), for memory accounting.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Takes the bytes of an incomplete header out (to move the connection
    /// to another process, where a new reader is fed them again).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Feeds newly read bytes; `Ok(Some((header, rest_start)))` once complete, where
    /// `bytes[rest_start..]` are the client's first protocol bytes (must be answered).
    /// `Ok(None)`: all of `bytes` was header, more is needed.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
        if self.buf.is_empty() {
            // The common case, a header in one segment: no copy.
            return match parse(bytes)? {
                Parsed::Done { header, len } => Ok(Some((header, len))),
                Parsed::Incomplete => {
                    // Incomplete implies fewer than MAX_HEADER bytes.
                    self.buf.extend_from_slice(bytes);
                    Ok(None)
                }
            };
        }
        let old = self.buf.len();
        // A prefix of MAX_HEADER bytes is never Incomplete, and the verdict
        // on it is the verdict on any longer input: no need to copy more.
        let take = bytes.len().min(MAX_HEADER.saturating_sub(old));
        self.buf.extend_from_slice(&bytes[..take]);
        match parse(&self.buf) {
            Ok(Parsed::Incomplete) => Ok(None),
            Ok(Parsed::Done { header, len }) => {
                self.buf = Vec::new();
                // The old bytes were an incomplete prefix, so len > old.
                Ok(Some((header, len.saturating_sub(old))))
            }
            Err(e) => {
                self.buf = Vec::new();
                Err(e)
            }
        }
    }
}

// ---------------------------------------------------------------- v1 ----

/// The address family of a v1 `TCP4` / `TCP6` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// One of the four fields after `TCP4 ` / `TCP6 `.
#[derive(Debug, Clone, Copy)]
enum Field {
    Address(Family),
    Port,
}

impl Field {
    /// The shortest valid text of this field: `0.0.0.0`, `::`, `0`.
    fn min_len(self) -> usize {
        match self {
            Field::Address(Family::V4) => 7,
            Field::Address(Family::V6) => 2,
            Field::Port => 1,
        }
    }

    fn error(self) -> ProxyError {
        match self {
            Field::Address(_) => ProxyError::V1BadAddress,
            Field::Port => ProxyError::V1BadPort,
        }
    }

    /// The shortest suffix length that makes `t` a valid field, or `None`
    /// if no suffix can.
    fn completion(self, t: &[u8]) -> Option<usize> {
        match self {
            Field::Port => {
                let viable = t.len() <= 5
                    && t.iter().all(u8::is_ascii_digit)
                    && !(t.len() > 1 && t[0] == b'0')
                    && port_value(t) <= 65535;
                viable.then_some(usize::from(t.is_empty()))
            }
            Field::Address(family) => address_completion(family, t),
        }
    }
}

/// The decimal value of ASCII digits (at most 5, so no overflow).
fn port_value(t: &[u8]) -> u32 {
    t.iter()
        .fold(0u32, |v, d| v * 10 + u32::from(d.wrapping_sub(b'0')))
}

/// Suffixes tried to complete an IPv4 prefix, shortest first. Some suffix
/// of this list completes every completable prefix, in the fewest bytes
/// (`0` starts or extends an octet, `.0` adds one; the tests check it
/// against a brute-force search).
const V4_SUFFIXES: [&str; 8] = ["", "0", ".0", "0.0", ".0.0", "0.0.0", ".0.0.0", "0.0.0.0"];
/// The same for IPv6 (`::` closes any head, `:0` adds a group, the rest
/// finish an embedded IPv4 tail).
const V6_SUFFIXES: [&str; 10] = [
    "", "0", ":", "::", ":0", ".0", "0.0", ".0.0", "0.0.0", ".0.0.0",
];

/// The shortest suffix length that makes `t` a valid address of `family`
/// for the standard library's parser, or `None` if none does.
fn address_completion(family: Family, t: &[u8]) -> Option<usize> {
    let (max, suffixes): (usize, &[&str]) = match family {
        Family::V4 => (15, &V4_SUFFIXES),
        Family::V6 => (45, &V6_SUFFIXES),
    };
    let alphabet_ok = t.iter().all(|&c| match family {
        Family::V4 => c.is_ascii_digit() || c == b'.',
        Family::V6 => c.is_ascii_hexdigit() || c == b':' || c == b'.',
    });
    if t.len() > max || !alphabet_ok {
        return None;
    }
    let mut buf = [0u8; 64];
    buf[..t.len()].copy_from_slice(t);
    suffixes.iter().find_map(|s| {
        let n = t.len() + s.len();
        buf[t.len()..n].copy_from_slice(s.as_bytes());
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        let ok = match family {
            Family::V4 => text.parse::<Ipv4Addr>().is_ok(),
            Family::V6 => text.parse::<Ipv6Addr>().is_ok(),
        };
        ok.then_some(s.len())
    })
}

/// The bytes from `start` up to the first space, CR or LF (or the end), and
/// that terminator if present.
fn token(input: &[u8], start: usize) -> (&[u8], Option<u8>) {
    let rest = input.get(start..).unwrap_or(&[]);
    match rest
        .iter()
        .position(|&c| c == b' ' || c == b'\r' || c == b'\n')
    {
        Some(i) => (&rest[..i], Some(rest[i])),
        None => (rest, None),
    }
}

fn v1_done(source: Option<SocketAddr>, destination: Option<SocketAddr>, len: usize) -> Parsed {
    Parsed::Done {
        header: ProxyHeader {
            version: 1,
            command: Command::Proxy,
            source,
            destination,
        },
        len,
    }
}

/// v1. `input` starts with `P` and is at most 107 bytes (a 107-byte prefix
/// is always either a header or an error, so nothing later matters).
fn parse_v1(input: &[u8]) -> Result<Parsed, ProxyError> {
    let n = input.len().min(V1_PREFIX.len());
    if input[..n] != V1_PREFIX[..n] {
        return Err(ProxyError::BadSignature);
    }
    if input.len() < V1_PREFIX.len() {
        return Ok(Parsed::Incomplete);
    }
    let start = V1_PREFIX.len();
    let (proto, term) = token(input, start);
    let known: [&[u8]; 3] = [b"TCP4", b"TCP6", b"UNKNOWN"];
    if !known.iter().any(|k| k.starts_with(proto)) {
        return Err(ProxyError::V1BadProtocol);
    }
    let Some(term) = term else {
        return Ok(Parsed::Incomplete);
    };
    let after = start + proto.len(); // index of the terminator
    if term == b'\n' {
        return Err(ProxyError::V1BadLineEnding);
    }
    let family = match proto {
        b"TCP4" => Family::V4,
        b"TCP6" => Family::V6,
        b"UNKNOWN" if term == b' ' => return v1_unknown(input, after + 1),
        b"UNKNOWN" => return v1_unknown(input, after),
        _ => return Err(ProxyError::V1BadProtocol),
    };
    if term == b'\r' {
        return Err(ProxyError::V1MissingField);
    }
    v1_fields(input, after + 1, family)
}

/// v1 `UNKNOWN`: skip anything up to CR LF, from `start`.
fn v1_unknown(input: &[u8], start: usize) -> Result<Parsed, ProxyError> {
    for (i, &c) in input.iter().enumerate().skip(start) {
        match c {
            b'\r' => {
                // CR at i: the header would be i + 2 bytes.
                if i + 2 > V1_MAX {
                    return Err(ProxyError::V1TooLong);
                }
                return match input.get(i + 1) {
                    None => Ok(Parsed::Incomplete),
                    Some(b'\n') => Ok(v1_done(None, None, i + 2)),
                    Some(_) => Err(ProxyError::V1BadLineEnding),
                };
            }
            b'\n' => return Err(ProxyError::V1BadLineEnding),
            // i + 1 bytes with CR LF still to come.
            _ if i + 1 + 2 > V1_MAX => return Err(ProxyError::V1TooLong),
            _ => {}
        }
    }
    Ok(Parsed::Incomplete)
}

/// v1 `TCP4` / `TCP6`: source, destination, source port, destination port,
/// from `start`.
///
/// For each field, the verdict is taken at the first byte that makes the
/// prefix hopeless: a byte the field cannot continue with (its error), or
/// the point where the shortest possible rest of the line would pass 107
/// bytes ([`ProxyError::V1TooLong`]), whichever comes first.
fn v1_fields(input: &[u8], start: usize, family: Family) -> Result<Parsed, ProxyError> {
    let fields = [
        Field::Address(family),
        Field::Address(family),
        Field::Port,
        Field::Port,
    ];
    let mut pos = start;
    let mut addrs = [None::<std::net::IpAddr>; 2];
    let mut ports = [0u16; 2];
    for (i, &field) in fields.iter().enumerate() {
        // Shortest rest after this field's text: its terminator (space, or
        // CR LF for the last), then each later field at its shortest.
        let own_term = if i == 3 { 2 } else { 1 };
        let rest: usize = own_term
            + fields[i + 1..]
                .iter()
                .enumerate()
                .map(|(j, f)| f.min_len() + if i + 1 + j == 3 { 2 } else { 1 })
                .sum::<usize>();
        let (tok, term) = token(input, pos);
        // The longest completable prefix of the token, and its completion.
        let (good, completion) = match field.completion(tok) {
            Some(c) => (tok.len(), c),
            None => {
                let mut best = (0, field.completion(&[]).unwrap_or(0));
                for k in 1..=tok.len().min(46) {
                    match field.completion(&tok[..k]) {
                        Some(c) => best = (k, c),
                        None => break,
                    }
                }
                best
            }
        };
        if pos + good + completion + rest > V1_MAX {
            return Err(ProxyError::V1TooLong);
        }
        if good < tok.len() {
            return Err(field.error());
        }
        let Some(term) = term else {
            return Ok(Parsed::Incomplete);
        };
        if term == b'\n' {
            return Err(ProxyError::V1BadLineEnding);
        }
        let text = std::str::from_utf8(tok).map_err(|_| field.error())?;
        match field {
            Field::Address(Family::V4) => {
                addrs[i] = Some(text.parse::<Ipv4Addr>().map_err(|_| field.error())?.into());
            }
            Field::Address(Family::V6) => {
                addrs[i] = Some(text.parse::<Ipv6Addr>().map_err(|_| field.error())?.into());
            }
            Field::Port => {
                if tok.is_empty() {
                    return Err(field.error());
                }
                // Checked by `completion`: digits, no leading zero, <= 65535.
                ports[i - 2] = u16::try_from(port_value(tok)).map_err(|_| field.error())?;
            }
        }
        let end = pos + tok.len(); // index of the terminator
        match (i, term) {
            (0..=2, b' ') => pos = end + 1,
            (0..=2, _) => return Err(ProxyError::V1MissingField),
            (_, b' ') => return Err(ProxyError::V1ExtraField),
            _ => {
                return match input.get(end + 1) {
                    None => Ok(Parsed::Incomplete),
                    Some(b'\n') => {
                        let [Some(src), Some(dst)] = addrs else {
                            return Err(ProxyError::V1BadAddress);
                        };
                        Ok(v1_done(
                            Some(SocketAddr::new(src, ports[0])),
                            Some(SocketAddr::new(dst, ports[1])),
                            end + 2,
                        ))
                    }
                    Some(_) => Err(ProxyError::V1BadLineEnding),
                };
            }
        }
    }
    // Unreachable: the last field always returns.
    Err(ProxyError::V1MissingField)
}

// ---------------------------------------------------------------- v2 ----

/// v2. `input` starts with CR.
fn parse_v2(input: &[u8]) -> Result<Parsed, ProxyError> {
    let n = input.len().min(V2_SIGNATURE.len());
    if input[..n] != V2_SIGNATURE[..n] {
        return Err(ProxyError::BadSignature);
    }
    let Some(&ver_cmd) = input.get(12) else {
        return Ok(Parsed::Incomplete);
    };
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::V2BadVersion);
    }
    let command = match ver_cmd & 0x0F {
        0 => Command::Local,
        1 => Command::Proxy,
        _ => return Err(ProxyError::V2BadCommand),
    };
    let Some(&fam) = input.get(13) else {
        return Ok(Parsed::Incomplete);
    };
    // Address block size the family needs (for PROXY), per the spec.
    let need = match fam {
        0x00 => 0,
        0x11 | 0x12 => 12,
        0x21 | 0x22 => 36,
        0x31 | 0x32 => 216,
        _ => return Err(ProxyError::V2BadFamily),
    };
    if command == Command::Proxy && fam & 0x0F == 0x02 {
        return Err(ProxyError::V2Datagram);
    }
    let (Some(&hi), Some(&lo)) = (input.get(14), input.get(15)) else {
        return Ok(Parsed::Incomplete);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > V2_MAX_BLOCK {
        return Err(ProxyError::V2TooLong);
    }
    if command == Command::Proxy && len < need {
        return Err(ProxyError::V2ShortAddresses);
    }
    let total = V2_FIXED + len;
    let Some(block) = input.get(V2_FIXED..total) else {
        return Ok(Parsed::Incomplete);
    };
    let (source, destination) = match (command, fam) {
        (Command::Proxy, 0x11) => {
            let [s0, s1, s2, s3, d0, d1, d2, d3, sp0, sp1, dp0, dp1, ..] = *block else {
                return Err(ProxyError::V2ShortAddresses);
            };
            (
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::new(s0, s1, s2, s3),
                    u16::from_be_bytes([sp0, sp1]),
                ))),
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::new(d0, d1, d2, d3),
                    u16::from_be_bytes([dp0, dp1]),
                ))),
            )
        }
        (Command::Proxy, 0x21) => {
            let (Some(s), Some(d), Some(&[sp0, sp1, dp0, dp1])) =
                (block.get(0..16), block.get(16..32), block.get(32..36))
            else {
                return Err(ProxyError::V2ShortAddresses);
            };
            let (Ok(s), Ok(d)) = (<[u8; 16]>::try_from(s), <[u8; 16]>::try_from(d)) else {
                return Err(ProxyError::V2ShortAddresses);
            };
            (
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(s),
                    u16::from_be_bytes([sp0, sp1]),
                    0,
                    0,
                ))),
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(d),
                    u16::from_be_bytes([dp0, dp1]),
                    0,
                    0,
                ))),
            )
        }
        // LOCAL, UNSPEC, UNIX: the socket's own addresses apply.
        _ => (None, None),
    };
    Ok(Parsed::Done {
        header: ProxyHeader {
            version: 2,
            command,
            source,
            destination,
        },
        len: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn done(input: &[u8]) -> (ProxyHeader, usize) {
        match parse(input) {
            Ok(Parsed::Done { header, len }) => (header, len),
            other => panic!("expected a header from {input:?}, got {other:?}"),
        }
    }

    fn v1(src: &str, dst: &str) -> ProxyHeader {
        ProxyHeader {
            version: 1,
            command: Command::Proxy,
            source: Some(sa(src)),
            destination: Some(sa(dst)),
        }
    }

    const NONE_V1: ProxyHeader = ProxyHeader {
        version: 1,
        command: Command::Proxy,
        source: None,
        destination: None,
    };

    fn v2_bytes(ver_cmd: u8, fam: u8, len: u16, block: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(ver_cmd);
        v.push(fam);
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(block);
        v
    }

    fn v2_block(ver_cmd: u8, fam: u8, block: &[u8]) -> Vec<u8> {
        let len = u16::try_from(block.len()).expect("test block");
        v2_bytes(ver_cmd, fam, len, block)
    }

    /// Feeds `input` in chunks of the given sizes (cyclic; 0 = empty feed),
    /// then the rest at once. Returns the header and every byte after it.
    fn feed_split(
        input: &[u8],
        sizes: &[usize],
    ) -> Result<Option<(ProxyHeader, Vec<u8>)>, ProxyError> {
        let mut r = HeaderReader::new();
        let mut off = 0;
        let mut k = 0;
        loop {
            let size = if sizes.is_empty() || k >= 4 * input.len() + 4 {
                input.len() - off
            } else {
                sizes[k % sizes.len()].min(input.len() - off)
            };
            k += 1;
            let chunk = &input[off..off + size];
            if let Some((h, rest_start)) = r.feed(chunk)? {
                assert_eq!(r.buffered(), 0);
                let mut rest = chunk[rest_start..].to_vec();
                rest.extend_from_slice(&input[off + size..]);
                return Ok(Some((h, rest)));
            }
            assert!(r.buffered() < MAX_HEADER);
            off += size;
            if off == input.len() && (size > 0 || sizes.is_empty() || k > 4 * input.len() + 4) {
                return Ok(None);
            }
        }
    }

    /// What feeding everything at once must give.
    fn whole(input: &[u8]) -> Result<Option<(ProxyHeader, Vec<u8>)>, ProxyError> {
        Ok(match parse(input)? {
            Parsed::Incomplete => None,
            Parsed::Done { header, len } => Some((header, input[len..].to_vec())),
        })
    }

    fn byte_by_byte(input: &[u8]) -> Result<Option<(ProxyHeader, Vec<u8>)>, ProxyError> {
        feed_split(input, &[1])
    }

    // ------------------------------------------------------------ v1 ----

    #[test]
    fn v1_tcp4() {
        let h = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
        assert_eq!(
            done(h),
            (v1("192.168.0.1:56324", "192.168.0.11:443"), h.len())
        );
        let h = b"PROXY TCP4 255.255.255.255 0.0.0.0 65535 0\r\n";
        assert_eq!(done(h), (v1("255.255.255.255:65535", "0.0.0.0:0"), h.len()));
    }

    #[test]
    fn v1_tcp6() {
        let h = b"PROXY TCP6 2001:db8::1 ::1 65535 8001\r\n";
        assert_eq!(done(h), (v1("[2001:db8::1]:65535", "[::1]:8001"), h.len()));
        let h = b"PROXY TCP6 ::ffff:1.2.3.4 FFFF:0:0:0:0:0:0:AbCd 1 2\r\n";
        assert_eq!(
            done(h),
            (v1("[::ffff:1.2.3.4]:1", "[ffff::abcd]:2"), h.len())
        );
    }

    #[test]
    fn v1_unknown_ignores_what_follows() {
        for h in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
            b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 80 443\r\n",
            b"PROXY UNKNOWN \xff\x00 junk\r\n",
        ] {
            assert_eq!(done(h), (NONE_V1, h.len()), "{h:?}");
        }
    }

    #[test]
    fn v1_107_bytes_is_the_limit() {
        let mut h = b"PROXY UNKNOWN ".to_vec();
        h.extend_from_slice(&[b'x'; 91]);
        h.extend_from_slice(b"\r\n");
        assert_eq!(h.len(), 107);
        assert_eq!(done(&h), (NONE_V1, 107));
        // 106 bytes without CR: the CR would be the 107th, LF the 108th.
        assert_eq!(parse(&h[..105]), Ok(Parsed::Incomplete));
        let mut long = h[..105].to_vec();
        long.push(b'x');
        assert_eq!(parse(&long), Err(ProxyError::V1TooLong));
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&long), Err(ProxyError::V1TooLong));

        // TCP6 of exactly 107 bytes.
        let h = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255 \
                  111:2222:3333:4444:5555:6666:7.8.9.1 65535 65535\r\n";
        assert_eq!(h.len(), 107);
        assert_eq!(
            done(h),
            (
                v1(
                    "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535",
                    "[111:2222:3333:4444:5555:6666:7.8.9.1]:65535"
                ),
                107
            )
        );
    }

    #[test]
    fn v1_too_long_is_seen_before_the_cr() {
        // 45 + 39-char addresses: the shortest end (" 65535 6\r\n" cut to
        // the ports already sent) cannot fit.
        let h = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255 \
                  ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 655";
        assert_eq!(h.len(), 106);
        assert_eq!(parse(&h[..105]), Ok(Parsed::Incomplete));
        assert_eq!(parse(h), Err(ProxyError::V1TooLong));
        // A line of spaces never reaches 107 bytes either.
        assert_eq!(parse(b"PROXY  "), Err(ProxyError::V1BadProtocol));
    }

    #[test]
    fn v1_errors_come_at_the_first_hopeless_byte() {
        let cases: &[(&[u8], ProxyError)] = &[
            (b"PROXY TCP4 999", ProxyError::V1BadAddress),
            (b"PROXY TCP4 1.2.3.256", ProxyError::V1BadAddress),
            (b"PROXY TCP4 01", ProxyError::V1BadAddress),
            (b"PROXY TCP4 1.2.3.4.", ProxyError::V1BadAddress),
            (b"PROXY TCP4 :", ProxyError::V1BadAddress),
            (b"PROXY TCP6 1.", ProxyError::V1BadAddress),
            (b"PROXY TCP6 1::2::", ProxyError::V1BadAddress),
            (b"PROXY TCP6 12345", ProxyError::V1BadAddress),
            (b"PROXY TCP6 ::g", ProxyError::V1BadAddress),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 08", ProxyError::V1BadPort),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536", ProxyError::V1BadPort),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +", ProxyError::V1BadPort),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999", ProxyError::V1BadPort),
            (b"PROXY TCP5", ProxyError::V1BadProtocol),
            (b"PROXY UD", ProxyError::V1BadProtocol),
            (b"PROXY UNKNOWNX", ProxyError::V1BadProtocol),
            (b"PROXY t", ProxyError::V1BadProtocol),
            (b"PROXY\r", ProxyError::BadSignature),
            (b"PROXX", ProxyError::BadSignature),
            (b"G", ProxyError::BadSignature),
            (b"\x16", ProxyError::BadSignature),
        ];
        for &(input, err) in cases {
            assert_eq!(parse(input), Err(err), "{}", input.escape_ascii());
            assert_eq!(
                parse(&input[..input.len() - 1]),
                Ok(Parsed::Incomplete),
                "{} is still possible",
                input.escape_ascii()
            );
        }
    }

    #[test]
    fn v1_malformed() {
        let cases: &[(&[u8], ProxyError)] = &[
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\n",
                ProxyError::V1BadLineEnding,
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\rX",
                ProxyError::V1BadLineEnding,
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\r\r",
                ProxyError::V1BadLineEnding,
            ),
            (b"PROXY UNKNOWN\n", ProxyError::V1BadLineEnding),
            (b"PROXY UNKNOWN a\nb\r\n", ProxyError::V1BadLineEnding),
            (b"PROXY UNKNOWN\rX", ProxyError::V1BadLineEnding),
            (b"PROXY TCP4\n", ProxyError::V1BadLineEnding),
            (b"PROXY TCP4 1.2.3.4\n", ProxyError::V1BadLineEnding),
            (b"PROXY TCP4\r\n", ProxyError::V1MissingField),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n",
                ProxyError::V1MissingField,
            ),
            (b"PROXY TCP4 1.2.3.4\r\n", ProxyError::V1MissingField),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443 x\r\n",
                ProxyError::V1ExtraField,
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443 \r\n",
                ProxyError::V1ExtraField,
            ),
            (b"PROXY TCP4  1.2.3.4", ProxyError::V1BadAddress),
            (
                b"PROXY TCP4 1.2.3 5.6.7.8 80 443\r\n",
                ProxyError::V1BadAddress,
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8  443\r\n",
                ProxyError::V1BadPort,
            ),
            (
                b"PROXY TCP4 1.2.3.4 ::1 80 443\r\n",
                ProxyError::V1BadAddress,
            ),
            (
                b"PROXY TCP6 ::1 1.2.3.4 80 443\r\n",
                ProxyError::V1BadAddress,
            ),
            (b"PROXY TCP6 :: :: 0 0x\r\n", ProxyError::V1BadPort),
            (b"PROXY TCP4 1.2.3.\xc3\xa9", ProxyError::V1BadAddress),
            (b"PROXY TCP \r\n", ProxyError::V1BadProtocol),
            (b"PROXY UNKNOW\r\n", ProxyError::V1BadProtocol),
        ];
        for &(input, err) in cases {
            assert_eq!(parse(input), Err(err), "{}", input.escape_ascii());
            assert_eq!(byte_by_byte(input), Err(err), "{}", input.escape_ascii());
        }
        // No CR LF within 107 bytes.
        let mut junk = b"PROXY UNKNOWN".to_vec();
        junk.resize(200, b' ');
        assert_eq!(parse(&junk), Err(ProxyError::V1TooLong));
    }

    #[test]
    fn v1_partial_is_incomplete() {
        let h = b"PROXY TCP6 2001:db8::1 ::1 65535 8001\r\n";
        for k in 0..h.len() {
            assert_eq!(parse(&h[..k]), Ok(Parsed::Incomplete), "{k}");
        }
    }

    // ------------------------------------------------------------ v2 ----

    const V4_BLOCK: [u8; 12] = [127, 0, 0, 1, 10, 0, 0, 2, 0x1f, 0x90, 0x01, 0xbb];

    fn v6_block() -> Vec<u8> {
        let mut b = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)
            .octets()
            .to_vec();
        b.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        b.extend_from_slice(&[0xff, 0xff, 0x00, 0x00]);
        b
    }

    fn v2(command: Command, source: Option<&str>, destination: Option<&str>) -> ProxyHeader {
        ProxyHeader {
            version: 2,
            command,
            source: source.map(sa),
            destination: destination.map(sa),
        }
    }

    #[test]
    fn v2_proxy_inet_and_inet6() {
        let h = v2_block(0x21, 0x11, &V4_BLOCK);
        assert_eq!(
            done(&h),
            (
                v2(Command::Proxy, Some("127.0.0.1:8080"), Some("10.0.0.2:443")),
                28
            )
        );
        let h = v2_block(0x21, 0x21, &v6_block());
        assert_eq!(
            done(&h),
            (
                v2(Command::Proxy, Some("[2001:db8::1]:65535"), Some("[::1]:0")),
                52
            )
        );
    }

    #[test]
    fn v2_tlvs_are_skipped() {
        let mut block = V4_BLOCK.to_vec();
        // PP2_TYPE_AUTHORITY "example.com", PP2_TYPE_NOOP, and an unknown
        // type whose length runs past the block: none of them is read.
        block.extend_from_slice(b"\x02\x00\x0bexample.com\x04\x00\x00\xee\xff\xff");
        let h = v2_block(0x21, 0x11, &block);
        let (hdr, len) = done(&h);
        assert_eq!(len, h.len());
        assert_eq!(hdr.source, Some(sa("127.0.0.1:8080")));
    }

    #[test]
    fn v2_local_unspec_unix() {
        // LOCAL: no addresses, whatever the family and block.
        for (fam, block) in [
            (0x00, Vec::new()),
            (0x11, V4_BLOCK.to_vec()),
            (0x11, Vec::new()),
            (0x12, V4_BLOCK.to_vec()),
            (0x21, vec![1, 2, 3]),
            (0x31, vec![0; 216]),
        ] {
            let h = v2_block(0x20, fam, &block);
            assert_eq!(
                done(&h),
                (v2(Command::Local, None, None), h.len()),
                "{fam:#x}"
            );
        }
        // PROXY over UNSPEC or UNIX: no addresses either.
        let h = v2_block(0x21, 0x00, &[]);
        assert_eq!(done(&h), (v2(Command::Proxy, None, None), 16));
        let h = v2_block(0x21, 0x00, &V4_BLOCK);
        assert_eq!(done(&h), (v2(Command::Proxy, None, None), 28));
        let h = v2_block(0x21, 0x31, &[b'/'; 216]);
        assert_eq!(done(&h), (v2(Command::Proxy, None, None), 232));
    }

    #[test]
    fn v2_malformed() {
        let cases: &[(Vec<u8>, ProxyError)] = &[
            (b"\r\n\r\n\0\r\nQUIX".to_vec(), ProxyError::BadSignature),
            (b"\r\n\r\n\n".to_vec(), ProxyError::BadSignature),
            (b"\r\r".to_vec(), ProxyError::BadSignature),
            (
                v2_bytes(0x11, 0x11, 12, &[])[..13].to_vec(),
                ProxyError::V2BadVersion,
            ),
            (
                v2_bytes(0x31, 0x11, 12, &[])[..13].to_vec(),
                ProxyError::V2BadVersion,
            ),
            (
                v2_bytes(0x01, 0x11, 12, &[])[..13].to_vec(),
                ProxyError::V2BadVersion,
            ),
            (
                v2_bytes(0x22, 0x11, 12, &[])[..13].to_vec(),
                ProxyError::V2BadCommand,
            ),
            (
                v2_bytes(0x2f, 0x11, 12, &[])[..13].to_vec(),
                ProxyError::V2BadCommand,
            ),
            (
                v2_bytes(0x21, 0x41, 12, &[])[..14].to_vec(),
                ProxyError::V2BadFamily,
            ),
            (
                v2_bytes(0x21, 0x13, 12, &[])[..14].to_vec(),
                ProxyError::V2BadFamily,
            ),
            (
                v2_bytes(0x21, 0x01, 12, &[])[..14].to_vec(),
                ProxyError::V2BadFamily,
            ),
            (
                v2_bytes(0x21, 0x10, 12, &[])[..14].to_vec(),
                ProxyError::V2BadFamily,
            ),
            (
                v2_bytes(0x20, 0x41, 12, &[])[..14].to_vec(),
                ProxyError::V2BadFamily,
            ),
            (
                v2_bytes(0x21, 0x12, 12, &[])[..14].to_vec(),
                ProxyError::V2Datagram,
            ),
            (
                v2_bytes(0x21, 0x22, 36, &[])[..14].to_vec(),
                ProxyError::V2Datagram,
            ),
            (
                v2_bytes(0x21, 0x32, 216, &[])[..14].to_vec(),
                ProxyError::V2Datagram,
            ),
            (v2_bytes(0x21, 0x11, 11, &[]), ProxyError::V2ShortAddresses),
            (v2_bytes(0x21, 0x21, 35, &[]), ProxyError::V2ShortAddresses),
            (v2_bytes(0x21, 0x21, 12, &[]), ProxyError::V2ShortAddresses),
            (v2_bytes(0x21, 0x31, 215, &[]), ProxyError::V2ShortAddresses),
            (v2_bytes(0x21, 0x11, 2049, &[]), ProxyError::V2TooLong),
            (v2_bytes(0x20, 0x00, 0xffff, &[]), ProxyError::V2TooLong),
        ];
        for (input, err) in cases {
            assert_eq!(parse(input), Err(*err), "{}", input.escape_ascii());
            assert_eq!(
                parse(&input[..input.len() - 1]),
                Ok(Parsed::Incomplete),
                "{} is still possible",
                input.escape_ascii()
            );
            assert_eq!(byte_by_byte(input), Err(*err));
        }
    }

    #[test]
    fn v2_length_past_the_end_is_incomplete_up_to_the_cap() {
        let mut block = V4_BLOCK.to_vec();
        block.resize(V2_MAX_BLOCK, 0xab);
        let h = v2_block(0x21, 0x11, &block);
        assert_eq!(h.len(), MAX_HEADER);
        for k in [0, 1, 12, 13, 14, 15, 16, 27, 28, 1000, MAX_HEADER - 1] {
            assert_eq!(parse(&h[..k]), Ok(Parsed::Incomplete), "{k}");
        }
        assert_eq!(done(&h).1, MAX_HEADER);
    }

    // ------------------------------------------------- rest and reader ----

    #[test]
    fn rest_start_points_at_the_first_protocol_byte() {
        let mut v1in = b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\r\n".to_vec();
        let n1 = v1in.len();
        v1in.extend_from_slice(b"hello\r\nworld\n");
        let mut v2in = v2_block(0x21, 0x11, &V4_BLOCK);
        let n2 = v2in.len();
        v2in.extend_from_slice(b"\r\n\r\n\0abc\n");
        for (input, n) in [(v1in, n1), (v2in, n2)] {
            let mut r = HeaderReader::new();
            let (_, rs) = r.feed(&input).unwrap().expect("whole header");
            assert_eq!(rs, n);
            // Split inside the header: rest_start is relative to the last feed.
            for cut in 1..n {
                let mut r = HeaderReader::new();
                assert_eq!(r.feed(&input[..cut]), Ok(None));
                assert_eq!(r.buffered(), cut);
                let (_, rs) = r.feed(&input[cut..]).unwrap().expect("header");
                assert_eq!(rs, n - cut);
                assert_eq!(r.buffered(), 0);
            }
        }
    }

    #[test]
    fn reader_buffers_at_most_the_header() {
        // A big read after a partial header: only what is needed is copied.
        let mut block = V4_BLOCK.to_vec();
        block.resize(V2_MAX_BLOCK, 0);
        let mut input = v2_block(0x21, 0x11, &block);
        input.extend_from_slice(&[b'z'; 100_000]);
        let mut r = HeaderReader::new();
        assert_eq!(r.feed(&input[..20]), Ok(None));
        let (h, rs) = r.feed(&input[20..]).unwrap().expect("header");
        assert_eq!(h.source, Some(sa("127.0.0.1:8080")));
        assert_eq!(rs, MAX_HEADER - 20);
        assert_eq!(r.buf.capacity(), 0, "idle again");

        let mut r = HeaderReader::new();
        assert_eq!(r.feed(b"PROXY "), Ok(None));
        assert_eq!(r.feed(&[b'x'; 100_000]), Err(ProxyError::V1BadProtocol));
        assert_eq!(r.buf.capacity(), 0);
        assert_eq!(std::mem::size_of::<HeaderReader>(), 24);
    }

    #[test]
    fn display_is_one_short_line() {
        for e in [
            ProxyError::BadSignature,
            ProxyError::V1BadProtocol,
            ProxyError::V1BadAddress,
            ProxyError::V1BadPort,
            ProxyError::V1MissingField,
            ProxyError::V1ExtraField,
            ProxyError::V1BadLineEnding,
            ProxyError::V1TooLong,
            ProxyError::V2BadVersion,
            ProxyError::V2BadCommand,
            ProxyError::V2BadFamily,
            ProxyError::V2Datagram,
            ProxyError::V2ShortAddresses,
            ProxyError::V2TooLong,
        ] {
            let s = e.to_string();
            assert!(!s.is_empty() && s.len() < 80 && !s.contains('\n'), "{s}");
        }
    }

    // ------------------------------------ address completion vs. brute force ----

    /// The shortest suffix over `0 1 : .` (any digit works like `0` or `1`)
    /// of at most 6 bytes that makes `t` parse, by exhaustive search.
    fn brute_completion(family: Family, t: &str) -> Option<usize> {
        let ok = |s: &str| match family {
            Family::V4 => s.parse::<Ipv4Addr>().is_ok(),
            Family::V6 => s.parse::<Ipv6Addr>().is_ok(),
        };
        let alphabet = ['0', '1', ':', '.'];
        let mut level = vec![String::new()];
        for len in 0..=6 {
            if level.iter().any(|s| ok(&format!("{t}{s}"))) {
                return Some(len);
            }
            level = level
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
        }
        None
    }

    fn check_completion(family: Family, t: &str) {
        let want = brute_completion(family, t);
        let got = address_completion(family, t.as_bytes());
        // Beyond 6 bytes the brute force gives up; only the empty prefix of
        // an IPv4 address needs 7.
        if !(family == Family::V4 && t.is_empty()) {
            assert_eq!(got, want, "{family:?} {t:?}");
        }
    }

    #[test]
    fn completion_matches_brute_force_on_prefixes() {
        let v4 = ["0.0.0.0", "255.255.255.255", "10.200.3.45", "1.2.3.4"];
        let v6 = [
            "::",
            "::1",
            "1::",
            "1:2:3:4:5:6:7:8",
            "1:2:3:4:5:6:7::",
            "::2:3:4:5:6:7:8",
            "1:2:3:4:5:6:1.2.3.4",
            "::ffff:255.255.255.255",
            "1::2:3:4:5:1.2.3.4",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
            "2001:db8::8a2e:370:7334",
            "1:2:3:4:5:6:7:8:9",
            "1:2:3:4:5:6::1.2.3.4",
            "1.2.3.4",
            ":1::",
            "1::2::3",
            "::1.2.3.04",
            "0000:00000",
        ];
        for a in v4 {
            for k in 0..=a.len() {
                check_completion(Family::V4, &a[..k]);
            }
        }
        assert_eq!(address_completion(Family::V4, b""), Some(7));
        for a in v6 {
            for k in 0..=a.len() {
                check_completion(Family::V6, &a[..k]);
            }
        }
    }

    // --------------------------------------------------------- proptest ----

    /// A valid header: its bytes (built by an independent encoder where one
    /// exists) and what must be read from it.
    #[derive(Debug, Clone)]
    enum Gen {
        Tcp4(SocketAddrV4, SocketAddrV4),
        Tcp6(SocketAddrV6, SocketAddrV6, bool),
        Unknown(Vec<u8>),
        V2Proxy(SocketAddr, SocketAddr, Vec<(u8, Vec<u8>)>),
        V2Local(u8, Vec<u8>),
    }

    fn long_v6(a: &Ipv6Addr) -> String {
        let s = a.segments().map(|g| format!("{g:x}"));
        s.join(":")
    }

    impl Gen {
        fn encode(&self) -> (Vec<u8>, ProxyHeader) {
            let pv1 = |s: SocketAddr, d: SocketAddr| v1(&s.to_string(), &d.to_string());
            match self {
                Gen::Tcp4(s, d) => (
                    format!(
                        "PROXY TCP4 {} {} {} {}\r\n",
                        s.ip(),
                        d.ip(),
                        s.port(),
                        d.port()
                    )
                    .into_bytes(),
                    pv1((*s).into(), (*d).into()),
                ),
                Gen::Tcp6(s, d, long) => {
                    let f = |a: &Ipv6Addr| if *long { long_v6(a) } else { a.to_string() };
                    (
                        format!(
                            "PROXY TCP6 {} {} {} {}\r\n",
                            f(s.ip()),
                            f(d.ip()),
                            s.port(),
                            d.port()
                        )
                        .into_bytes(),
                        pv1((*s).into(), (*d).into()),
                    )
                }
                Gen::Unknown(tail) => {
                    let mut b = b"PROXY UNKNOWN".to_vec();
                    if !tail.is_empty() {
                        b.push(b' ');
                        b.extend_from_slice(tail);
                    }
                    b.extend_from_slice(b"\r\n");
                    (b, NONE_V1)
                }
                Gen::V2Proxy(s, d, tlvs) => {
                    let mut builder =
                        ppp::v2::Builder::with_addresses(0x21, ppp::v2::Protocol::Stream, (*s, *d));
                    for (t, v) in tlvs {
                        builder = builder.write_tlv(*t, v).expect("tlv");
                    }
                    let bytes = builder.build().expect("v2 header");
                    let h = ProxyHeader {
                        version: 2,
                        command: Command::Proxy,
                        source: Some(*s),
                        destination: Some(*d),
                    };
                    (bytes, h)
                }
                Gen::V2Local(fam, block) => (
                    v2_block(0x20, *fam, block),
                    ProxyHeader {
                        version: 2,
                        command: Command::Local,
                        source: None,
                        destination: None,
                    },
                ),
            }
        }
    }

    fn v4() -> impl Strategy<Value = SocketAddrV4> {
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| SocketAddrV4::new(a.into(), p))
    }

    fn v6() -> impl Strategy<Value = SocketAddrV6> {
        // Sparse segments so that `::` compression and embedded-IPv4 display
        // forms (`::ffff:a.b.c.d`) both occur.
        let seg = prop_oneof![Just(0u16), Just(0xffff), any::<u16>()];
        (prop::array::uniform8(seg), any::<u16>())
            .prop_map(|(s, p)| SocketAddrV6::new(Ipv6Addr::from(s), p, 0, 0))
    }

    fn tlvs() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
        prop::collection::vec(
            (any::<u8>(), prop::collection::vec(any::<u8>(), 0..300)),
            0..5,
        )
    }

    fn gen_header() -> impl Strategy<Value = Gen> {
        let not_crlf = any::<u8>().prop_filter("no CR/LF", |&b| b != b'\r' && b != b'\n');
        prop_oneof![
            (v4(), v4()).prop_map(|(s, d)| Gen::Tcp4(s, d)),
            (v6(), v6(), any::<bool>()).prop_map(|(s, d, l)| Gen::Tcp6(s, d, l)),
            prop::collection::vec(not_crlf, 0..=91).prop_map(Gen::Unknown),
            (v4(), v4(), tlvs()).prop_map(|(s, d, t)| Gen::V2Proxy(s.into(), d.into(), t)),
            (v6(), v6(), tlvs()).prop_map(|(s, d, t)| Gen::V2Proxy(s.into(), d.into(), t)),
            (
                prop::sample::select(vec![0x00u8, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32]),
                prop::collection::vec(any::<u8>(), 0..240)
            )
                .prop_map(|(f, b)| Gen::V2Local(f, b)),
        ]
    }

    /// Inputs that get past the first bytes: random, or a v1/v2 start
    /// followed by bytes from the header alphabets.
    fn garbage() -> impl Strategy<Value = Vec<u8>> {
        let text = prop::collection::vec(
            prop::sample::select(b"0123456789abcdefTCPUNKOW46:. \r\n".to_vec()),
            0..120,
        );
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            text.clone().prop_map(|t| [b"PROXY ".to_vec(), t].concat()),
            text.prop_map(|t| [b"PROXY TCP6 ".to_vec(), t].concat()),
            (any::<[u8; 4]>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(f, t)| [
                V2_SIGNATURE.to_vec(),
                f.to_vec(),
                t
            ]
            .concat()),
        ]
    }

    /// What `ppp` reads from a complete header: (command is LOCAL, addresses).
    fn ppp_reading(bytes: &[u8]) -> Option<(bool, Option<SocketAddr>, Option<SocketAddr>)> {
        use ppp::HeaderResult;
        let v4 = |a: ppp::v2::IPv4| {
            (
                Some(SocketAddr::new(a.source_address.into(), a.source_port)),
                Some(SocketAddr::new(
                    a.destination_address.into(),
                    a.destination_port,
                )),
            )
        };
        let v6 = |a: ppp::v2::IPv6| {
            (
                Some(SocketAddr::new(a.source_address.into(), a.source_port)),
                Some(SocketAddr::new(
                    a.destination_address.into(),
                    a.destination_port,
                )),
            )
        };
        match HeaderResult::parse(bytes) {
            HeaderResult::V1(Ok(h)) => Some(match h.addresses {
                ppp::v1::Addresses::Unknown => (false, None, None),
                ppp::v1::Addresses::Tcp4(a) => {
                    let (s, d) = v4(a);
                    (false, s, d)
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    let (s, d) = v6(a);
                    (false, s, d)
                }
            }),
            HeaderResult::V2(Ok(h)) => {
                let local = h.command == ppp::v2::Command::Local;
                let (s, d) = match h.addresses {
                    _ if local => (None, None),
                    ppp::v2::Addresses::IPv4(a) => v4(a),
                    ppp::v2::Addresses::IPv6(a) => v6(a),
                    _ => (None, None),
                };
                Some((local, s, d))
            }
            _ => None,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Any split of a valid header followed by anything gives the same
        /// header and the same remaining bytes; every proper prefix of the
        /// header is Incomplete (no early error on a valid header).
        #[test]
        fn every_split_gives_the_same_header(
            g in gen_header(),
            tail in prop::collection::vec(any::<u8>(), 0..64),
            sizes in prop::collection::vec(0usize..40, 0..12),
        ) {
            let (hdr, want) = g.encode();
            let input = [hdr.clone(), tail.clone()].concat();
            prop_assert_eq!(
                parse(&input),
                Ok(Parsed::Done { header: want, len: hdr.len() })
            );
            for k in 0..hdr.len() {
                prop_assert_eq!(parse(&hdr[..k]), Ok(Parsed::Incomplete), "prefix {}", k);
            }
            let expected = Ok(Some((want, tail)));
            prop_assert_eq!(&feed_split(&input, &sizes), &expected);
            prop_assert_eq!(&byte_by_byte(&input), &expected);
            // The independent parser reads the same addresses.
            if let Some((local, s, d)) = ppp_reading(&hdr) {
                prop_assert_eq!(local, want.command == Command::Local);
                prop_assert_eq!((s, d), (want.source, want.destination));
            }
        }

        /// Random and mutated inputs never panic, and any split gives what
        /// the whole input gives (errors included).
        #[test]
        fn garbage_splits_agree_with_whole(
            input in garbage(),
            sizes in prop::collection::vec(0usize..40, 0..12),
        ) {
            let w = whole(&input);
            prop_assert_eq!(&feed_split(&input, &sizes), &w);
            prop_assert_eq!(&byte_by_byte(&input), &w);
        }

        #[test]
        fn mutated_headers_splits_agree_with_whole(
            g in gen_header(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<prop::sample::Index>(),
            sizes in prop::collection::vec(0usize..40, 0..12),
        ) {
            let (mut hdr, _) = g.encode();
            let i = at.index(hdr.len());
            hdr[i] = byte;
            let hdr = &hdr[..cut.index(hdr.len() + 1)];
            let w = whole(hdr);
            prop_assert_eq!(&feed_split(hdr, &sizes), &w);
            prop_assert_eq!(&byte_by_byte(hdr), &w);
        }

        #[test]
        fn v6_completion_matches_brute_force(
            t in prop::collection::vec(prop::sample::select(b"01af:.".to_vec()), 0..14)
        ) {
            let t = String::from_utf8(t).expect("ascii");
            check_completion(Family::V6, &t);
        }
    }
}
