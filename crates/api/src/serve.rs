//! The HTTP server under the API: our own accept loop over hyper's HTTP/1
//! connection, so that what a client can hold is bounded. A connection has
//! `header_read_timeout` to send each request head, from its first byte on
//! and again while idle between requests (so idle keep-alive connections
//! close too). Open connections are capped below the process's descriptor
//! limit; past the cap the oldest connection still waiting for a request
//! head is closed to make room (one serving a request, a stream or a wait
//! is never), and only when every connection is busy is the new one shed.
//! `accept` running out of descriptors backs off instead of spinning.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, warn};

/// The limits of the server, from the `[api]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// Time a connection has to send a whole request head, from its first
    /// byte (or from the end of the previous request); past it the
    /// connection is closed.
    pub header_read_timeout: Duration,
    /// Most connections open at once. The server uses the smaller of this
    /// and the soft descriptor limit less [`FD_RESERVE`].
    pub max_connections: usize,
    /// Most event streams (and `logs?follow=true`) one org holds at once.
    pub max_streams_per_org: u32,
    /// Most requests one org has waiting at once (`?wait=true`, `/wait`).
    pub max_waits_per_org: u32,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            header_read_timeout: Duration::from_secs(5),
            max_connections: 4096,
            max_streams_per_org: 16,
            max_waits_per_org: 64,
        }
    }
}

/// Descriptors kept out of the connection cap: the database (each pooled
/// SQLite connection holds the file, its WAL and shared memory), the
/// dispatcher's writer and lock file, engine sockets (one per log follower
/// on Docker), the listener, epoll and the standard streams, and room for
/// the connections being closed to make room for new ones
/// ([`MAX_CLOSING`]).
pub const FD_RESERVE: u64 = 256;

/// The smallest connection cap that makes a server: a descriptor limit
/// below `FD_RESERVE + MIN_CONNECTIONS` is refused at start.
pub const MIN_CONNECTIONS: u64 = 64;

/// Most connections closed to make room that may still hold their
/// descriptor; past it new connections are shed until they are gone.
const MAX_CLOSING: usize = 64;

/// Largest request head (request line and headers) hyper buffers; larger
/// ones get hyper's own 431 (with no body). The API's own limits on the URI
/// and the headers (`limits::MAX_URI`, `limits::MAX_HEADERS`) are below it
/// and answer in the API's error shape.
const MAX_HEAD: usize = 64 * 1024;

/// Pause after `accept` fails for want of descriptors or memory: the
/// connection stays queued, so retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// At most one warning about failing accepts per this period.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// The soft `RLIMIT_NOFILE` of this process; `None` when unlimited or
/// unknown.
pub fn fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        rustix::process::getrlimit(rustix::process::Resource::Nofile).current
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The connection cap: `configured`, lowered to the descriptor limit less
/// the reserve. A limit that leaves fewer than [`MIN_CONNECTIONS`] is an
/// error naming the fix.
pub fn connection_cap(configured: usize, fd_limit: Option<u64>) -> anyhow::Result<usize> {
    let Some(limit) = fd_limit else {
        return Ok(configured);
    };
    let room = limit.saturating_sub(FD_RESERVE);
    if room < MIN_CONNECTIONS {
        anyhow::bail!(
            "the descriptor limit (ulimit -n) is {limit}: the API needs at least {} \
             ({FD_RESERVE} for the database, engines and files, {MIN_CONNECTIONS} for connections); \
             raise it",
            FD_RESERVE + MIN_CONNECTIONS
        );
    }
    Ok(configured.min(usize::try_from(room).unwrap_or(usize::MAX)))
}

/// The open connections: how many, which are waiting for a request head,
/// and how to close one.
#[derive(Debug)]
pub(crate) struct Conns {
    cap: usize,
    table: Mutex<Table>,
    evicted: AtomicU64,
    shed: AtomicU64,
}

#[derive(Debug, Default)]
struct Table {
    next: u64,
    /// By id, so the first is the oldest.
    open: BTreeMap<u64, Slot>,
    /// Slots told to close whose descriptor is not closed yet.
    closing: usize,
}

#[derive(Debug)]
struct Slot {
    /// Requests being answered (a response body being sent counts).
    busy: u32,
    /// Upgraded to a WebSocket: never again waiting for a head.
    pinned: bool,
    closing: bool,
    close: CancellationToken,
}

impl Conns {
    pub(crate) fn new(cap: usize) -> Arc<Conns> {
        Arc::new(Conns {
            cap,
            table: Mutex::new(Table::default()),
            evicted: AtomicU64::new(0),
            shed: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // The table holds counters and tokens only; a panic elsewhere
        // leaves it consistent.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    /// Open connections (those being closed included).
    pub(crate) fn open(&self) -> usize {
        self.lock().open.len()
    }

    pub(crate) fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    pub(crate) fn shed(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }

    /// Room for one more connection, closing the oldest one waiting for a
    /// request head if the cap is reached; `None`: every connection is
    /// busy, shed this one.
    fn admit(self: &Arc<Self>, close: CancellationToken) -> Option<ConnGuard> {
        let mut t = self.lock();
        if t.open.len() - t.closing >= self.cap && !Self::evict_locked(&mut t, &self.evicted) {
            self.shed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let id = t.next;
        t.next += 1;
        t.open.insert(
            id,
            Slot {
                busy: 0,
                pinned: false,
                closing: false,
                close,
            },
        );
        Some(ConnGuard {
            conns: self.clone(),
            id,
        })
    }

    /// Closes the oldest connection waiting for a request head (for an
    /// `accept` out of descriptors). `false` if there is none.
    fn evict_one(&self) -> bool {
        Self::evict_locked(&mut self.lock(), &self.evicted)
    }

    fn evict_locked(t: &mut Table, evicted: &AtomicU64) -> bool {
        if t.closing >= MAX_CLOSING {
            return false;
        }
        let Some(slot) = t
            .open
            .values_mut()
            .find(|s| s.busy == 0 && !s.pinned && !s.closing)
        else {
            return false;
        };
        slot.closing = true;
        slot.close.cancel();
        t.closing += 1;
        evicted.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn busy(self: &Arc<Self>, id: u64) -> Busy {
        if let Some(s) = self.lock().open.get_mut(&id) {
            s.busy += 1;
        }
        Busy {
            conns: self.clone(),
            id,
        }
    }

    /// Whether connection `id` is waiting for a request head.
    fn is_idle(&self, id: u64) -> bool {
        self.lock()
            .open
            .get(&id)
            .is_some_and(|s| s.busy == 0 && !s.pinned)
    }

    fn pin(&self, id: u64) {
        if let Some(s) = self.lock().open.get_mut(&id) {
            s.pinned = true;
        }
    }
}

/// One open connection's place in [`Conns`]; dropped with its socket.
#[derive(Debug)]
struct ConnGuard {
    conns: Arc<Conns>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut t = self.conns.lock();
        if let Some(slot) = t.open.remove(&self.id)
            && slot.closing
        {
            t.closing -= 1;
        }
    }
}

/// A request being answered on a connection: until it is dropped (with the
/// response body, once sent), the connection is not waiting for a head.
#[derive(Debug)]
struct Busy {
    conns: Arc<Conns>,
    id: u64,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(s) = self.conns.lock().open.get_mut(&self.id) {
            s.busy = s.busy.saturating_sub(1);
        }
    }
}

/// A response body that keeps its connection marked busy while it is sent.
struct Guarded {
    inner: Body,
    _busy: Busy,
}

impl http_body::Body for Guarded {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A socket that holds its place in [`Conns`]: the place is given back
/// when the socket is closed, also after an upgrade handed it to a
/// WebSocket session.
struct Tracked {
    io: TcpStream,
    guard: ConnGuard,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// What the accept loop needs.
pub(crate) struct Serving {
    pub listener: TcpListener,
    pub router: Router,
    pub conns: Arc<Conns>,
    pub header_read_timeout: Duration,
    /// Every connection task is spawned here.
    pub tracker: TaskTracker,
    /// Stop accepting; connections finish their request and close.
    pub shutdown: CancellationToken,
    /// The grace is over: connections close at once.
    pub hard: CancellationToken,
}

/// Accepts until `shutdown`. Never returns an error for one failed accept:
/// a server out of descriptors must still answer once some are free.
pub(crate) async fn accept_loop(s: Serving) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(s.header_read_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    let builder = Arc::new(builder);
    let mut failures = AcceptLog::default();
    loop {
        let accepted = tokio::select! {
            _ = s.shutdown.cancelled() => return,
            r = s.listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) if peer_gave_up(&e) => continue,
            Err(e) => {
                failures.failed(&e);
                // Out of descriptors: one held by a connection that is
                // only waiting for a head is worth more to a new client.
                if is_out_of_descriptors(&e) {
                    s.conns.evict_one();
                }
                tokio::select! {
                    _ = s.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
                continue;
            }
        };
        let close = s.hard.child_token();
        let Some(guard) = s.conns.admit(close.clone()) else {
            shed(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        s.tracker.spawn(connection(
            Tracked { io: stream, guard },
            s.router.clone(),
            s.conns.clone(),
            builder.clone(),
            s.shutdown.clone(),
            close,
        ));
    }
}

/// Serves one connection until it closes, is closed to make room (`close`),
/// or the server stops.
async fn connection(
    io: Tracked,
    router: Router,
    conns: Arc<Conns>,
    builder: Arc<http1::Builder>,
    shutdown: CancellationToken,
    close: CancellationToken,
) {
    let id = io.guard.id;
    let io_conns = conns.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let busy = conns.busy(id);
        let router = router.clone();
        let conns = conns.clone();
        async move {
            let resp = match router.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                conns.pin(id);
            }
            Ok::<_, Infallible>(resp.map(|inner| Body::new(Guarded { inner, _busy: busy })))
        }
    });
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    // A header timeout, a client gone mid-request, a
                    // malformed head (answered by hyper): the client's
                    // doing, not a fault of the server.
                    debug!(error = %e, "connection ended");
                }
                return;
            }
            _ = shutdown.cancelled(), if !draining => {
                // hyper's graceful shutdown closes a connection idle
                // between requests, but lets one that has not finished
                // its first head run to the header timeout. Neither has a
                // request to finish: close both now.
                if io_conns.is_idle(id) {
                    return;
                }
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            // Dropping the connection closes the socket at once.
            _ = close.cancelled() => return,
        }
    }
}

/// Every connection is busy: tell the client so, if its socket takes the
/// bytes at once, and close.
fn shed(stream: TcpStream) {
    const BODY: &str = r#"{"error":{"code":"too_many_connections","message":"the server has as many connections open as it allows, all of them busy; try again"}}"#;
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.try_write(resp.as_bytes());
}

/// An accept error about one connection that is already gone: move on.
fn peer_gave_up(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    // EMFILE (24) and ENFILE (23) on Linux and the BSDs.
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// Failed accepts, logged at most once per [`ACCEPT_LOG_EVERY`] with how
/// many were not.
#[derive(Debug, Default)]
struct AcceptLog {
    last: Option<Instant>,
    quiet: u64,
}

impl AcceptLog {
    fn failed(&mut self, e: &io::Error) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < ACCEPT_LOG_EVERY)
        {
            self.quiet += 1;
            return;
        }
        warn!(
            error = %e,
            more_since_last = self.quiet,
            "cannot accept connections; retrying shortly"
        );
        self.last = Some(now);
        self.quiet = 0;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_cap_stays_below_the_descriptor_limit() {
        assert_eq!(connection_cap(4096, Some(1024)).unwrap(), 1024 - 256);
        assert_eq!(connection_cap(100, Some(1024)).unwrap(), 100);
        assert_eq!(connection_cap(4096, None).unwrap(), 4096);
        let err = connection_cap(4096, Some(300)).unwrap_err().to_string();
        assert!(err.contains("ulimit -n"), "{err}");
    }

    #[test]
    fn past_the_cap_the_oldest_idle_connection_makes_room() {
        let conns = Conns::new(2);
        let hard = CancellationToken::new();
        let (t1, t2, t3) = (hard.child_token(), hard.child_token(), hard.child_token());
        let a = conns.admit(t1.clone()).unwrap();
        let b = conns.admit(t2.clone()).unwrap();
        // The oldest is busy: the next oldest makes room.
        let busy = conns.busy(a.id);
        let c = conns.admit(t3.clone()).unwrap();
        assert!(!t1.is_cancelled() && t2.is_cancelled() && !t3.is_cancelled());
        drop(b);
        assert_eq!(conns.open(), 2);
        // Everyone busy (or upgraded): the new one is shed.
        conns.pin(c.id);
        assert!(conns.admit(hard.child_token()).is_none());
        assert_eq!((conns.evicted(), conns.shed()), (1, 1));
        // A finished request leaves its connection waiting, so evictable.
        drop(busy);
        assert!(conns.admit(hard.child_token()).is_some());
        assert!(t1.is_cancelled());
    }
}
