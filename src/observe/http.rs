//! The `--metrics` address: a small blocking HTTP/1.1 endpoint that answers
//! `GET /metrics` with the exposition, on threads of its own, never on the
//! event loops (a scrape only reads the workers' counters). One accept
//! thread; one short-lived thread per scrape, at most [`MAX_SCRAPERS`]; each
//! has [`SCRAPE_TIMEOUT`] to send its head. What it answers:
//! `docs/operations.md`, "The endpoint"; why it is built so:
//! `docs/metrics.md`, "The endpoint".

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::observe::metrics::{AcceptError, CONTENT_TYPE, Metrics};
use crate::utils::logger::Level;
use crate::utils::ratelimit::RateLimited;
use crate::xps_log;

/// The largest request head (request line and headers) accepted, in bytes.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Concurrent scrape connections; more are answered 503 and closed.
pub const MAX_SCRAPERS: usize = 4;
/// Time a scraper has to send its request head, and per write of the answer.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one warning about failing accepts per this interval.
const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// A request's method, as far as routing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// Any other well-formed method (answered 405).
    Other,
}

/// A complete, well-formed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// The request target's path, query string removed (`/metrics`).
    pub path: String,
}

/// Why a request head is malformed (answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRequest {
    /// The head is over [`MAX_REQUEST_HEAD`] bytes.
    TooLarge,
    /// The request line is not `METHOD SP /target SP HTTP/x.y`.
    RequestLine,
    /// The version is not HTTP/1.0 or HTTP/1.1.
    Version,
    /// A header line is not `name: value` (or is an obsolete folded line).
    Header,
}

/// Parses a request head from the bytes received so far: `Ok(None)` if it
/// is not complete yet, `Ok(Some)` once the empty line ending it has arrived
/// (anything after it, such as a body, is ignored), `Err` as soon as a
/// complete line is malformed or the head outgrows [`MAX_REQUEST_HEAD`].
/// Lines may end in CRLF or a bare LF (RFC 9112 §2.2); empty lines before
/// the request line are skipped.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, BadRequest> {
    let mut request: Option<Request> = None;
    let mut pos = 0;
    while let Some(nl) = memchr::memchr(b'\n', &buf[pos..]) {
        let end = pos + nl;
        if end >= MAX_REQUEST_HEAD {
            return Err(BadRequest::TooLarge);
        }
        let line = &buf[pos..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        pos = end + 1;
        match &request {
            None if line.is_empty() => {}
            None => request = Some(parse_request_line(line)?),
            Some(_) if line.is_empty() => return Ok(request),
            Some(_) => check_header_line(line)?,
        }
    }
    if buf.len() > MAX_REQUEST_HEAD {
        return Err(BadRequest::TooLarge);
    }
    Ok(None)
}

/// RFC 9110 `tchar`: what a method or a header name is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn parse_request_line(line: &[u8]) -> Result<Request, BadRequest> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BadRequest::RequestLine);
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(BadRequest::RequestLine);
    }
    // Only origin-form targets (`/path`): `*` and absolute URLs are 400.
    if target.first() != Some(&b'/') || !target.iter().all(|&b| (0x21..0x7f).contains(&b)) {
        return Err(BadRequest::RequestLine);
    }
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return Err(BadRequest::Version);
    }
    let path = match memchr::memchr(b'?', target) {
        Some(q) => &target[..q],
        None => target,
    };
    Ok(Request {
        method: if method == b"GET" {
            Method::Get
        } else {
            Method::Other
        },
        // Every byte is printable ASCII (checked above).
        path: String::from_utf8_lossy(path).into_owned(),
    })
}

fn check_header_line(line: &[u8]) -> Result<(), BadRequest> {
    let colon = memchr::memchr(b':', line).ok_or(BadRequest::Header)?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(BadRequest::Header);
    }
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(BadRequest::Header);
    }
    Ok(())
}

/// What a parsed request is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    MethodNotAllowed,
}

fn route(req: &Request) -> Route {
    match (req.method, req.path.as_str()) {
        (Method::Get, "/metrics") => Route::Metrics,
        (Method::Get, _) => Route::NotFound,
        (Method::Other, _) => Route::MethodNotAllowed,
    }
}

/// A complete HTTP/1.1 response that closes the connection.
fn response(status: &str, extra: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn plain(status: &str, extra: &str, body: &str) -> Vec<u8> {
    response(status, extra, "text/plain; charset=utf-8", body.as_bytes())
}

/// The answer to a parsed (or malformed) request.
fn answer(req: Result<&Request, BadRequest>, metrics: &Metrics) -> Vec<u8> {
    match req.map(route) {
        Ok(Route::Metrics) => response("200 OK", "", CONTENT_TYPE, metrics.render().as_bytes()),
        Ok(Route::NotFound) => plain("404 Not Found", "", "not found; try /metrics\n"),
        Ok(Route::MethodNotAllowed) => plain(
            "405 Method Not Allowed",
            "Allow: GET\r\n",
            "method not allowed\n",
        ),
        Err(_) => plain("400 Bad Request", "", "bad request\n"),
    }
}

/// Limits of one endpoint (the constants, or shorter ones in tests).
#[derive(Debug, Clone, Copy)]
struct ServeLimits {
    timeout: Duration,
    max_conns: usize,
}

impl ServeLimits {
    /// What [`serve`] runs with.
    const STANDARD: ServeLimits = ServeLimits {
        timeout: SCRAPE_TIMEOUT,
        max_conns: MAX_SCRAPERS,
    };
}

/// Serves `GET /metrics` on `listener` from a thread of its own (see the
/// module docs), until the process exits. The listener is switched to
/// blocking mode. Errors only if the thread cannot be started.
pub fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> io::Result<JoinHandle<()>> {
    serve_with(listener, metrics, ServeLimits::STANDARD)
}

fn serve_with(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    limits: ServeLimits,
) -> io::Result<JoinHandle<()>> {
    listener.set_nonblocking(false)?;
    thread::Builder::new()
        .name("xps-metrics".to_string())
        .spawn(move || accept_loop(&listener, &metrics, limits))
}

/// Gives a scrape slot back when its thread ends (or never starts).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept_loop(listener: &TcpListener, metrics: &Arc<Metrics>, limits: ServeLimits) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut warning = RateLimited::new(ACCEPT_WARN_INTERVAL);
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if let Some(since) = warning.hit(Instant::now()) {
                    xps_log!(
                        Level::Warning,
                        "xps_metrics_serve()",
                        "accept() on the metrics endpoint failed: {} ({since} time(s) since the last warning)",
                        crate::os_reason(&e)
                    );
                }
                // Out of descriptors or memory: do not spin.
                if AcceptError::from_io(&e) != AcceptError::Other {
                    thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
        };
        // Only this thread raises `active`, so check-then-raise is exact.
        if active.load(Ordering::Acquire) >= limits.max_conns {
            turn_away(stream);
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(Arc::clone(&active));
        let metrics = Arc::clone(metrics);
        let spawned = thread::Builder::new()
            .name("xps-scrape".to_string())
            .spawn(move || {
                let _slot = slot;
                scrape(stream, &metrics, limits);
            });
        if let Err(e) = spawned {
            // The closure, with its stream and slot, is dropped: closed, freed.
            xps_log!(
                Level::Warning,
                "xps_metrics_serve()",
                "cannot start a scrape thread: {}",
                crate::os_reason(&e)
            );
        }
    }
}

/// Answers a connection past [`MAX_SCRAPERS`] without ever blocking.
/// Whatever request already arrived is read away first, and the write side
/// shut before the close, so the close is less likely to become an RST that
/// destroys the answer; a request arriving later may still cause one, which
/// is acceptable for a connection that is being refused.
fn turn_away(mut stream: TcpStream) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    for _ in 0..4 {
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let msg = plain("503 Service Unavailable", "", "too many scrapes\n");
    let _ = stream.write(&msg);
    let _ = stream.shutdown(Shutdown::Write);
}

/// Answers a scraper whose head did not arrive within its time.
fn time_out(stream: &mut TcpStream) {
    let _ = stream.write_all(&plain("408 Request Timeout", "", "request timeout\n"));
}

/// Serves one scrape connection: one request, one answer, close.
fn scrape(mut stream: TcpStream, metrics: &Metrics, limits: ServeLimits) {
    let deadline = Instant::now() + limits.timeout;
    if stream.set_write_timeout(Some(limits.timeout)).is_err() {
        return;
    }
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let parsed = loop {
        match parse_request(&buf) {
            Ok(None) => {}
            Ok(Some(req)) => break Ok(req),
            Err(e) => break Err(e),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            time_out(&mut stream);
            return;
        }
        // parse_request answers `Err` past MAX_REQUEST_HEAD, so `room` > 0.
        let room = (MAX_REQUEST_HEAD + 1 - buf.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]) {
            Ok(0) => return, // gave up before finishing its request
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                time_out(&mut stream);
                return;
            }
            Err(_) => return,
        }
    };
    if stream
        .write_all(&answer(parsed.as_ref().map_err(|e| *e), metrics))
        .is_err()
    {
        return;
    }
    // Close gracefully: FIN first, then read away what the client may still
    // send (a body, the rest of a garbage request), so the close does not
    // turn into an RST that could destroy the answer in flight.
    let _ = stream.shutdown(Shutdown::Write);
    let linger = deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_millis(1), Duration::from_secs(1));
    if stream.set_read_timeout(Some(linger)).is_ok() {
        let mut drained = 0usize;
        while drained < 64 * 1024 {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Request {
        Request {
            method: Method::Get,
            path: path.to_string(),
        }
    }

    #[test]
    fn parses_a_good_request() {
        let req = b"GET /metrics HTTP/1.1\r\nHost: localhost:9100\r\nUser-Agent: Prometheus/2.42.0\r\nAccept: text/plain;version=0.0.4;q=1,*/*;q=0.1\r\n\r\n";
        assert_eq!(parse_request(req), Ok(Some(get("/metrics"))));
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.0\n\n"),
            Ok(Some(get("/metrics")))
        );
        assert_eq!(
            parse_request(b"\r\nGET /nope HTTP/1.1\r\n\r\nbody"),
            Ok(Some(get("/nope")))
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Ok(Some(Request {
                method: Method::Other,
                path: "/metrics".to_string()
            }))
        );
    }

    #[test]
    fn split_request_needs_more_until_the_empty_line() {
        let req = b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n";
        for cut in 0..req.len() {
            assert_eq!(parse_request(&req[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(parse_request(req), Ok(Some(get("/metrics"))));
    }

    #[test]
    fn malformed_requests() {
        use BadRequest::*;
        for (req, why) in [
            (&b"garbage\r\n\r\n"[..], RequestLine),
            (b"garbage\n", RequestLine),
            (b"GET /metrics\r\n\r\n", RequestLine),
            (b"GET  /metrics HTTP/1.1\r\n\r\n", RequestLine),
            (b"GET /metrics HTTP/1.1 x\r\n\r\n", RequestLine),
            (b"GET metrics HTTP/1.1\r\n\r\n", RequestLine),
            (b"GET http://h/metrics HTTP/1.1\r\n\r\n", RequestLine),
            (b"G(T /metrics HTTP/1.1\r\n\r\n", RequestLine),
            (b"GET /me\x01trics HTTP/1.1\r\n\r\n", RequestLine),
            (b"GET /metrics\rHTTP/1.1\r\n\r\n", RequestLine),
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n",
                RequestLine,
            ),
            (b"GET /metrics HTTP/2.0\r\n\r\n", Version),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", RequestLine),
            (b"GET /metrics http/1.1\r\n\r\n", Version),
            (b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n", Header),
            (b"GET /metrics HTTP/1.1\r\nHost : a\r\n\r\n", Header),
            (b"GET /metrics HTTP/1.1\r\n: a\r\n\r\n", Header),
            (
                b"GET /metrics HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
                Header,
            ),
            (b"GET /metrics HTTP/1.1\r\nX: a\x00b\r\n\r\n", Header),
        ] {
            assert_eq!(
                parse_request(req),
                Err(why),
                "{:?}",
                String::from_utf8_lossy(req)
            );
        }
        // A malformed request line is refused before the head is complete.
        assert_eq!(parse_request(b"hello\r\n"), Err(RequestLine));
    }

    #[test]
    fn head_over_8_kib_is_refused() {
        let mut req = b"GET /metrics HTTP/1.1\r\n".to_vec();
        while req.len() <= MAX_REQUEST_HEAD {
            req.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(parse_request(&req), Err(BadRequest::TooLarge));
        // No newline at all, just too long.
        assert_eq!(
            parse_request(&vec![b'a'; MAX_REQUEST_HEAD + 1]),
            Err(BadRequest::TooLarge)
        );
        assert_eq!(parse_request(&vec![b'a'; MAX_REQUEST_HEAD]), Ok(None));
        // Exactly at the limit is still fine.
        let mut ok = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        ok.resize(MAX_REQUEST_HEAD - 4, b'a');
        ok.extend_from_slice(b"\r\n\r\n");
        assert_eq!(ok.len(), MAX_REQUEST_HEAD);
        assert_eq!(parse_request(&ok), Ok(Some(get("/metrics"))));
    }

    #[test]
    fn routes() {
        assert_eq!(route(&get("/metrics")), Route::Metrics);
        assert_eq!(route(&get("/")), Route::NotFound);
        assert_eq!(route(&get("/metrics/")), Route::NotFound);
        let post = Request {
            method: Method::Other,
            path: "/metrics".into(),
        };
        assert_eq!(route(&post), Route::MethodNotAllowed);
        let m = Metrics::new(1);
        let r = answer(Ok(&post), &m);
        assert!(r.starts_with(b"HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(String::from_utf8_lossy(&r).contains("\r\nAllow: GET\r\n"));
        let r = answer(Err(BadRequest::Header), &m);
        assert_eq!(
            r,
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 12\r\nConnection: close\r\n\r\nbad request\n"
        );
    }

    // --- over loopback ---

    /// Sends `req`, returns (status line, headers, body) of the answer.
    fn exchange(addr: std::net::SocketAddr, req: &[u8]) -> (String, String, Vec<u8>) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        let split = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("no end of head");
        let head = String::from_utf8(all[..split].to_vec()).unwrap();
        let (status, headers) = head.split_once("\r\n").unwrap_or((&head, ""));
        (
            status.to_string(),
            headers.to_string(),
            all[split + 4..].to_vec(),
        )
    }

    fn start(limits: ServeLimits) -> (std::net::SocketAddr, Arc<Metrics>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Metrics::new(1);
        serve_with(listener, Arc::clone(&m), limits).unwrap();
        (addr, m)
    }

    #[test]
    fn loopback_get_metrics_nope_and_garbage() {
        let (addr, m) = start(ServeLimits::STANDARD);
        let w = m.take_worker(0).unwrap();
        w.lines(42);

        let (status, headers, body) = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(headers.contains(&format!("Content-Type: {CONTENT_TYPE}")));
        assert!(headers.contains(&format!("Content-Length: {}", body.len())));
        assert!(headers.contains("Connection: close"));
        let body = String::from_utf8(body).unwrap();
        assert!(body.contains("\nxps_lines_total 42\n"), "{body}");
        assert!(body.contains("\nprocess_open_fds "), "{body}");

        let (status, _, _) = exchange(addr, b"GET /nope HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        let (status, _, _) = exchange(addr, b"garbage\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
        let (status, _, _) = exchange(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.resize(20_000, b'a');
        let (status, _, _) = exchange(addr, &big);
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
    }

    #[test]
    fn loopback_slow_scrapers_time_out_and_excess_is_turned_away() {
        let (addr, _m) = start(ServeLimits {
            timeout: Duration::from_millis(500),
            max_conns: 2,
        });
        let t0 = Instant::now();
        // Two silent connections hold both slots …
        let mut idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        thread::sleep(Duration::from_millis(100));
        // … so a third is closed at once, with a 503 unless an RST (its
        // request arrived after the server's last read) overtook it.
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        while let Ok(n @ 1..) = s.read(&mut chunk) {
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 503 Service Unavailable\r\n"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
        assert!(t0.elapsed() < Duration::from_millis(450));
        // The silent ones get 408 when their time is up, …
        for s in &mut idle {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            assert!(got.starts_with(b"HTTP/1.1 408 Request Timeout\r\n"));
        }
        drop(idle);
        // … and their slots are free again.
        thread::sleep(Duration::from_millis(50));
        let (status, _, _) = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
    }
}
