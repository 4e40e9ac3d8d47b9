//! Optional API keys: with any configured, the model routes need `Authorization: Bearer KEY`.
//! Only SHA-256 digests of the keys are kept, and a presented key is compared by digest without
//! early exit, so neither the keys nor the time a comparison takes give them away.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;

type KeyDigest = [u8; 32];

/// The accepted keys (none: every request is let through).
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Arc<Vec<KeyDigest>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} configured)", self.digests.len())
    }
}

impl ApiKeys {
    /// The non-empty keys among `keys`, surrounding whitespace ignored.
    pub fn new<S: AsRef<str>>(keys: impl IntoIterator<Item = S>) -> Self {
        let digests = keys
            .into_iter()
            .map(|k| k.as_ref().trim().to_string())
            .filter(|k| !k.is_empty())
            .map(|k| digest(&k))
            .collect();
        Self { digests: Arc::new(digests) }
    }

    /// The keys of a file, one a line (blank lines skipped); an error when it holds none.
    pub fn read_file(path: &Path) -> anyhow::Result<Vec<String>> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let keys: Vec<String> =
            text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
        anyhow::ensure!(!keys.is_empty(), "{} holds no API key", path.display());
        Ok(keys)
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    fn accepts(&self, presented: &str) -> bool {
        let presented = digest(presented);
        // Every key is compared in full, and the results are combined without branching.
        self.digests.iter().fold(false, |found, key| found | same(key, &presented))
    }
}

fn digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

fn same(a: &KeyDigest, b: &KeyDigest) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Lets a request through when no keys are configured or when it carries one of them.
pub async fn require_key(State(keys): State<ApiKeys>, request: Request, next: Next) -> Response {
    if keys.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    let message = match presented {
        Some(key) if keys.accepts(key) => return next.run(request).await,
        Some(_) => "the API key is not valid",
        None => "an API key is required: send `Authorization: Bearer KEY`",
    };
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_exactly_the_configured_keys() {
        let keys = ApiKeys::new(["alpha", " beta \n", ""]);
        assert_eq!(keys.len(), 2);
        assert!(keys.accepts("alpha") && keys.accepts("beta"));
        assert!(
            !keys.accepts("alph") && !keys.accepts("alphaa") && !keys.accepts("") && !keys.accepts("gamma")
        );
        assert!(ApiKeys::new(Vec::<String>::new()).is_empty());
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 configured)");
    }
}
