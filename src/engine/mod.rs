//! The inference engine: from encoded image to encoded result for many concurrent callers.
//!
//! decode (blocking pool) → bounded queue → dynamic batcher ([`queue`]) → one worker thread per
//! device ([`worker`]) → encode (blocking pool). The async runtime only awaits; decoding and
//! encoding of some requests overlap with inference of others.

pub mod catalog;
pub mod codec;
pub mod observer;
pub mod queue;
pub mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::{Device, Tensor};
use image::DynamicImage;
use tokio::sync::{oneshot, Semaphore};

use crate::model::{Direction, Model, ModelError, ModelFile};
pub use catalog::ModelInfo;
use codec::{DecodeOptions, DecodedImage, ImageError, OutputFormat};
use observer::{Observer, Outcome};
use queue::{BatchKey, Entry, Queue};
use worker::{BatchRunner, ModelRunner, RunnerFactory, WorkerContext};

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
    let output = output.flatten_from(1)?.to_vec2::<f32>()?;
    Ok(output.iter().zip(images).map(|(chw, image)| codec::from_network_output(chw, width, image)).collect())
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    /// Requests admitted but not yet computing (decoding or queued); beyond it: Overloaded.
    pub queue_capacity: usize,
    /// From admission to encoded result.
    pub request_timeout: Duration,
    pub decode: DecodeOptions,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 8,
            max_batch_delay: Duration::from_millis(5),
            queue_capacity: 64,
            request_timeout: Duration::from_secs(60),
            decode: DecodeOptions::default(),
        }
    }
}

/// Why a translation did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("no model named `{name}`; loaded: {}", available.join(", "))]
    UnknownModel { name: String, available: Vec<String> },
    #[error("several models are loaded; choose one with `model` ({})", available.join(", "))]
    ModelRequired { available: Vec<String> },
    #[error("{0}")]
    BadDirection(String),
    #[error("the queue is full; retry shortly")]
    Overloaded,
    #[error("the request did not finish within its deadline")]
    TimedOut,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    fn outcome(&self) -> Outcome {
        match self {
            Self::Overloaded => Outcome::Overloaded,
            Self::TimedOut => Outcome::TimedOut,
            Self::ShuttingDown => Outcome::ShuttingDown,
            Self::Image(_)
            | Self::UnknownModel { .. }
            | Self::ModelRequired { .. }
            | Self::BadDirection(_) => Outcome::BadImage,
            Self::Internal(_) => Outcome::Internal,
        }
    }
}

/// Time spent in each stage of one request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub decode: Duration,
    pub queue: Duration,
    pub inference: Duration,
    pub encode: Duration,
}

/// A finished translation.
#[derive(Debug)]
pub struct Translation {
    pub bytes: Vec<u8>,
    pub format: OutputFormat,
    pub width: u32,
    pub height: u32,
    /// Set when `max_side` shrank the input first.
    pub downscaled_from: Option<(u32, u32)>,
    pub batch_size: usize,
    pub timings: Timings,
}

/// What a caller asks for; `model` is an index into [`Engine::models`].
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub model: usize,
    pub direction: Direction,
}

pub struct Engine {
    models: Vec<ModelInfo>,
    config: EngineConfig,
    context: Arc<WorkerContext>,
    workers: Mutex<Vec<std::thread::JoinHandle<Result<(), String>>>>,
    worker_count: usize,
    closing: AtomicBool,
}

impl Engine {
    /// Starts one worker per device, each loading every model; returns at once (see
    /// [`Engine::is_ready`]).
    pub fn new(
        models: Vec<(ModelInfo, ModelFile)>,
        devices: Vec<Device>,
        config: EngineConfig,
        observer: Arc<dyn Observer>,
    ) -> Self {
        let (infos, files): (Vec<_>, Vec<_>) = models.into_iter().unzip();
        let factories: Vec<RunnerFactory> = devices
            .into_iter()
            .map(|device| {
                let files = files.clone();
                Box::new(move || {
                    ModelRunner::load(files, device).map(|r| Box::new(r) as Box<dyn BatchRunner>)
                }) as RunnerFactory
            })
            .collect();
        Self::with_runners(infos, factories, config, observer)
    }

    /// Starts one worker per runner factory; the runners stand for devices.
    pub fn with_runners(
        models: Vec<ModelInfo>,
        factories: Vec<RunnerFactory>,
        config: EngineConfig,
        observer: Arc<dyn Observer>,
    ) -> Self {
        let capacity = config.queue_capacity.max(1);
        let context = Arc::new(WorkerContext {
            queue: Arc::new(Queue::default()),
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            observer,
            model_names: models.iter().map(|m| m.name.clone()).collect(),
            max_batch_size: config.max_batch_size.max(1),
            max_batch_delay: config.max_batch_delay,
            ready: Default::default(),
            failures: Default::default(),
        });
        let worker_count = factories.len();
        let workers = factories
            .into_iter()
            .enumerate()
            .map(|(i, factory)| {
                let context = Arc::clone(&context);
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || {
                        let result = worker::work(Arc::clone(&context), factory);
                        if let Err(message) = &result {
                            tracing::error!(worker = i, %message, "worker could not start");
                            context.failures.lock().unwrap_or_else(|p| p.into_inner()).push(message.clone());
                        }
                        result
                    })
                    .expect("cannot spawn an inference worker thread")
            })
            .collect();
        Self {
            models,
            config,
            context,
            workers: Mutex::new(workers),
            worker_count,
            closing: AtomicBool::new(false),
        }
    }

    pub fn models(&self) -> &[ModelInfo] {
        &self.models
    }

    /// Every worker has loaded its models and run its warm-up inference.
    pub fn is_ready(&self) -> bool {
        self.context.ready.load(Ordering::SeqCst) == self.worker_count && !self.closing.load(Ordering::SeqCst)
    }

    /// Why a worker could not load its models, if one could not.
    pub fn failed_worker(&self) -> Option<String> {
        let failures = self.context.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.first().map(|f| format!("an inference worker could not start: {f}"))
    }

    /// Requests admitted and not yet computing.
    pub fn queue_depth(&self) -> usize {
        self.context.queue_depth()
    }

    pub fn resolve(&self, model: Option<&str>, direction: &str) -> Result<Target, EngineError> {
        catalog::resolve(&self.models, model, direction).map(|(model, direction)| Target { model, direction })
    }

    /// Translates one encoded image. Overloaded comes back at once when the queue is full;
    /// dropping the future before the batch starts keeps the request from being computed.
    pub async fn translate(
        &self,
        target: Target,
        bytes: Bytes,
        format: OutputFormat,
    ) -> Result<Translation, EngineError> {
        let result = self.admit_and_run(target, bytes, format).await;
        let outcome = result.as_ref().map_or_else(EngineError::outcome, |_| Outcome::Ok);
        self.context.observer.outcome(outcome);
        // A request that failed before its batch gave its slot back without the worker seeing it.
        self.context.report_queue_depth();
        result
    }

    async fn admit_and_run(
        &self,
        target: Target,
        bytes: Bytes,
        format: OutputFormat,
    ) -> Result<Translation, EngineError> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        let slot =
            Arc::clone(&self.context.slots).try_acquire_owned().map_err(|_| EngineError::Overloaded)?;
        self.context.report_queue_depth();
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let work = async {
            let started = Instant::now();
            let options = self.config.decode;
            let image = tokio::task::spawn_blocking(move || codec::decode(&bytes, &options))
                .await
                .map_err(|e| EngineError::Internal(format!("decoder task failed: {e}")))??;
            let decode = started.elapsed();
            self.context.observer.decoded(decode);

            let (width, height) = image.padded_size();
            let key = BatchKey { model: target.model, direction: target.direction, width, height };
            let (reply, receiver) = oneshot::channel();
            let downscaled_from = image.downscaled_from;
            let entry = Entry {
                key,
                image,
                enqueued: Instant::now(),
                deadline: deadline.into_std(),
                reply,
                slot: Some(slot),
            };
            self.context.queue.push(entry).map_err(|_| EngineError::ShuttingDown)?;
            let computed = receiver
                .await
                .map_err(|_| EngineError::Internal("the inference worker stopped".into()))??;

            let encode_started = Instant::now();
            let image = computed.image;
            let (out_width, out_height) = (image.width(), image.height());
            let bytes = tokio::task::spawn_blocking(move || codec::encode(&image, format))
                .await
                .map_err(|e| EngineError::Internal(format!("encoder task failed: {e}")))??;
            let encode = encode_started.elapsed();
            self.context.observer.encoded(encode);
            Ok(Translation {
                bytes,
                format,
                width: out_width,
                height: out_height,
                downscaled_from,
                batch_size: computed.batch_size,
                timings: Timings {
                    decode,
                    queue: computed.queue_wait,
                    inference: computed.inference,
                    encode,
                },
            })
        };
        tokio::time::timeout_at(deadline, work).await.unwrap_or(Err(EngineError::TimedOut))
    }

    /// Stops admitting requests, lets the workers finish everything admitted, and waits for them.
    pub async fn shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        // Holding every slot means each admitted request has been taken by a worker (or gave
        // up): requests still decoding are not cut off by closing the queue under them.
        let all_slots = self.context.slots.acquire_many(self.context.capacity as u32).await;
        self.context.queue.close();
        drop(all_slots);
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        let _ = tokio::task::spawn_blocking(move || {
            for worker in workers {
                let _ = worker.join();
            }
        })
        .await;
    }
}
