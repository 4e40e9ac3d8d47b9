//! The accept loop: HTTP/1 connections, at most `max_connections` at once (more wait in the
//! listen backlog), each closed when its request head is sent too slowly or when it idles too
//! long between requests, and all drained gracefully on shutdown.
//!
//! hyper's own header-read timeout also runs while a keep-alive connection waits for its next
//! request, so it cannot tell a slow head from an idle connection: both are watched here instead.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::ServiceExt;

#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// From a request's first byte to the end of its head.
    pub header_timeout: Duration,
    /// Between requests on a kept-alive connection (no request running, nothing sent either way).
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and waits for the
/// open connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(None);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors, for one: pause rather than spin.
                    tracing::warn!("cannot accept a connection: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched { stream, activity: Arc::clone(&activity) });
        let connection = http.serve_connection(io, service(app.clone(), Arc::clone(&activity)));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            tokio::select! {
                result = connection => {
                    if let Err(err) = result {
                        tracing::debug!(%peer, "connection ended: {err}");
                    }
                }
                reason = activity.expiry(limits) => tracing::debug!(%peer, reason, "closing connection"),
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The router as a hyper service that tells `activity` when each request starts and ends.
fn service(
    app: Router,
    activity: Arc<Activity>,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let running = RequestRunning::new(Arc::clone(&activity));
        let call = app.clone().oneshot(request.map(Body::new));
        async move {
            let response = call.await;
            drop(running);
            response
        }
    })
}

/// What a connection is doing, for its timeouts.
struct Activity {
    state: Mutex<ActivityState>,
}

struct ActivityState {
    requests_running: usize,
    /// When the first byte of a request head arrived, while that head is incomplete.
    head_started: Option<Instant>,
    last_io: Instant,
}

impl Activity {
    fn new() -> Self {
        let state = ActivityState { requests_running: 0, head_started: None, last_io: Instant::now() };
        Self { state: Mutex::new(state) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read(&self) {
        let mut state = self.state();
        state.last_io = Instant::now();
        if state.requests_running == 0 && state.head_started.is_none() {
            state.head_started = Some(state.last_io);
        }
    }

    fn wrote(&self) {
        self.state().last_io = Instant::now();
    }

    /// When the connection may be closed, and why; `None` while a request runs.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<(Instant, &'static str)> {
        let state = self.state();
        if state.requests_running > 0 {
            return None;
        }
        Some(match state.head_started {
            Some(started) => (started + limits.header_timeout, "request head not received in time"),
            None => (state.last_io + limits.idle_timeout, "idle"),
        })
    }

    /// Resolves once the connection has outstayed a timeout, with the reason.
    async fn expiry(&self, limits: ConnectionLimits) -> &'static str {
        loop {
            let recheck = Instant::now() + limits.header_timeout.min(limits.idle_timeout);
            match self.deadline(&limits) {
                Some((deadline, reason)) if deadline <= Instant::now() => return reason,
                Some((deadline, _)) => tokio::time::sleep_until(deadline).await,
                None => tokio::time::sleep_until(recheck).await,
            }
        }
    }
}

/// Marks one request as running on its connection for as long as it lives.
struct RequestRunning(Arc<Activity>);

impl RequestRunning {
    fn new(activity: Arc<Activity>) -> Self {
        let mut state = activity.state();
        state.requests_running += 1;
        state.head_started = None;
        drop(state);
        Self(activity)
    }
}

impl Drop for RequestRunning {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.requests_running -= 1;
        state.last_io = Instant::now();
    }
}

/// A TCP stream that reports its reads and writes to the connection's [`Activity`].
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
