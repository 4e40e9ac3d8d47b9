//! Request-body policies at the edge: a deadline for receiving a body, and draining what a client
//! still sends after its request was refused, so that it reads the refusal instead of a reset.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::oneshot;

use super::error::ApiError;

/// How far past the largest accepted body a refused one is still read to its end.
pub const DRAIN_ALLOWANCE: u64 = 1024 * 1024;

/// What [`drain_refused`] may read of a body that the service did not read to its end.
#[derive(Clone, Copy, Debug)]
pub struct DrainLimits {
    /// The largest body any route accepts plus [`DRAIN_ALLOWANCE`].
    pub bytes: u64,
    pub time: Duration,
}

/// When a request is answered without its body read to the end (a 413 from Content-Length, an
/// error before the body was needed), reads and discards the rest before answering, as long as it
/// fits [`DrainLimits`]; otherwise answers with `Connection: close`. Closing a socket with unread
/// data makes the kernel send a reset, which can reach the client before the answer does.
/// A client that sent `Expect: 100-continue` has not sent a body nobody asked for: nothing to
/// drain, and polling it would invite the body in.
pub async fn drain_refused(State(limits): State<DrainLimits>, request: Request, next: Next) -> Response {
    let expects_continue = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let (returned, mut leftover) = oneshot::channel();
    let request = request
        .map(|body| Body::new(ReturnedOnDrop { body: Some(body), polled: false, returned: Some(returned) }));
    let response = next.run(request).await;
    let Ok(Leftover { body, polled }) = leftover.try_recv() else { return response };
    if expects_continue && !polled || response.status() == StatusCode::REQUEST_TIMEOUT {
        return closing(response);
    }
    let fits = body.size_hint().upper().is_none_or(|remaining| remaining <= limits.bytes);
    if fits && tokio::time::timeout(limits.time, drain(body, limits.bytes)).await == Ok(true) {
        response
    } else {
        closing(response)
    }
}

/// Reads a body to its end unless it holds more than `limit` bytes; true when it ended.
async fn drain(mut body: Body, limit: u64) -> bool {
    let mut seen = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => seen += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => return false,
        }
        if seen > limit {
            return false;
        }
    }
    true
}

fn closing(mut response: Response) -> Response {
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

struct Leftover {
    body: Body,
    polled: bool,
}

/// A request body that, when dropped before its end, hands what is left back to
/// [`drain_refused`].
struct ReturnedOnDrop {
    body: Option<Body>,
    polled: bool,
    returned: Option<oneshot::Sender<Leftover>>,
}

impl HttpBody for ReturnedOnDrop {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.polled = true;
        match self.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.body.as_ref().map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for ReturnedOnDrop {
    fn drop(&mut self) {
        if let (Some(body), Some(returned)) = (self.body.take(), self.returned.take()) {
            if !body.is_end_stream() {
                let _ = returned.send(Leftover { body, polled: self.polled });
            }
        }
    }
}

/// Gives each request body a deadline, counted from when its head arrived: a body still
/// incomplete then is answered 408 (a client dribbling bytes cannot hold a request open by
/// sending one now and then).
pub async fn body_deadline(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    let expired = Arc::new(AtomicBool::new(false));
    let deadline = Box::pin(tokio::time::sleep(limit));
    let request = request.map(|body| Body::new(Deadline { body, deadline, expired: Arc::clone(&expired) }));
    let response = next.run(request).await;
    if !expired.load(Ordering::Acquire) {
        return response;
    }
    let message = format!("the request body did not arrive within {:.1} s", limit.as_secs_f64());
    closing(ApiError::new(StatusCode::REQUEST_TIMEOUT, "timed_out", message).into_response())
}

/// A body that fails once its deadline has passed while it waits for more data.
struct Deadline {
    body: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    expired: Arc<AtomicBool>,
}

impl HttpBody for Deadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.expired.store(true, Ordering::Release);
        Poll::Ready(Some(Err(axum::Error::new("the request body deadline has passed"))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
