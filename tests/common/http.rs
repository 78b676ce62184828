//! HTTP/1.1 over a plain socket, for the tests of the `--metrics` address:
//! exact bytes in, the answer parsed just enough to assert on it.

use std::io::{Read, Write};
use std::net::TcpStream;

use super::{connect, read_once};

/// One answer: its status code, its head as sent, its body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Answer {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}\n{}", self.head, self.text()))
    }
}

/// Reads one answer from `s` (framed by Content-Length; no body after a
/// HEAD or a 204), leaving the connection open.
pub fn read_answer(s: &mut TcpStream, head_only: bool) -> Answer {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match read_once(s, &mut byte) {
            Ok(1) => buf.push(byte[0]),
            other => panic!(
                "no complete head ({other:?}) after {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    let head = String::from_utf8(buf[..buf.len() - 4].to_vec()).unwrap();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    let mut a = Answer {
        status,
        head,
        body: Vec::new(),
    };
    let len: usize = a.header("content-length").map_or(0, |v| v.parse().unwrap());
    if !head_only && status != 204 {
        a.body = vec![0; len];
        s.read_exact(&mut a.body).unwrap();
    }
    a
}

/// `METHOD target` on a new connection that asks to be closed after it.
pub fn request(port: u16, method: &str, target: &str) -> Answer {
    let mut s = connect(port);
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    read_answer(&mut s, method == "HEAD")
}

/// `GET target`.
pub fn get(port: u16, target: &str) -> Answer {
    request(port, "GET", target)
}

/// Sends raw bytes and reads until the server closes (at most 10 s).
pub fn raw(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = connect(port);
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}
