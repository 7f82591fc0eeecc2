//! The one HTTP server of every listener (the console, and the worker's `/healthz`, `/readyz`
//! and `/metrics`), bounded as a whole so that slow, idle or many clients cannot hold it: a
//! request's head must arrive within [`Limits::header_read`] (hyper's own timer, which also bounds
//! the wait for the next request on a kept-alive connection), its body within
//! [`Limits::body_read`] of the head (a trickled body is cut off, whatever its pace), a connection
//! on which no byte moves for [`Limits::idle`] is closed, at most [`Limits::max_connections`] are
//! served at once (the rest wait in the kernel's listen queue, holding no file of ours) and at most
//! [`Limits::max_per_address`] from one client address (an IPv6 client by its /64), more being
//! closed at once. Each listener adds its own whole-request deadline to its router.

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::future::Future as _;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

/// The most a request's head may grow to before hyper refuses it itself (431, with none of our
/// headers); the console's own limits answer well below it, with them.
const HARD_HEAD_BYTES: usize = 256 * 1024;
/// The most header lines hyper parses; the console's own limits answer at far fewer.
const HARD_HEADERS: usize = 1000;
/// Pause after `accept` fails (out of file descriptors, say) before trying again.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// A listener's bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest wait for a request's line and headers.
    pub header_read: Duration,
    /// Longest wait for a request's whole body, from its head.
    pub body_read: Duration,
    /// A connection on which no byte moves for this long is closed.
    pub idle: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections served at once from one address (an IPv6 one by its /64).
    pub max_per_address: usize,
}

impl Limits {
    /// The console's, from its settings.
    pub fn console(settings: &crate::config::ConsoleSettings) -> Self {
        Self {
            header_read: Duration::from_millis(settings.header_read_timeout_ms),
            body_read: Duration::from_millis(settings.header_read_timeout_ms),
            idle: Duration::from_millis(settings.keep_alive_idle_ms),
            max_connections: settings.max_connections,
            max_per_address: settings.max_connections_per_address,
        }
    }

    /// The worker's health and metrics endpoint: a prober or a scraper sends a short `GET` and
    /// waits a moment, so everything is short; a handful of them share one address at most.
    pub const HEALTH: Self = Self {
        header_read: Duration::from_secs(5),
        body_read: Duration::from_secs(5),
        idle: Duration::from_secs(30),
        max_connections: 64,
        max_per_address: 16,
    };
}

/// Serves `app` on `listener` until `stop` fires, then lets the requests in flight end.
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, stop: CancellationToken) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let per_address = Arc::new(PerAddress::default());
    let connections = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "an HTTP listener cannot accept a connection; trying again");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            },
        };
        // Over its address's share: closed at once, its permit free for others.
        let Some(share) = per_address.enter(peer.ip(), limits.max_per_address) else {
            drop(stream);
            continue;
        };
        let app = app.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            serve_connection(stream, peer, app, limits, stop).await;
            drop((share, permit));
        });
    }
    connections.close();
    connections.wait().await;
}

/// Connections open per client address.
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

/// One connection's place in its address's count, given back when dropped.
struct Share {
    of: Arc<PerAddress>,
    key: IpAddr,
}

impl PerAddress {
    /// A place for one more connection from `ip`, unless it has `max` already.
    fn enter(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<Share> {
        let key = address_key(ip);
        let mut open = self
            .0
            .lock()
            .expect("the per-address count is never poisoned");
        let count = open.entry(key).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Share {
            of: self.clone(),
            key,
        })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut open = self
            .of
            .0
            .lock()
            .expect("the per-address count is never poisoned");
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// What one client is counted by: an IPv4 address, an IPv6 /64 (one host has a whole /64, so
/// a per-address count would be a fresh allowance per address it picks).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

/// One connection, until the client closes it, it idles past its limit, or `stop` fires.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
) {
    let moved = Arc::new(LastMoved::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        moved: moved.clone(),
    });
    let body_read = limits.body_read;
    let service = app.map_request(move |request: hyper::Request<Incoming>| {
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(ConnectInfo(peer));
        let body = Deadlined {
            inner: body,
            deadline: Box::pin(tokio::time::sleep(body_read)),
            limit: body_read,
        };
        axum::extract::Request::from_parts(parts, axum::body::Body::new(body))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .max_buf_size(HARD_HEAD_BYTES)
        .max_headers(HARD_HEADERS);
    let mut connection = pin!(builder.serve_connection(io, TowerToHyperService::new(service)));
    let mut closing = false;
    loop {
        tokio::select! {
            _ = connection.as_mut() => return,
            () = stop.cancelled(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            () = moved.idle_for(limits.idle), if !closing => {
                // Closes at once between requests; a request under way is answered first.
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// A request body that fails once its deadline passes: a client trickling a body (a byte every
/// few seconds keeps the idle timer from firing) holds its connection no longer than the limit.
struct Deadlined {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
}

impl hyper::body::Body for Deadlined {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let limit = self.limit.as_millis();
            return Poll::Ready(Some(Err(format!(
                "the request body did not arrive within {limit} ms"
            )
            .into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// When a byte last moved on a connection, in milliseconds since it opened.
struct LastMoved {
    opened: Instant,
    at_ms: AtomicU64,
}

impl LastMoved {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            at_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.opened.elapsed().as_millis() as u64;
        self.at_ms.store(now, Ordering::Relaxed);
    }

    /// Resolves once no byte has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.opened + Duration::from_millis(self.at_ms.load(Ordering::Relaxed));
            if last.elapsed() >= idle {
                return;
            }
            tokio::time::sleep_until(last + idle).await;
        }
    }
}

/// A connection's stream that notes when bytes move.
struct Watched {
    inner: TcpStream,
    moved: Arc<LastMoved>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.moved.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.moved.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
