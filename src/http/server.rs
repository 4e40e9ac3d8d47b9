//! The router, its middleware stack, and the serve loop with graceful shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::Request;
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, OnResponse, TraceLayer};
use tracing::Level;

use super::body::{self, DrainLimits, DRAIN_ALLOWANCE};
use super::error::ApiError;
use super::extract::MULTIPART_OVERHEAD;
use super::handlers;
use super::{auth, connections, metrics, request_span, shutdown, ui, AppState, ServerConfig};

/// All routes with their middleware.
pub fn router(state: AppState, config: &ServerConfig) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    // The image limit is enforced while reading (with a JSON 413); this layer refuses a declared
    // Content-Length over it before any of the body is read.
    let translate = Router::new()
        .route("/translate", post(handlers::translate))
        .layer(RequestBodyLimitLayer::new(config.max_body_bytes + MULTIPART_OVERHEAD))
        .layer(axum::extract::DefaultBodyLimit::disable());
    // Refused before anything else, bodies included, when API keys are configured.
    let keyed = Router::new()
        .merge(translate)
        .route("/v1/models", get(handlers::models))
        .route("/v1/models/{name}", get(handlers::model))
        .route_layer(middleware::from_fn_with_state(config.api_keys.clone(), auth::require_key));
    let metrics_here = if config.metrics_addr.is_none() {
        Router::new().route("/metrics", get(handlers::metrics))
    } else {
        Router::new()
    };
    let api = Router::new()
        .merge(keyed)
        .merge(metrics_here)
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/openapi.yaml", get(handlers::openapi))
        .merge(if config.ui { ui::routes() } else { Router::new() })
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .with_state(state);
    let traced = config.traces;
    let log_response =
        DefaultOnResponse::new().level(Level::INFO).latency_unit(tower_http::LatencyUnit::Millis);
    let trace = TraceLayer::new_for_http()
        .make_span_with(move |request: &Request| request_span::make(request, traced))
        .on_response(move |response: &Response, latency: Duration, span: &tracing::Span| {
            if traced {
                request_span::record_status(span, response.status());
            }
            log_response.on_response(response, latency, span);
        });
    let drain = DrainLimits {
        bytes: (config.max_body_bytes + MULTIPART_OVERHEAD) as u64 + DRAIN_ALLOWANCE,
        time: config.body_timeout,
    };
    let middleware = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
        .layer(trace)
        .layer(PropagateRequestIdLayer::new(request_id))
        .layer(middleware::from_fn_with_state(drain, body::drain_refused))
        .layer(middleware::from_fn_with_state(config.body_timeout, body::body_deadline))
        .layer(cors(&config.cors_origins))
        .layer(middleware::from_fn(json_errors))
        .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timed_out", "the request took too long")
        }))
        .timeout(config.request_timeout);
    api.layer(middleware::from_fn(metrics::track)).layer(middleware)
}

/// `/metrics` alone, for its own port.
fn metrics_router(state: AppState) -> Router {
    Router::new().route("/metrics", get(handlers::metrics)).fallback(handlers::not_found).with_state(state)
}

fn cors(origins: &[String]) -> CorsLayer {
    if origins.is_empty() {
        return CorsLayer::new();
    }
    let expose = ["x-request-id", "server-timing", "x-model-sha256"].map(HeaderName::from_static);
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::CONTENT_TYPE, header::ACCEPT, header::AUTHORIZATION])
        .expose_headers(expose);
    if origins.iter().any(|o| o == "*") {
        layer.allow_origin(AllowOrigin::any())
    } else {
        layer.allow_origin(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect::<Vec<_>>())
    }
}

/// Gives the few error responses that middleware writes (oversized bodies, for one) the same
/// JSON body as every other error.
async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !status.is_client_error() && !status.is_server_error() || is_json {
        return response;
    }
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too_many_bytes",
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => "timed_out",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::NOT_FOUND => "not_found",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let message = status.canonical_reason().unwrap_or("error").to_string();
    let mut json = ApiError::new(status, code, message).into_response();
    for (name, value) in response.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            json.headers_mut().insert(name.clone(), value.clone());
        }
    }
    json
}

/// Serves until SIGTERM/SIGINT, then drains: readiness fails at once, new requests are refused,
/// in-flight ones finish, and the engine completes its queue. An error when the drain outlasts
/// `config.shutdown_grace`, or when the models cannot be loaded (so that a supervisor restarts
/// the process rather than keep it unready). `/metrics` gets its own listener when
/// `config.metrics_addr` is set.
pub async fn serve(state: AppState, config: ServerConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    let local: SocketAddr = listener.local_addr()?;
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await?),
        None => None,
    };
    tracing::info!(address = %local, "listening");
    let app = router(state.clone(), &config);
    let limits = config.connections;
    let (stopping, stop) = tokio::sync::watch::channel(false);
    let stopped = move |mut stop: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|stopping| *stopping).await;
    };
    if let Some(listener) = metrics_listener {
        tracing::info!(address = %listener.local_addr()?, "metrics listening");
        let metrics = metrics_router(state.clone());
        tokio::spawn(connections::serve(listener, metrics, limits, stopped(stop.clone())));
    }
    let engine = std::sync::Arc::clone(&state.engine);
    let grace = config.shutdown_grace;
    tokio::spawn(async move {
        shutdown::signal().await;
        engine.begin_shutdown();
        tracing::info!(grace_seconds = grace.as_secs_f64(), "draining");
        let _ = stopping.send(true);
    });
    let engine = std::sync::Arc::clone(&state.engine);
    let signalled = stopped(stop.clone());
    let run = async move {
        connections::serve(listener, app, limits, stopped(stop)).await;
        engine.shutdown().await;
        tracing::info!("stopped");
        anyhow::Ok(())
    };
    let overtime = async move {
        signalled.await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = run => result,
        _ = overtime => anyhow::bail!("requests still running after the {grace:?} grace period"),
        failure = loading_failure(&state) => anyhow::bail!("models could not be loaded: {failure}"),
    }
}

/// Resolves with the reason once a worker has failed to load its models.
async fn loading_failure(state: &AppState) -> String {
    loop {
        if let Some(failure) = state.engine.failed_worker() {
            return failure;
        }
        if state.engine.is_ready() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The bind address from host and port.
pub fn address(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    (host, port).to_socket_addrs()?.next().ok_or_else(|| anyhow::anyhow!("cannot resolve host `{host}`"))
}
