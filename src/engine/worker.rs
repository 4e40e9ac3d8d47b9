//! One worker thread per device: it owns that device's copy of the networks, takes batches from
//! the shared queue, runs them, and replies. A failing or panicking batch fails only its own
//! requests; the worker goes on with the next.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use candle_core::Device;
use image::DynamicImage;

use super::codec::DecodedImage;
use super::observer::{Observer, Outcome};
use super::queue::{Computed, Queue};
use super::EngineError;
use crate::model::{Direction, Model, ModelFile};

/// Runs batches of same-sized images; lives on, and only on, its worker thread.
pub trait BatchRunner {
    fn run(
        &mut self,
        model: usize,
        direction: Direction,
        images: &[&DecodedImage],
    ) -> Result<Vec<DynamicImage>, String>;
}

/// Builds a worker's runner on the worker's own thread (device contexts are per thread).
pub type RunnerFactory = Box<dyn FnOnce() -> Result<Box<dyn BatchRunner>, String> + Send>;

/// The real runner: every model's networks on one device.
pub struct ModelRunner {
    models: Vec<Model>,
    device: Device,
}

impl ModelRunner {
    /// Loads the models onto `device` and runs one small inference per network, so that the
    /// first request does not pay for lazy initialisation.
    pub fn load(files: Vec<ModelFile>, device: Device) -> Result<Self, String> {
        let models = files
            .into_iter()
            .map(|f| Model::from_file(f, &device).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut runner = Self { models, device };
        let probe = DecodedImage::from_rgb(image::RgbImage::from_pixel(32, 32, image::Rgb([128, 64, 192])));
        for model in 0..runner.models.len() {
            for direction in runner.models[model].directions().collect::<Vec<_>>() {
                runner.run(model, direction, &[&probe]).map_err(|e| format!("warm-up failed: {e}"))?;
            }
        }
        Ok(runner)
    }
}

impl BatchRunner for ModelRunner {
    fn run(
        &mut self,
        model: usize,
        direction: Direction,
        images: &[&DecodedImage],
    ) -> Result<Vec<DynamicImage>, String> {
        super::run_batch(&self.models[model], direction, images, &self.device).map_err(|e| e.to_string())
    }
}

/// Shared by the engine and its workers.
pub struct WorkerContext {
    pub queue: Arc<Queue>,
    /// One permit per queue slot; a request holds one from admission until its batch starts.
    pub slots: Arc<Semaphore>,
    pub capacity: usize,
    pub observer: Arc<dyn Observer>,
    pub model_names: Vec<String>,
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    /// Workers whose runner is loaded and warmed up.
    pub ready: AtomicUsize,
    /// Why workers that could not load their models stopped.
    pub failures: std::sync::Mutex<Vec<String>>,
}

impl WorkerContext {
    /// Requests admitted and not yet computing (decoding, or waiting for their batch).
    pub fn queue_depth(&self) -> usize {
        self.capacity - self.slots.available_permits()
    }

    pub fn report_queue_depth(&self) {
        self.observer.queue_depth(self.queue_depth());
    }
}

/// The worker loop: runs until the queue is closed and drained.
pub fn work(context: Arc<WorkerContext>, factory: RunnerFactory) -> Result<(), String> {
    let mut runner = factory()?;
    context.ready.fetch_add(1, Ordering::SeqCst);
    while let Some(taken) = context.queue.next_batch(context.max_batch_size, context.max_batch_delay) {
        for _ in &taken.abandoned {
            context.observer.outcome(Outcome::Dropped);
        }
        for entry in taken.expired {
            // The caller normally gives up first; this reply covers a caller not yet woken.
            let _ = entry.reply.send(Err(EngineError::TimedOut));
        }
        let Some(first) = taken.batch.first() else { continue };
        let key = first.key;
        let mut batch = taken.batch;
        for entry in &mut batch {
            entry.slot.take();
        }
        context.report_queue_depth();
        let started = Instant::now();
        let images: Vec<&DecodedImage> = batch.iter().map(|e| &e.image).collect();
        let result = catch_unwind(AssertUnwindSafe(|| runner.run(key.model, key.direction, &images)))
            .unwrap_or_else(|panic| Err(format!("inference panicked: {}", panic_message(&panic))));
        let inference = started.elapsed();
        context.observer.batch(&context.model_names[key.model], key.direction, batch.len(), inference);
        let size = batch.len();
        match result {
            Ok(outputs) if outputs.len() == size => {
                for (entry, image) in batch.into_iter().zip(outputs) {
                    let queue_wait = started.duration_since(entry.enqueued);
                    context.observer.queue_wait(queue_wait);
                    let _ = entry.reply.send(Ok(Computed { image, queue_wait, inference, batch_size: size }));
                }
            }
            other => {
                let message =
                    other.err().unwrap_or_else(|| "the runner returned the wrong number of images".into());
                tracing::error!(model = %context.model_names[key.model], %message, size, "batch failed");
                for entry in batch {
                    let _ = entry.reply.send(Err(EngineError::Internal(message.clone())));
                }
            }
        }
    }
    Ok(())
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
