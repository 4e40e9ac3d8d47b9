//! The span each request runs in: its log lines carry its fields, and the spans of its stages
//! (body read, decode, queue wait, batch, inference, encode) are its children. With traces
//! exported it is also the server span of the trace, continuing the caller's `traceparent`.

use axum::extract::{MatchedPath, Request};
use axum::http::StatusCode;
use opentelemetry::trace::Status;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::telemetry::context::continue_trace;
use crate::telemetry::UNTRACED_TARGET;

/// Routes never traced: health probes and metric scrapes come every few seconds, from machines,
/// and would drown the traces of real requests.
const UNTRACED_ROUTES: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// The span of `request`. `traced` names it and gives it its kind the OpenTelemetry way
/// (`POST /translate`, server), adds the HTTP attributes of the conventions, and continues the
/// caller's trace: work only an exporter reads.
pub fn make(request: &Request, traced: bool) -> Span {
    let method = request.method();
    let route = request.extensions().get::<MatchedPath>().map_or(request.uri().path(), |p| p.as_str());
    let id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !traced || UNTRACED_ROUTES.contains(&route) {
        return tracing::info_span!(target: UNTRACED_TARGET, "request", %method, route, request_id = id);
    }
    let span = tracing::info_span!(
        "request",
        %method,
        route,
        request_id = id,
        "otel.name" = format!("{method} {route}"),
        "otel.kind" = "server",
    );
    span.set_attribute("http.request.method", method.to_string());
    span.set_attribute("http.route", route.to_string());
    continue_trace(&span, request.headers());
    span
}

/// Puts the answer's status on a traced span; a server error marks the span failed.
pub fn record_status(span: &Span, status: StatusCode) {
    span.set_attribute("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.set_status(Status::error(status.to_string()));
    }
}
