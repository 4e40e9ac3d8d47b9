//! One worker thread per device: it owns that device's copy of the networks, takes batches from
//! the shared queue, runs them ([`run_batch`], the whole numeric path), and replies. A failing or
//! panicking batch fails only its own requests; the worker goes on with the next.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use candle_core::{Device, Tensor};
use image::DynamicImage;

use super::budget::MemoryBudget;
use super::codec::{self, DecodedImage};
use super::footprint::MemoryModel;
use super::observer::{Observer, Outcome};
use super::queue::{Computed, Queue};
use super::spans::BatchSpans;
use super::EngineError;
use crate::model::{Direction, Model, ModelError, ModelFile};

/// Runs one direction of `model` on images that share a padded size and returns each result at
/// its own input size. This is the whole numeric path; batching only decides what to group.
pub fn run_batch(
    model: &Model,
    direction: Direction,
    images: &[&DecodedImage],
    device: &Device,
) -> Result<Vec<DynamicImage>, ModelError> {
    let Some(first) = images.first() else { return Ok(Vec::new()) };
    let (width, height) = first.padded_size();
    if let Some(other) = images.iter().find(|i| i.padded_size() != (width, height)) {
        return Err(candle_core::Error::Msg(format!(
            "a batch must share one padded size: {:?} and {:?}",
            (width, height),
            other.padded_size()
        ))
        .into());
    }
    let data = codec::to_network_input(images, width, height);
    let shape = (images.len(), 3, height as usize, width as usize);
    let input = Tensor::from_vec(data, shape, device)?;
    let output = model.forward(direction, &input)?.to_device(&Device::Cpu)?;
    drop(input);
    let output = output.flatten_from(1)?.to_vec2::<f32>()?;
    Ok(output.iter().zip(images).map(|(chw, image)| codec::from_network_output(chw, width, image)).collect())
}

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
        run_batch(&self.models[model], direction, images, &self.device).map_err(|e| e.to_string())
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
    /// How each model's passes are costed, and the budget they are reserved in.
    pub memory: Vec<MemoryModel>,
    pub budget: Arc<MemoryBudget>,
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
    let reserve = |key: &super::queue::BatchKey, size: usize| {
        let bytes = context.memory[key.model].network_bytes(size, key.width, key.height);
        context.budget.try_reserve(bytes)
    };
    while let Some(taken) = context.queue.next_batch(context.max_batch_size, context.max_batch_delay, reserve)
    {
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
            entry.admission.settle_claim();
        }
        // Held until the network's buffers are freed: the outputs then live in the replies.
        let pass = taken.reservation;
        context.report_queue_depth();
        let mut spans = BatchSpans::start(&mut batch, &context.model_names[key.model]);
        let started = Instant::now();
        let images: Vec<&DecodedImage> = batch.iter().map(|e| &e.image).collect();
        let result = catch_unwind(AssertUnwindSafe(|| runner.run(key.model, key.direction, &images)))
            .unwrap_or_else(|panic| Err(format!("inference panicked: {}", panic_message(&panic))));
        let inference = started.elapsed();
        spans.inference_done();
        drop(pass);
        context.observer.batch(&context.model_names[key.model], key.direction, batch.len(), inference);
        let size = batch.len();
        match result {
            Ok(outputs) if outputs.len() == size => {
                for (entry, image) in batch.into_iter().zip(outputs) {
                    let queue_wait = started.duration_since(entry.enqueued);
                    context.observer.queue_wait(queue_wait);
                    let admission = entry.admission;
                    let computed = Computed { image, admission, queue_wait, inference, batch_size: size };
                    let _ = entry.reply.send(Ok(computed));
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
