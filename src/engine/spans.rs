//! Spans of a request's stages in the engine, under the request's own span: `decode` (with
//! `memory_wait` inside, while its memory is not yet free), `queue_wait`, `batch` (with
//! `inference` inside) and `encode`. They are debug level, so nothing builds them unless
//! something records them: the OTLP exporter, or debug logs.
//!
//! A batch serves several requests, and each request's trace should show the batch it ran in.
//! So each request gets its own `batch` span, with the batch's attributes (size, model,
//! direction, padded size) and a `batch.id` that the requests computed together share. One span
//! for the batch, linked from the other requests, would be missing from all traces but one.
//!
//! Numbers are recorded as `i64`: OpenTelemetry integers are signed, and `tracing-opentelemetry`
//! turns unsigned fields into strings.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing::Span;

use super::queue::Entry;

/// The spans a queued request takes to its batch.
pub struct QueuedSpans {
    /// The request's span, parent of its batch span.
    request: Span,
    /// Open from joining the queue until the batch starts.
    queue_wait: Span,
}

impl QueuedSpans {
    /// Opens `queue_wait` under the current span, which is the request's.
    pub fn enqueued() -> Self {
        let queue_wait = tracing::debug_span!("queue_wait");
        let request = if queue_wait.is_disabled() { Span::none() } else { Span::current() };
        Self { request, queue_wait }
    }
}

impl Default for QueuedSpans {
    /// No spans (a request nobody traces).
    fn default() -> Self {
        Self { request: Span::none(), queue_wait: Span::none() }
    }
}

/// Numbers batches across workers, for `batch.id`.
static NEXT_BATCH: AtomicU64 = AtomicU64::new(1);

/// Each request's `batch` span and the `inference` span inside it.
pub struct BatchSpans {
    spans: Vec<(Span, Span)>,
}

impl BatchSpans {
    /// Ends the queue waits of the requests in `batch` and opens their batch and inference spans.
    pub fn start(batch: &mut [Entry], model: &str) -> Self {
        let id = NEXT_BATCH.fetch_add(1, Ordering::Relaxed);
        let size = batch.len();
        let spans = batch
            .iter_mut()
            .map(|entry| {
                let QueuedSpans { request, queue_wait } = std::mem::take(&mut entry.spans);
                drop(queue_wait);
                let batch = tracing::debug_span!(
                    parent: &request,
                    "batch",
                    batch.id = id as i64,
                    batch.size = size as i64,
                    model,
                    direction = entry.key.direction.as_str(),
                    padded_width = i64::from(entry.key.width),
                    padded_height = i64::from(entry.key.height),
                );
                let inference = tracing::debug_span!(parent: &batch, "inference");
                (batch, inference)
            })
            .collect();
        Self { spans }
    }

    /// Ends the inference spans; the batch spans end when this is dropped, once the results are
    /// handed back.
    pub fn inference_done(&mut self) {
        for (_, inference) in &mut self.spans {
            *inference = Span::none();
        }
    }
}
