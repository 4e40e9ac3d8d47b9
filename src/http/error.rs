//! Every error the API returns: a status and `{"error": {"code", "message"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::codec::ImageError;
use crate::engine::EngineError;

/// Seconds a client is told to wait after a 503.
pub const RETRY_AFTER_SECONDS: u32 = 1;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&Body { error: Detail { code: self.code, message: &self.message } })
            .unwrap_or_default();
        let mut response = (self.status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        let message = err.to_string();
        let (status, code) = match &err {
            EngineError::UnknownModel { .. } => (StatusCode::NOT_FOUND, "unknown_model"),
            EngineError::ModelRequired { .. } => (StatusCode::BAD_REQUEST, "model_required"),
            EngineError::NoModels => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            EngineError::BadDirection(_) => (StatusCode::BAD_REQUEST, "bad_direction"),
            EngineError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            EngineError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_much_memory"),
            EngineError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            EngineError::TimedOut => (StatusCode::GATEWAY_TIMEOUT, "timed_out"),
            EngineError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            EngineError::Image(image) => match image {
                ImageError::TooManyBytes { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_many_bytes"),
                ImageError::TooManyPixels { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_many_pixels"),
                ImageError::TooMuchMemory(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_much_memory"),
                ImageError::Unsupported(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_image"),
                ImageError::Corrupt(_) => (StatusCode::UNPROCESSABLE_ENTITY, "corrupt_image"),
                ImageError::Empty { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "empty_image"),
                ImageError::Encode(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
        };
        Self::new(status, code, message)
    }
}
