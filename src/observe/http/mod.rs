//! The `--metrics` address: a real HTTP/1.1 server (SPEC §8) that answers
//! `GET /metrics`, `/api`, `/api/connections` and the status page `/`.
//!
//! hyper on a current-thread tokio runtime, confined to one thread
//! (`xps-http`): nothing async anywhere else, and the workers never wait for
//! it (a request reads their counters, or asks them for a snapshot through
//! their control channel, which they answer when they next wake). What it
//! does against hostile clients:
//!
//! * the first bytes are looked at once ([`could_be_http`]): bytes that can
//!   start no request (a TLS ClientHello, `hello`) get 400 at once;
//! * a request head must arrive within [`Limits::header_timeout`], and an
//!   idle kept-alive connection closes after as long;
//! * at [`Limits::max_conns`] connections the least recently active one is
//!   closed to let the newcomer in, so idle and slow clients can never shut
//!   out a scraper;
//! * a client that stops reading its answer is closed after
//!   [`Limits::write_timeout`].
//!
//! Routes: [`routes`]; why hyper: `docs/status-page.md`.

pub mod routes;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::TcpListener;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::AbortHandle;

use crate::core::snapshot::Snapshot;
use crate::observe::metrics::{AcceptError, CONTENT_TYPE};
use crate::utils::logger::Level;
use crate::utils::ratelimit::RateLimited;
use crate::xps_log;
use routes::Route;

/// At most one warning about failing accepts per this interval.
const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// Every worker's snapshot, by worker index.
pub type Snapshots = Arc<Vec<Snapshot>>;

/// Where the workers' snapshots arrive, each as (worker, snapshot).
pub type Answers = tokio::sync::mpsc::UnboundedReceiver<(usize, Snapshot)>;

/// Why the connections could not be gathered (503).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotGathered(pub String);

/// What the endpoint shows; implemented by `observe` (it holds the
/// registry, the CPU sampler and the workers' control channels). This
/// module knows nothing else of the server.
pub trait Status: Send + Sync + 'static {
    /// `GET /metrics`: the Prometheus exposition.
    fn metrics(&self) -> String;
    /// `GET /api`: the dashboard's object, as JSON.
    fn api(&self) -> String;
    /// `GET /api/history`: the last minutes of totals, as JSON.
    fn history(&self) -> String;
    /// Asks every worker for a snapshot; each answer arrives on the
    /// returned channel as (worker, snapshot). Also returns how many to
    /// expect.
    fn ask_workers(&self) -> Result<(usize, Answers), NotGathered>;
    /// `GET /api/connections` from the workers' snapshots.
    fn connections(&self, snapshots: &[Snapshot], limit: usize) -> String;
    /// Once a second on the endpoint's thread (the history's sample).
    fn tick(&self) {}
}

/// The endpoint's limits (the defaults, or shorter ones in tests).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time to send a request head, and the longest a kept-alive
    /// connection may idle.
    pub header_timeout: Duration,
    /// Open connections; at the cap the least recently active one goes.
    pub max_conns: usize,
    /// How long a write may wait for a client that does not read.
    pub write_timeout: Duration,
    /// How long the workers have to answer a snapshot request.
    pub snapshot_timeout: Duration,
    /// How long a snapshot is served to every asker before a new one.
    pub snapshot_cache: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(10),
            max_conns: 512,
            write_timeout: Duration::from_secs(10),
            snapshot_timeout: Duration::from_secs(2),
            snapshot_cache: Duration::from_millis(500),
        }
    }
}

/// Serves the endpoint on `listener` from a thread of its own until the
/// process exits. Errors only if the runtime or the thread cannot start.
pub fn serve(
    listener: TcpListener,
    status: Arc<dyn Status>,
    limits: Limits,
) -> io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    thread::Builder::new()
        .name("xps-http".to_string())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => Server::new(status, limits).run(listener).await,
                    Err(e) => xps_log!(
                        Level::Error,
                        "xps_metrics_serve()",
                        "cannot watch the metrics address: {}",
                        crate::os_reason(&e)
                    ),
                }
            })
        })
}

/// One open connection, as the cap sees it.
struct Open {
    /// When its last request arrived (or it was accepted).
    last_active: Instant,
    /// Ends its task (and closes it).
    abort: Option<AbortHandle>,
}

/// The open connections, by a number of the endpoint's own.
#[derive(Default)]
struct Table {
    next: u64,
    open: HashMap<u64, Open>,
}

/// Takes a connection out of the table when its task ends or is aborted
/// (an aborted task drops its future, and this with it).
struct Leave(Arc<Mutex<Table>>, u64);

impl Drop for Leave {
    fn drop(&mut self) {
        lock(&self.0).open.remove(&self.1);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The last snapshot of the connections and when it was taken.
type Cached = Option<(Instant, Snapshots)>;

/// The endpoint's shared state.
struct Server {
    status: Arc<dyn Status>,
    limits: Limits,
    table: Arc<Mutex<Table>>,
    /// Held while a snapshot is gathered, so concurrent askers share it.
    cache: Arc<tokio::sync::Mutex<Cached>>,
}

impl Server {
    fn new(status: Arc<dyn Status>, limits: Limits) -> Server {
        Server {
            status,
            limits,
            table: Arc::default(),
            cache: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    async fn run(self, listener: tokio::net::TcpListener) {
        let status = self.status.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                status.tick();
            }
        });
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .keep_alive(true)
            .max_buf_size(16 * 1024)
            .max_headers(64);
        let shared = Arc::new(self);
        let mut warning = RateLimited::new(ACCEPT_WARN_INTERVAL);
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if let Some(since) = warning.hit(Instant::now()) {
                        xps_log!(
                            Level::Warning,
                            "xps_metrics_serve()",
                            "accept() on the metrics address failed: {} ({since} time(s) since the last warning)",
                            crate::os_reason(&e)
                        );
                    }
                    // Out of descriptors or memory: do not spin.
                    if AcceptError::from_io(&e) != AcceptError::Other {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let id = shared.admit();
            let leave = Leave(shared.table.clone(), id);
            let task = tokio::spawn(shared.clone().connection(stream, http.clone(), leave));
            if let Some(c) = lock(&shared.table).open.get_mut(&id) {
                c.abort = Some(task.abort_handle());
            }
        }
    }

    /// Enters a new connection in the table; at the cap, the least recently
    /// active one is closed first, so a newcomer always gets in.
    fn admit(&self) -> u64 {
        let mut t = lock(&self.table);
        while t.open.len() >= self.limits.max_conns.max(1) {
            let Some(victim) = t
                .open
                .iter()
                .min_by_key(|(_, c)| c.last_active)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some(Open {
                abort: Some(abort), ..
            }) = t.open.remove(&victim)
            {
                abort.abort();
            }
        }
        t.next += 1;
        let id = t.next;
        t.open.insert(
            id,
            Open {
                last_active: Instant::now(),
                abort: None,
            },
        );
        id
    }

    /// One connection: its first bytes looked at, then served by hyper.
    async fn connection(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        mut http: http1::Builder,
        leave: Leave,
    ) {
        let id = leave.1; // `leave` is dropped when this task ends or is aborted
        let started = Instant::now();
        match tokio::time::timeout(self.limits.header_timeout, could_be_http(&stream)).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return bad_request(stream).await,
            _ => return, // silent until the deadline, or an error: close
        }
        // One deadline for the whole head, first bytes included.
        let left = self
            .limits
            .header_timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1));
        http.header_read_timeout(left);
        let io = WriteTimeout::new(TokioIo::new(stream), self.limits.write_timeout);
        let this = self.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            async move {
                if let Some(c) = lock(&this.table).open.get_mut(&id) {
                    c.last_active = Instant::now();
                }
                Ok::<_, Infallible>(this.answer(&req).await)
            }
        });
        let _ = http.serve_connection(io, service).await;
        drop(leave);
    }

    /// The answer to one request.
    async fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path(); // origin and absolute form alike
        let route = routes::route(req.method(), path, req.uri().query());
        let mut r = match routes::fixed(route) {
            Some(r) => r,
            None => match route {
                Route::Metrics => routes::respond(
                    StatusCode::OK,
                    CONTENT_TYPE,
                    Bytes::from(self.status.metrics()),
                ),
                Route::Api => routes::json(self.status.api()),
                Route::History => routes::json(self.status.history()),
                Route::Connections { limit } => match self.snapshots().await {
                    Ok(s) => routes::json(self.status.connections(&s, limit)),
                    Err(NotGathered(why)) => {
                        let mut r = routes::respond(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "text/plain; charset=utf-8",
                            Bytes::from(format!("{why}\n")),
                        );
                        r.headers_mut()
                            .insert(hyper::header::RETRY_AFTER, "1".parse().expect("a number"));
                        r
                    }
                },
                _ => routes::text(StatusCode::NOT_FOUND, "not found\n"),
            },
        };
        if routes::is_api(path) {
            routes::allow_any_origin(&mut r);
        }
        r
    }

    /// Every worker's snapshot: the cached one if it is recent, else a new
    /// one (concurrent askers wait for the same).
    async fn snapshots(&self) -> Result<Snapshots, NotGathered> {
        let mut cache = self.cache.lock().await;
        if let Some((at, s)) = &*cache
            && at.elapsed() < self.limits.snapshot_cache
        {
            return Ok(s.clone());
        }
        let (n, mut rx) = self.status.ask_workers()?;
        let mut got: Vec<Option<Snapshot>> = vec![None; n];
        let gather = async {
            let mut left = n;
            while left > 0 {
                match rx.recv().await {
                    Some((i, s)) if i < n && got[i].is_none() => {
                        got[i] = Some(s);
                        left -= 1;
                    }
                    Some(_) => {}
                    None => break, // a worker dropped the request (it ended)
                }
            }
            left
        };
        let left = tokio::time::timeout(self.limits.snapshot_timeout, gather)
            .await
            .unwrap_or(usize::MAX);
        if left != 0 {
            let missing: Vec<String> = got
                .iter()
                .enumerate()
                .filter(|(_, s)| s.is_none())
                .map(|(i, _)| i.to_string())
                .collect();
            return Err(NotGathered(format!(
                "worker(s) {} did not answer in time",
                missing.join(", ")
            )));
        }
        let s: Snapshots = Arc::new(got.into_iter().flatten().collect());
        *cache = Some((Instant::now(), s.clone()));
        Ok(s)
    }
}

/// The bytes an HTTP/1.1 request can start with: a method (RFC 9110 §9)
/// and a space, or the empty line a client may send first (RFC 9112 §2.2).
const STARTS: [&[u8]; 10] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
    b"\r\n",
];

/// Whether `seen`, the first bytes of a connection, can begin a request.
fn starts_like_http(seen: &[u8]) -> bool {
    seen.is_empty()
        || STARTS
            .iter()
            .any(|m| m.starts_with(seen) || seen.starts_with(m))
}

/// Waits for the first bytes and looks at them once, without waiting for
/// more: a possible start goes to hyper (which waits for the rest, up to
/// the header timeout; a slow client is not garbage), anything else is
/// answered 400 at once. hyper alone would wait for a line end before
/// judging `hello`.
async fn could_be_http(stream: &tokio::net::TcpStream) -> io::Result<bool> {
    let mut buf = [0u8; 8];
    let n = stream.peek(&mut buf).await?;
    Ok(starts_like_http(&buf[..n]))
}

/// Answers bytes that are no HTTP request with 400 and closes: half-close
/// first, then read what follows for a moment (at most 64 KiB, 1 s), since
/// closing with unread bytes sends a reset that can destroy the 400 in
/// flight.
async fn bad_request(mut stream: tokio::net::TcpStream) {
    let _ = stream
        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 12\r\nconnection: close\r\n\r\nbad request\n")
        .await;
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut left = 64 * 1024usize;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// hyper's I/O with a bound on how long a write may wait: a client that
/// asks and never reads (a zero window) is closed after `limit` instead of
/// holding its connection until it is evicted.
struct WriteTimeout<T> {
    io: T,
    limit: Duration,
    /// Running while a write waits.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteTimeout<T> {
    fn new(io: T, limit: Duration) -> Self {
        WriteTimeout {
            io,
            limit,
            stalled: None,
        }
    }

    /// A write is pending: `Pending` until the limit, then an error.
    fn waited<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Passes a write's outcome on, timing it while it is pending.
    fn timed<R>(&mut self, cx: &mut Context<'_>, p: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match p {
            Poll::Pending => self.waited(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for WriteTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for WriteTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.io).poll_write(cx, buf);
        this.timed(cx, p)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.io).poll_flush(cx);
        this.timed(cx, p)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.io).poll_shutdown(cx);
        this.timed(cx, p)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.timed(cx, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    #[test]
    fn first_bytes() {
        for ok in [
            &b""[..],
            b"G",
            b"GE",
            b"GET",
            b"GET /metrics HTTP/1.1\r\n",
            b"HEAD /",
            b"OPTIONS ",
            b"\r",
            b"\r\nGET / HTTP/1.1",
        ] {
            assert!(starts_like_http(ok), "{:?}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01"[..],
            b"hello",
            b"\x00\x01",
            b"SSH-2.0-",
            b"GETX",
            b"get /",
            b"PRI * HTTP/2.0",
            b"\n",
        ] {
            assert!(!starts_like_http(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// A status with fixed answers and a configurable number of workers.
    struct Fake {
        workers: usize,
    }

    impl Status for Fake {
        fn metrics(&self) -> String {
            "# TYPE x counter\nx_total 1\n".to_string()
        }
        fn api(&self) -> String {
            "{\"server_name\":\"fake\"}".to_string()
        }
        fn history(&self) -> String {
            "{}".to_string()
        }
        fn ask_workers(&self) -> Result<(usize, Answers), NotGathered> {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            for i in 0..self.workers {
                let tx = tx.clone();
                thread::spawn(move || {
                    let _ = tx.send((i, Snapshot::default()));
                });
            }
            Ok((self.workers, rx))
        }
        fn connections(&self, s: &[Snapshot], limit: usize) -> String {
            format!("{{\"workers\":{},\"limit\":{limit}}}", s.len())
        }
    }

    fn start(limits: Limits) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        serve(l, Arc::new(Fake { workers: 2 }), limits).unwrap();
        addr
    }

    /// Sends `req` (which closes the connection) and returns the answer.
    fn exchange(addr: std::net::SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        String::from_utf8_lossy(&all).into_owned()
    }

    #[test]
    fn loopback_routes() {
        let addr = start(Limits::default());
        let r = exchange(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.contains(&format!("content-type: {CONTENT_TYPE}\r\n")),
            "{r}"
        );
        assert!(r.ends_with("\r\n\r\n# TYPE x counter\nx_total 1\n"), "{r}");
        let r = exchange(
            addr,
            b"GET /api/connections?limit=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(r.contains("access-control-allow-origin: *\r\n"), "{r}");
        assert!(r.ends_with("{\"workers\":2,\"limit\":3}"), "{r}");
        let r = exchange(addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
        assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{r}");
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{r}");
    }

    #[test]
    fn loopback_a_client_that_never_reads_is_closed() {
        let addr = start(Limits {
            write_timeout: Duration::from_millis(300),
            ..Limits::default()
        });
        let s = TcpStream::connect(addr).unwrap();
        socket2::SockRef::from(&s)
            .set_recv_buffer_size(4096)
            .unwrap();
        let mut w = s.try_clone().unwrap();
        // Pipelined requests for the page (about 20 KB each), never read.
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(400);
        let writer = thread::spawn(move || {
            let _ = w.write_all(&req);
        });
        // Once the write has waited its limit the server closes: our
        // unread data then ends in a reset or an EOF.
        thread::sleep(Duration::from_secs(2));
        let mut s = s;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut sink = vec![0u8; 1 << 16];
        let mut got = 0;
        let end = loop {
            match s.read(&mut sink) {
                Ok(0) => break "eof",
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break "reset",
                Err(e) => panic!("still open after {got} bytes: {e}"),
            }
        };
        // Far less than the 400 answers asked for.
        assert!(got < 200 * routes::PAGE.len(), "{end} after {got} bytes");
        let _ = writer.join();
    }
}
