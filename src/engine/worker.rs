//! One worker thread per device: it owns that device's copy of the networks, takes batches from
//! the shared queue, runs them ([`run_batch`], the whole numeric path), and replies. A failing or
//! panicking batch fails only its own requests; the worker goes on with the next. Between
//! batches it loads and unloads model versions as its mail says.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Semaphore};

use candle_core::{Device, Tensor};
use image::DynamicImage;

use super::budget::MemoryBudget;
use super::codec::{self, DecodedImage};
use super::observer::{Observer, Outcome};
use super::queue::{Computed, Entry, Queue, Taken, Work};
use super::spans::BatchSpans;
use super::versions::VersionId;
use super::EngineError;
use crate::model::{Direction, Executor, Model, ModelError, ModelFile};

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

/// Runs batches of same-sized images on the model versions it has loaded; lives on, and only
/// on, its worker thread.
pub trait BatchRunner {
    /// Loads a model version onto this runner's device and warms it up, so that its first
    /// request does not pay for lazy initialisation.
    fn load(&mut self, version: VersionId, file: ModelFile) -> Result<(), String>;
    /// Drops a version's networks (a version it never loaded is no error).
    fn unload(&mut self, version: VersionId);
    fn run(
        &mut self,
        version: VersionId,
        direction: Direction,
        images: &[&DecodedImage],
    ) -> Result<Vec<DynamicImage>, String>;
}

/// Builds a worker's runner, without models, on the worker's own thread (device contexts are
/// per thread).
pub type RunnerFactory = Box<dyn FnOnce() -> Result<Box<dyn BatchRunner>, String> + Send>;

/// What a worker is told besides batches.
pub enum Command {
    /// Load and warm up a version, then say how it went.
    Load { version: VersionId, file: ModelFile, done: oneshot::Sender<Result<(), String>> },
    /// Nothing refers to this version any more.
    Unload(VersionId),
}

/// The real runner: the networks of every loaded version on one device.
pub struct ModelRunner {
    models: HashMap<VersionId, Model>,
    device: Device,
    executor: Executor,
}

impl ModelRunner {
    pub fn new(device: Device, executor: Executor) -> Self {
        Self { models: HashMap::new(), device, executor }
    }
}

impl BatchRunner for ModelRunner {
    fn load(&mut self, version: VersionId, file: ModelFile) -> Result<(), String> {
        let model = Model::from_file_with(file, &self.device, self.executor).map_err(|e| e.to_string())?;
        let probe = DecodedImage::from_rgb(image::RgbImage::from_pixel(32, 32, image::Rgb([128, 64, 192])));
        for direction in model.directions() {
            run_batch(&model, direction, &[&probe], &self.device)
                .map_err(|e| format!("warm-up failed: {e}"))?;
        }
        self.models.insert(version, model);
        Ok(())
    }

    fn unload(&mut self, version: VersionId) {
        self.models.remove(&version);
    }

    fn run(
        &mut self,
        version: VersionId,
        direction: Direction,
        images: &[&DecodedImage],
    ) -> Result<Vec<DynamicImage>, String> {
        let model =
            self.models.get(&version).ok_or_else(|| format!("model version {version} is not loaded"))?;
        run_batch(model, direction, images, &self.device).map_err(|e| e.to_string())
    }
}

/// Shared by the engine and its workers.
pub struct WorkerContext {
    pub queue: Arc<Queue>,
    /// One permit per queue slot; a request holds one from admission until its batch starts.
    pub slots: Arc<Semaphore>,
    pub capacity: usize,
    pub observer: Arc<dyn Observer>,
    /// The budget network passes are reserved in.
    pub budget: Arc<MemoryBudget>,
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    /// Workers whose runner is built and whose first models are loaded and warmed up.
    pub ready: AtomicUsize,
    /// Why workers that could not start stopped.
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

/// A model version a worker loads before it takes any request.
pub struct Initial {
    pub version: VersionId,
    pub name: String,
    pub file: ModelFile,
}

/// Worker `index`: builds its runner, loads the `initial` versions, then serves its mail and
/// batches until the queue is closed and drained.
pub fn work(
    context: Arc<WorkerContext>,
    index: usize,
    factory: RunnerFactory,
    initial: Vec<Initial>,
) -> Result<(), String> {
    let result = start(factory, initial).map(|runner| {
        context.ready.fetch_add(1, Ordering::SeqCst);
        serve(&context, index, runner)
    });
    // Loads sent to a worker that is gone are answered by the drop of their reply channel.
    context.queue.stop_worker(index);
    result
}

fn start(factory: RunnerFactory, initial: Vec<Initial>) -> Result<Box<dyn BatchRunner>, String> {
    let mut runner = factory()?;
    for Initial { version, name, file } in initial {
        load(runner.as_mut(), version, file).map_err(|e| format!("model `{name}`: {e}"))?;
    }
    Ok(runner)
}

/// Loads a version; a panic is a failed load, not a dead worker.
fn load(runner: &mut dyn BatchRunner, version: VersionId, file: ModelFile) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| runner.load(version, file)))
        .unwrap_or_else(|panic| Err(format!("loading panicked: {}", panic_message(&panic))))
}

fn serve(context: &WorkerContext, index: usize, mut runner: Box<dyn BatchRunner>) {
    let reserve = |head: &Entry, size: usize| {
        let bytes = head.model.memory.network_bytes(size, head.key.width, head.key.height);
        context.budget.try_reserve(bytes)
    };
    while let Some(work) =
        context.queue.next_work(index, context.max_batch_size, context.max_batch_delay, reserve)
    {
        match work {
            Work::Command(Command::Load { version, file, done }) => {
                let _ = done.send(load(runner.as_mut(), version, file));
            }
            Work::Command(Command::Unload(version)) => runner.unload(version),
            Work::Batch(taken) => run_taken(context, runner.as_mut(), taken),
        }
    }
}

/// Runs a batch and replies to each of its requests; answers those purged from the queue.
fn run_taken(context: &WorkerContext, runner: &mut dyn BatchRunner, taken: Taken) {
    for _ in &taken.abandoned {
        context.observer.outcome(Outcome::Dropped);
    }
    for entry in taken.expired {
        // The caller normally gives up first; this reply covers a caller not yet woken.
        let _ = entry.reply.send(Err(EngineError::TimedOut));
    }
    let Some(first) = taken.batch.first() else { return };
    let key = first.key;
    let model = Arc::clone(&first.model);
    let mut batch = taken.batch;
    for entry in &mut batch {
        entry.slot.take();
        entry.admission.settle_claim();
    }
    // Held until the network's buffers are freed: the outputs then live in the replies.
    let pass = taken.reservation;
    context.report_queue_depth();
    let mut spans = BatchSpans::start(&mut batch, &model.info.name);
    let started = Instant::now();
    let images: Vec<&DecodedImage> = batch.iter().map(|e| &e.image).collect();
    let result = catch_unwind(AssertUnwindSafe(|| runner.run(key.model, key.direction, &images)))
        .unwrap_or_else(|panic| Err(format!("inference panicked: {}", panic_message(&panic))));
    let inference = started.elapsed();
    spans.inference_done();
    drop(pass);
    context.observer.batch(&model.info.name, key.direction, batch.len(), inference);
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
            tracing::error!(model = %model.info.name, %message, size, "batch failed");
            for entry in batch {
                let _ = entry.reply.send(Err(EngineError::Internal(message.clone())));
            }
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
