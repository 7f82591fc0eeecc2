//! The console's HTTP server, bounded so that slow or idle clients cannot hold it: a request's
//! head must arrive within `console.header_read_timeout_ms` (hyper's own timer, which also bounds
//! the wait for the next request on a kept-alive connection), a connection on which no byte
//! moves for `console.keep_alive_idle_ms` is closed, at most `console.max_connections` are served
//! at once (the rest wait in the kernel's listen queue, holding no file of ours), and every
//! request must be answered within `console.request_timeout_ms` (see [`super::router`]).

use crate::config::ConsoleSettings;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
/// headers); [`super::limits`] answers well below it, with them.
const HARD_HEAD_BYTES: usize = 256 * 1024;
/// The most header lines hyper parses; [`super::limits`] answers at far fewer.
const HARD_HEADERS: usize = 1000;
/// Pause after `accept` fails (out of file descriptors, say) before trying again.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until `stop` fires, then lets the requests in flight end.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: &ConsoleSettings,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let header_read = Duration::from_millis(settings.header_read_timeout_ms);
    let idle = Duration::from_millis(settings.keep_alive_idle_ms);
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
                    tracing::warn!(%error, "the console cannot accept a connection; trying again");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            },
        };
        let app = app.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            serve_connection(stream, peer, app, header_read, idle, stop).await;
            drop(permit);
        });
    }
    connections.close();
    connections.wait().await;
}

/// One connection, until the client closes it, it idles past `idle`, or `stop` fires.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    header_read: Duration,
    idle: Duration,
    stop: CancellationToken,
) {
    let moved = Arc::new(LastMoved::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        moved: moved.clone(),
    });
    let service = app.map_request(move |mut request: axum::extract::Request<_>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        request
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read)
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
            () = moved.idle_for(idle), if !closing => {
                // Closes at once between requests; a request under way is answered first.
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
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
