//! W3C trace context: a caller's `traceparent` (and `tracestate`) make a request's span a child
//! of the caller's, so the request shows up inside the caller's trace.

use axum::http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Parents `span` on the trace context in `headers`; without one (or with a malformed one) the
/// span starts a trace of its own.
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    // Fails only for a span no layer records, which has nothing to continue.
    let _ = span.set_parent(parent);
}
