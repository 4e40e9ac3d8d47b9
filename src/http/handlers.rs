//! Route handlers.

use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::metrics::TranslateLabels;
use super::AppState;
use crate::engine::codec::OutputFormat;
use crate::engine::{ModelInfo, Target, Translation};
use crate::model::{Direction, GeneratorConfig};

/// Room for multipart framing on top of the image itself.
pub const MULTIPART_OVERHEAD: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
pub struct TranslateQuery {
    direction: Option<String>,
    model: Option<String>,
}

pub async fn translate(
    State(state): State<AppState>,
    query: Result<Query<TranslateQuery>, QueryRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    if state.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ));
    }
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let direction = query.direction.ok_or_else(|| {
        ApiError::bad_request(
            "missing_direction",
            "query parameter `direction` is required (x2y, y2x or e.g. photo2painting)",
        )
    })?;
    let target = state.engine.resolve(query.model.as_deref(), &direction)?;
    let labels = TranslateLabels {
        model: state.engine.models()[target.model].name.clone(),
        direction: target.direction,
    };
    let mut response = match run_translation(&state, target, request).await {
        Ok(translation) => translation_response(&state, target, translation),
        Err(err) => err.into_response(),
    };
    response.extensions_mut().insert(labels);
    Ok(response)
}

async fn run_translation(
    state: &AppState,
    target: Target,
    request: Request,
) -> Result<Translation, ApiError> {
    let format = negotiate(request.headers().get(header::ACCEPT));
    let bytes = image_body(request, state.max_body_bytes).await?;
    Ok(state.engine.translate(target, bytes, format).await?)
}

fn translation_response(state: &AppState, target: Target, t: Translation) -> Response {
    let info = &state.engine.models()[target.model];
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
    set("x-direction", info.metadata.domains.direction_name(target.direction));
    set("x-batch-size", t.batch_size.to_string());
    if let Some((w, h)) = t.downscaled_from {
        set("x-downscaled-from", format!("{w}x{h}"));
    }
    (StatusCode::OK, headers, t.bytes).into_response()
}

/// Picks the result format from `Accept`: the most preferred of PNG, JPEG and WebP. An `Accept`
/// naming none of them is disregarded (RFC 9110 §12.5.1 allows either that or 406) and gets PNG.
fn negotiate(accept: Option<&HeaderValue>) -> OutputFormat {
    let Some(accept) = accept.and_then(|v| v.to_str().ok()) else { return OutputFormat::Png };
    let mut best: Option<(f32, OutputFormat)> = None;
    for item in accept.split(',') {
        let mut parts = item.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let q = parts.find_map(|p| p.strip_prefix("q=")).and_then(|q| q.parse::<f32>().ok()).unwrap_or(1.0);
        let format = match media.as_str() {
            "image/png" | "image/*" | "*/*" => OutputFormat::Png,
            "image/jpeg" => OutputFormat::Jpeg,
            "image/webp" => OutputFormat::Webp,
            _ => continue,
        };
        if q > 0.0 && best.is_none_or(|(bq, _)| q > bq) {
            best = Some((q, format));
        }
    }
    best.map_or(OutputFormat::Png, |(_, f)| f)
}

/// The image bytes: the raw body, or the `image` field of a multipart form.
async fn image_body(request: Request, max_bytes: usize) -> Result<Bytes, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.to_ascii_lowercase())
        .unwrap_or_default();
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_bytes",
            format!("request body is larger than the limit of {max_bytes} bytes"),
        )
    };
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if essence == "multipart/form-data" {
        let (parts, body) = request.into_parts();
        let bytes = read_body(body, max_bytes + MULTIPART_OVERHEAD, too_large).await?;
        let request = Request::from_parts(parts, Body::from(bytes));
        let mut form = Multipart::from_request(request, &())
            .await
            .map_err(|e| ApiError::bad_request("bad_multipart", e.body_text()))?;
        while let Some(field) =
            form.next_field().await.map_err(|e| ApiError::bad_request("bad_multipart", e.body_text()))?
        {
            if field.name() == Some("image") {
                let bytes =
                    field.bytes().await.map_err(|e| ApiError::bad_request("bad_multipart", e.body_text()))?;
                return if bytes.len() > max_bytes { Err(too_large()) } else { Ok(bytes) };
            }
        }
        return Err(ApiError::bad_request("bad_multipart", "the multipart form has no `image` field"));
    }
    if !(essence.is_empty() || essence.starts_with("image/") || essence == "application/octet-stream") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_type",
            format!(
                "Content-Type `{essence}` is not accepted: send the image as the raw body (image/*, \
                 application/octet-stream) or as field `image` of a multipart/form-data form"
            ),
        ));
    }
    let bytes = read_body(request.into_body(), max_bytes, too_large).await?;
    if bytes.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_image",
            "the request body is empty",
        ));
    }
    Ok(bytes)
}

async fn read_body(body: Body, limit: usize, too_large: impl Fn() -> ApiError) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let length_error =
            std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if length_error {
            too_large()
        } else {
            ApiError::bad_request("bad_body", format!("cannot read the request body: {e}"))
        }
    })
}

pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

pub async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let unavailable = |message: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message);
    if state.shutting_down.load(Ordering::SeqCst) {
        return Err(unavailable("the server is shutting down".into()));
    }
    if let Some(failure) = state.engine.failed_worker() {
        return Err(unavailable(failure));
    }
    if !state.engine.is_ready() {
        return Err(unavailable("models are loading and warming up".into()));
    }
    let models: Vec<&str> = state.engine.models().iter().map(|m| m.name.as_str()).collect();
    Ok(Json(serde_json::json!({ "status": "ready", "models": models })))
}

/// A model as `/v1/models` shows it.
#[derive(Serialize)]
pub struct ModelView {
    name: String,
    domains: serde_json::Value,
    directions: Vec<DirectionView>,
    architecture: GeneratorConfig,
    parameters_per_generator: usize,
    device: String,
    sha256: String,
    size_bytes: u64,
    provenance: std::collections::BTreeMap<String, String>,
}

#[derive(Serialize)]
struct DirectionView {
    direction: Direction,
    name: String,
}

fn view(info: &ModelInfo, device: &str) -> ModelView {
    ModelView {
        name: info.name.clone(),
        domains: serde_json::json!({ "x": info.metadata.domains.x, "y": info.metadata.domains.y }),
        directions: info
            .direction_names()
            .into_iter()
            .map(|(direction, name)| DirectionView { direction, name })
            .collect(),
        architecture: info.metadata.architecture,
        parameters_per_generator: info.parameters_per_generator,
        device: device.to_string(),
        sha256: info.sha256.clone(),
        size_bytes: info.size_bytes,
        provenance: info.metadata.provenance.clone(),
    }
}

pub async fn models(State(state): State<AppState>) -> Json<serde_json::Value> {
    let models: Vec<ModelView> = state.engine.models().iter().map(|m| view(m, &state.device)).collect();
    Json(serde_json::json!({ "models": models }))
}

pub async fn model(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelView>, ApiError> {
    state.engine.models().iter().find(|m| m.name == name).map(|m| Json(view(m, &state.device))).ok_or_else(
        || {
            let available: Vec<&str> = state.engine.models().iter().map(|m| m.name.as_str()).collect();
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_model",
                format!("no model named `{name}`; loaded: {}", available.join(", ")),
            )
        },
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_picks_the_preferred_supported_format() {
        let pick = |s: &str| negotiate(Some(&HeaderValue::from_str(s).unwrap()));
        assert_eq!(pick("image/webp"), OutputFormat::Webp);
        assert_eq!(pick("image/jpeg;q=0.9, image/png;q=0.5"), OutputFormat::Jpeg);
        assert_eq!(pick("text/html, */*;q=0.1"), OutputFormat::Png);
        assert_eq!(pick("image/avif, image/webp;q=0.8, image/*;q=0.5"), OutputFormat::Webp);
        assert_eq!(pick("text/html"), OutputFormat::Png);
        assert_eq!(pick(""), OutputFormat::Png);
        assert_eq!(negotiate(None), OutputFormat::Png);
    }
}
