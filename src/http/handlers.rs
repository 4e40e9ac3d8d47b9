//! Route handlers: each takes what its extractors give and answers with a view or an error.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{Accepted, ImageBody};
use super::metrics::TranslateLabels;
use super::views::ModelView;
use super::AppState;
use crate::engine::codec::OutputFormat;
use crate::engine::{EngineError, Target, Translation};

#[derive(Debug, Deserialize)]
pub struct TranslateQuery {
    direction: Option<String>,
    model: Option<String>,
}

pub async fn translate(
    State(state): State<AppState>,
    query: Result<Query<TranslateQuery>, QueryRejection>,
    Accepted(format): Accepted,
    request: Request,
) -> Result<Response, ApiError> {
    if state.engine.is_shutting_down() {
        return Err(EngineError::ShuttingDown.into());
    }
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let direction = query.direction.ok_or_else(|| {
        ApiError::bad_request(
            "missing_direction",
            "query parameter `direction` is required (x2y, y2x or e.g. photo2painting)",
        )
    })?;
    let target = state.engine.resolve(query.model.as_deref(), &direction)?;
    let labels = TranslateLabels { model: target.model.info.name.clone(), direction: target.direction };
    let mut response = match run_translation(&state, target.clone(), format, request).await {
        Ok(translation) => translation_response(&target, translation),
        Err(err) => err.into_response(),
    };
    response.extensions_mut().insert(labels);
    Ok(response)
}

async fn run_translation(
    state: &AppState,
    target: Target,
    format: OutputFormat,
    request: Request,
) -> Result<Translation, ApiError> {
    let ImageBody { bytes, ticket } = ImageBody::read(request, &state.engine, state.max_body_bytes).await?;
    Ok(state.engine.translate(ticket, target, bytes, format).await?)
}

/// The image and what made it: the headers name the model version that computed it.
fn translation_response(target: &Target, t: Translation) -> Response {
    let info = &target.model.info;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    let timing = format!(
        "decode;dur={:.2}, queue;dur={:.2}, inference;dur={:.2}, encode;dur={:.2}",
        ms(t.timings.decode),
        ms(t.timings.queue),
        ms(t.timings.inference),
        ms(t.timings.encode)
    );
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    set("content-type", t.format.mime_type().to_string());
    set("server-timing", timing);
    set("x-model", info.name.clone());
    set("x-model-sha256", info.sha256.clone());
    set("x-direction", info.metadata.domains.direction_name(target.direction));
    set("x-batch-size", t.batch_size.to_string());
    if let Some((w, h)) = t.downscaled_from {
        set("x-downscaled-from", format!("{w}x{h}"));
    }
    (StatusCode::OK, headers, t.bytes).into_response()
}

pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

pub async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let unavailable = |message: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message);
    if state.engine.is_shutting_down() {
        return Err(unavailable("the server is shutting down".into()));
    }
    if let Some(failure) = state.engine.failed_worker() {
        return Err(unavailable(failure));
    }
    if !state.engine.is_ready() {
        let why = if state.engine.models().is_empty() {
            "no model is loaded"
        } else {
            "models are loading and warming up"
        };
        return Err(unavailable(why.into()));
    }
    let models: Vec<String> = state.engine.models().iter().map(|m| m.info.name.clone()).collect();
    Ok(Json(serde_json::json!({ "status": "ready", "models": models })))
}

pub async fn models(State(state): State<AppState>) -> Json<serde_json::Value> {
    let models: Vec<ModelView> =
        state.engine.models().iter().map(|m| ModelView::new(&state.engine, m, &state.device)).collect();
    Json(serde_json::json!({ "models": models, "failed": state.engine.load_failures() }))
}

pub async fn model(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelView>, ApiError> {
    let models = state.engine.models();
    models
        .iter()
        .find(|m| m.info.name == name)
        .map(|m| Json(ModelView::new(&state.engine, m, &state.device)))
        .ok_or_else(|| {
            let available: Vec<&str> = models.iter().map(|m| m.info.name.as_str()).collect();
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_model",
                format!("no model named `{name}`; loaded: {}", available.join(", ")),
            )
        })
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state.metrics.map(|m| m.render()).map_or_else(
        || ApiError::new(StatusCode::NOT_FOUND, "not_found", "metrics are not enabled").into_response(),
        |text| ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
    )
}

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], include_str!("../../openapi.yaml"))
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route; see GET /openapi.yaml")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}
