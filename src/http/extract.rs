//! What `/translate` takes from a request: the result format from `Accept`, and the image from
//! the body (raw, or the `image` field of a multipart form), read only once the engine has
//! admitted it.

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Multipart, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use bytes::Bytes;
use tracing::field::Empty;
use tracing::Instrument;

use super::error::ApiError;
use crate::engine::codec::OutputFormat;
use crate::engine::{Engine, Ticket};

/// Room for multipart framing on top of the image itself.
pub const MULTIPART_OVERHEAD: usize = 64 * 1024;

/// The result format the client prefers.
pub struct Accepted(pub OutputFormat);

impl<S: Send + Sync> FromRequestParts<S> for Accepted {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(negotiate(parts.headers.get(header::ACCEPT))))
    }
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

/// The image bytes of a request, with the engine ticket that admitted them.
pub struct ImageBody {
    pub bytes: Bytes,
    pub ticket: Ticket,
}

impl ImageBody {
    /// Checks the content type, takes a ticket from the engine (a queue slot and the body's
    /// bytes in the memory budget) so that no body is read without one, then reads the body.
    pub async fn read(request: Request, engine: &Engine, max_bytes: usize) -> Result<Self, ApiError> {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.to_ascii_lowercase())
            .unwrap_or_default();
        let essence = content_type.split(';').next().unwrap_or_default().trim().to_string();
        let multipart = essence == "multipart/form-data";
        if !(multipart
            || essence.is_empty()
            || essence.starts_with("image/")
            || essence == "application/octet-stream")
        {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_content_type",
                format!(
                    "Content-Type `{essence}` is not accepted: send the image as the raw body (image/*, \
                     application/octet-stream) or as field `image` of a multipart/form-data form"
                ),
            ));
        }
        let limit = if multipart { max_bytes + MULTIPART_OVERHEAD } else { max_bytes };
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        // Refused before any of the body is read: the edge (`body::drain_refused`) reads the
        // rest of a small body, or closes, so that the client sees the answer.
        if declared.is_some_and(|length| length > limit) {
            return Err(too_large(max_bytes));
        }
        let mut ticket = engine.admit(declared.unwrap_or(limit) as u64)?;
        let span = tracing::debug_span!("read_body", bytes = Empty);
        let body = read_body(request.into_body(), limit, max_bytes).instrument(span.clone()).await?;
        span.record("bytes", body.len() as i64);
        ticket.body_read(body.len());
        let bytes = if multipart {
            let request =
                Request::builder().header(header::CONTENT_TYPE, content_type).body(Body::from(body));
            let request = request.map_err(|e| ApiError::bad_request("bad_multipart", e.to_string()))?;
            image_field(request, max_bytes).await?
        } else {
            body
        };
        if bytes.is_empty() {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_image",
                "the request body is empty",
            ));
        }
        Ok(Self { bytes, ticket })
    }
}

fn too_large(max_bytes: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_bytes",
        format!("request body is larger than the limit of {max_bytes} bytes"),
    )
}

/// The `image` field of a multipart form already read into memory.
async fn image_field(request: Request, max_bytes: usize) -> Result<Bytes, ApiError> {
    let bad =
        |e: axum::extract::multipart::MultipartError| ApiError::bad_request("bad_multipart", e.body_text());
    let mut form = Multipart::from_request(request, &())
        .await
        .map_err(|e| ApiError::bad_request("bad_multipart", e.body_text()))?;
    while let Some(field) = form.next_field().await.map_err(bad)? {
        if field.name() == Some("image") {
            let bytes = field.bytes().await.map_err(bad)?;
            return if bytes.len() > max_bytes { Err(too_large(max_bytes)) } else { Ok(bytes) };
        }
    }
    Err(ApiError::bad_request("bad_multipart", "the multipart form has no `image` field"))
}

async fn read_body(body: Body, limit: usize, max_bytes: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let length_error =
            std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if length_error {
            too_large(max_bytes)
        } else {
            ApiError::bad_request("bad_body", format!("cannot read the request body: {e}"))
        }
    })
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
