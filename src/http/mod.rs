//! The HTTP service over the [`crate::engine`], one concern per file: the router, middleware and
//! serve loop ([`server`]); what `/translate` takes from a request ([`extract`]); the route
//! [`handlers`] and the JSON bodies they answer with ([`views`], [`error`]); Prometheus
//! [`metrics`]; the span each request runs in ([`request_span`]); the try-it page ([`ui`]); and
//! the signals that start a graceful [`shutdown`].

pub mod auth;
pub mod body;
pub mod connections;
pub mod error;
pub mod extract;
pub mod handlers;
pub mod metrics;
pub mod request_span;
pub mod server;
pub mod shutdown;
pub mod ui;
pub mod views;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::engine::Engine;

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub metrics: Option<PrometheusHandle>,
    /// The device the models run on, as reported by `/v1/models`.
    pub device: String,
    pub max_body_bytes: usize,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    pub max_body_bytes: usize,
    /// Origins allowed by CORS; empty turns CORS off, `*` allows any.
    pub cors_origins: Vec<String>,
    /// Backstop for a whole request, body upload included (the engine's own deadline is shorter).
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Serve the try-it page at `/` (and its assets under `/ui/`).
    pub ui: bool,
    /// A request body still incomplete this long after its head arrived is answered 408.
    pub body_timeout: Duration,
    pub connections: connections::ConnectionLimits,
    /// Keys the model routes require (none: open).
    pub api_keys: auth::ApiKeys,
    /// Where `/metrics` is served instead of on `addr`, when set.
    pub metrics_addr: Option<SocketAddr>,
    /// Traces are exported: request spans continue the caller's trace and carry OpenTelemetry
    /// fields.
    pub traces: bool,
}
