//! Hooks through which the engine reports what it does; the server turns them into metrics.

use std::time::Duration;

use crate::model::Direction;

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Ok,
    /// Refused at once: the queue was full.
    Overloaded,
    /// Its deadline passed before it finished.
    TimedOut,
    /// Its caller went away before it was computed; it never reached the network.
    Dropped,
    /// The image could not be decoded, or is no supported image.
    BadImage,
    /// Refused for its size: bytes, pixels, or memory beyond the budget.
    TooLarge,
    /// Asked for a model or direction that does not exist.
    BadRequest,
    /// The network or the encoder failed.
    Internal,
    /// Refused because the engine is shutting down.
    ShuttingDown,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Overloaded => "overloaded",
            Self::TimedOut => "timed_out",
            Self::Dropped => "dropped",
            Self::BadImage => "bad_image",
            Self::TooLarge => "too_large",
            Self::BadRequest => "bad_request",
            Self::Internal => "internal",
            Self::ShuttingDown => "shutting_down",
        }
    }
}

/// What a rescan of the models folder changed about one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelChange {
    /// A new file, loaded and routed to.
    Added,
    /// A file with new content, whose new version now takes the model's requests.
    Replaced,
    /// A file gone: its model takes no new requests.
    Removed,
}

impl ModelChange {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "added",
            Self::Replaced => "replaced",
            Self::Removed => "removed",
        }
    }
}

/// Receives engine events. Every method has a no-op default.
pub trait Observer: Send + Sync + 'static {
    /// Requests admitted and not yet being computed (decoding or waiting for a batch).
    fn queue_depth(&self, _depth: usize) {}
    /// A request waited this long between joining the queue and its batch starting.
    fn queue_wait(&self, _wait: Duration) {}
    /// One batch ran through the network.
    fn batch(&self, _model: &str, _direction: Direction, _size: usize, _inference: Duration) {}
    fn decoded(&self, _took: Duration) {}
    fn encoded(&self, _took: Duration) {}
    /// A request ended.
    fn outcome(&self, _outcome: Outcome) {}
    /// The memory budget requests share, in bytes (told once).
    fn memory_budget(&self, _bytes: u64) {}
    /// Bytes reserved in the budget now.
    fn memory_reserved(&self, _bytes: u64) {}
    /// A rescan of the models folder changed what `model` is routed to.
    fn model_changed(&self, _model: &str, _change: ModelChange) {}
    /// A file of the models folder could not be loaded; what it would replace keeps serving.
    fn model_load_failed(&self, _model: &str) {}
    /// Model files whose latest content failed to load, now.
    fn model_files_failing(&self, _files: usize) {}
    /// Model versions held in memory now (serving, loading, or finishing requests).
    fn model_versions(&self, _versions: usize) {}
}

/// An observer that ignores everything.
pub struct NoopObserver;

impl Observer for NoopObserver {}
